"""alpha calibration: positive, cached per model geometry and device, overridable."""
import json

from aptserve.calibration import calibrated_alpha
from aptserve.config import HybridMode, ModelConfig
from aptserve.engine_args import EngineArgs, resolve_alpha
from aptserve.sched import policy_class

SMALL = ModelConfig(path="x", architecture="opt", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4,
                    head_dim=16, vocab_size=100, max_model_len=128)


def test_alpha_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("APTSERVE_CACHE_DIR", str(tmp_path))
    alpha = calibrated_alpha(SMALL, 16, "float32", "cpu")
    assert alpha > 0
    table = json.loads((tmp_path / "alpha.json").read_text())
    (key,) = table
    assert "L2-H64-KV64-B16-float32-cpu" in key
    table[key] = 123.0  # a cached value is trusted, not re-measured
    (tmp_path / "alpha.json").write_text(json.dumps(table))
    assert calibrated_alpha(SMALL, 16, "float32", "cpu") == 123.0


def test_alpha_override_and_policies_that_need_none(tmp_path, monkeypatch):
    monkeypatch.setenv("APTSERVE_CACHE_DIR", str(tmp_path))
    apt, fcfs, on, off = policy_class("apt"), policy_class("fcfs"), HybridMode.ON, HybridMode.OFF
    assert resolve_alpha(EngineArgs(scheduler="apt", alpha=0.5), SMALL, apt, on, "float32") == 0.5
    assert resolve_alpha(EngineArgs(scheduler="fcfs"), SMALL, fcfs, on, "float32") == 0.0
    assert resolve_alpha(EngineArgs(scheduler="apt"), SMALL, apt, off, "float32") == 0.0
    assert not (tmp_path / "alpha.json").exists()
