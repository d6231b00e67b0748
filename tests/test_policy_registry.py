"""Policies carry their own name and traits: the registry, the CLI choices and resolve()'s defaults all come from
the classes, so adding a policy is one module in aptserve/sched/ (and its tests)."""
from __future__ import annotations

import pytest

from aptserve.config import ModelConfig
from aptserve.engine_args import EngineArgs, resolve
from aptserve.sched import POLICIES, Scheduler, create_scheduler, policy_class

MODEL = ModelConfig(path="sim", architecture="opt", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4,
                    head_dim=16, vocab_size=1000, max_model_len=4096)


def test_the_four_policies_register_themselves():
    assert sorted(POLICIES) == ["apt", "apt-chunked", "chunked", "fcfs"]
    assert all(cls.name == name and cls.summary for name, cls in POLICIES.items())
    assert EngineArgs.__dataclass_fields__["scheduler"].metadata["choices"] == tuple(sorted(POLICIES))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_resolve_takes_each_policys_defaults_from_its_class(name):
    cls = policy_class(name)
    config = resolve(EngineArgs(model="sim", scheduler=name, kv_cache_memory=64 << 20), MODEL,
                     measure_alpha=lambda *_: 0.25)
    assert config.scheduler.policy == name
    assert config.scheduler.max_num_batched_tokens == (cls.default_max_num_batched_tokens or 4096)
    assert config.scheduler.step_tbt_fraction == cls.default_step_tbt_fraction
    assert config.scheduler.alpha_s == (0.25 if cls.prices_hidden_cache else 0.0)  # MHA: the hybrid cache is on
    assert type(create_scheduler(config)) is cls


def test_a_new_policy_is_registered_by_defining_it():
    class Newest(Scheduler):
        name = "newest-first"
        summary = "a test policy"
        default_max_num_batched_tokens = 64

    try:
        assert policy_class("newest-first") is Newest
        config = resolve(EngineArgs(model="sim", scheduler="newest-first", kv_cache_memory=64 << 20), MODEL)
        assert config.scheduler.max_num_batched_tokens == 64 and type(create_scheduler(config)) is Newest
    finally:
        del POLICIES["newest-first"]
    with pytest.raises(ValueError, match="scheduler must be one of"):
        policy_class("newest-first")
