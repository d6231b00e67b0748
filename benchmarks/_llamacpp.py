"""llama.cpp's server as a benchmark peer: its settings, the model folder converted to GGUF, and the up-front check
that the prebuilt server runs on this CPU.

The server comes from benchmarks/llamacpp_env.sh. Its settings are llama-server's own flags (`-t`, `--poll`, `-fa`,
`-ctk/-ctv`, `-b`, `-ub`, `-np`, `-kvu/-no-kvu`) plus `--weights` (the GGUF's tensor type) and `--cpu-backend`
(the wrapper's); `parse_flags` turns a flag string into `LlamaCppSettings`, so serve_compare's --llamacpp-flags and
the tuning script's variants speak the flags a llama.cpp user knows. Its KV context `-c` is derived from a byte
budget (see `context_tokens`), so it holds the same KV bytes as the other servers.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from aptserve.paths import cache_dir
from benchmarks.common import cpu_flags, fp32_kv_bytes_per_token

# Bytes per element of the KV types llama-server takes (ggml's block sizes: 32 elements per quantized block).
KV_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
                 "q4_1": 20 / 32, "q4_0": 18 / 32, "iq4_nl": 18 / 32}
WEIGHT_TYPES = ("f32", "bf16", "f16", "q8_0")  # what convert_hf_to_gguf.py --outtype writes without quantizing tools
CPU_BACKENDS = ("wheel", "avx2")  # the wrapper's choices, in the order tried
CONTEXT_GRANULE = 256  # llama.cpp pads the context up to a multiple of this; floored here to stay in the budget


@dataclass(frozen=True)
class LlamaCppSettings:
    """What llama-server runs with. The defaults are the setup benchmarks/llamacpp_tuning.py found best on this
    kind of machine; `threads` and `slots` default to the cores and max-num-seqs the harness gives every server."""
    weights: str = "f32"  # GGUF tensor type; f32 is what aptserve and vLLM compute in
    cache_type_k: str = "f32"  # f32 KV: what aptserve and vLLM store
    cache_type_v: str = "f32"
    flash_attn: str = "on"
    unified_kv: bool = True
    poll: int = 50
    batch: int = 2048
    ubatch: int = 512
    threads: int | None = None
    slots: int | None = None
    cpu_strict: bool = False  # pin the compute threads to cores 0..threads-1
    cpu_backend: str = "auto"
    extra: tuple[str, ...] = ()  # any other llama-server flags, passed through

    def kv_bytes_per_element(self) -> float:
        return (KV_TYPE_BYTES[self.cache_type_k] + KV_TYPE_BYTES[self.cache_type_v]) / 2


def _flag_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamacpp-flags", add_help=False)
    parser.add_argument("--weights", choices=WEIGHT_TYPES)
    parser.add_argument("--kv-type", choices=tuple(KV_TYPE_BYTES), help="both -ctk and -ctv")
    parser.add_argument("-ctk", "--cache-type-k", dest="cache_type_k", choices=tuple(KV_TYPE_BYTES))
    parser.add_argument("-ctv", "--cache-type-v", dest="cache_type_v", choices=tuple(KV_TYPE_BYTES))
    parser.add_argument("-fa", "--flash-attn", dest="flash_attn", choices=("on", "off", "auto"))
    parser.add_argument("-kvu", "--kv-unified", dest="unified_kv", action="store_const", const=True)
    parser.add_argument("-no-kvu", "--no-kv-unified", dest="unified_kv", action="store_const", const=False)
    parser.add_argument("--poll", type=int)
    parser.add_argument("-b", "--batch-size", dest="batch", type=int)
    parser.add_argument("-ub", "--ubatch-size", dest="ubatch", type=int)
    parser.add_argument("-t", "--threads", type=int)
    parser.add_argument("-np", "--parallel", dest="slots", type=int)
    parser.add_argument("--cpu-strict", type=int, choices=(0, 1))
    parser.add_argument("--cpu-backend", choices=("auto", *CPU_BACKENDS))
    return parser


def parse_flags(flags: str, base: LlamaCppSettings = LlamaCppSettings()) -> LlamaCppSettings:
    """`base` with the settings named in `flags` (llama-server's spelling; `=` or a space before a value);
    flags it does not model pass through to the server verbatim."""
    known, extra = _flag_parser().parse_known_args(shlex.split(flags.replace("=", " ")))
    changes = {key: value for key, value in vars(known).items() if value is not None}
    if "kv_type" in changes:
        kv_type = changes.pop("kv_type")
        changes.setdefault("cache_type_k", kv_type)
        changes.setdefault("cache_type_v", kv_type)
    if "cpu_strict" in changes:
        changes["cpu_strict"] = bool(changes["cpu_strict"])
    return dataclasses.replace(base, **changes, extra=base.extra + tuple(extra))


def settings_record(settings: LlamaCppSettings) -> dict:
    return {**dataclasses.asdict(settings), "extra": list(settings.extra)}


def context_tokens(kv_cache_memory: int, model_dir: str, settings: LlamaCppSettings) -> int:
    """`-c`: the most tokens whose K and V rows (every layer, at the KV type) fit in `kv_cache_memory` bytes, the
    budget the other servers get, floored to llama.cpp's padding so that its pool holds no more bytes than theirs."""
    per_token = fp32_kv_bytes_per_token(model_dir) * settings.kv_bytes_per_element() / KV_TYPE_BYTES["f32"]
    tokens = int(kv_cache_memory // per_token) // CONTEXT_GRANULE * CONTEXT_GRANULE
    if tokens < CONTEXT_GRANULE:
        raise ValueError(f"{kv_cache_memory} KV bytes hold under {CONTEXT_GRANULE} tokens at "
                         f"{settings.cache_type_k}/{settings.cache_type_v}")
    return tokens


# ---------------------------------------------------------------------------------------------- the GGUF files

def converter_dir(server: str) -> Path:
    """llama.cpp's converter beside the server that llamacpp_env.sh installed (<venv>/bin/llama-server)."""
    return Path(server).resolve().parent.parent / "llama.cpp"


def gguf_path(model_dir: str, weights: str) -> Path:
    return cache_dir() / "gguf" / f"{Path(model_dir).name}-{weights}.gguf"


def convert_to_gguf(model_dir: str, weights: str, server: str) -> Path:
    """The model folder as GGUF with `weights` tensors, converted once into the aptserve cache (again when the
    folder's weights are newer). The converter runs in this interpreter (the project venv has its torch,
    transformers and safetensors) with gguf-py and sentencepiece from the llama.cpp venv."""
    out = gguf_path(model_dir, weights)
    sources = list(Path(model_dir).glob("*.safetensors")) + [Path(model_dir) / "config.json"]
    if out.exists() and all(out.stat().st_mtime >= source.stat().st_mtime for source in sources):
        return out
    converter = converter_dir(server)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(converter / "gguf-py"), str(converter.parent / "converter-deps")])}
    done = subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), model_dir, "--outtype",
                           weights, "--outfile", str(partial)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({done.returncode}) on {model_dir}: "
                           + _last_error_line(done.stderr))
    partial.replace(out)
    return out


def _last_error_line(text: str) -> str:
    errors = [line for line in text.splitlines() if re.match(r"^\w+(Error|Exception)\b", line)]
    return errors[-1] if errors else text.strip().splitlines()[-1] if text.strip() else "no output"


# ------------------------------------------------------------------------------------------- the up-front probe

def _signal_name(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name
        return name + (" (illegal instruction: the backend needs an instruction set this CPU lacks)"
                       if name == "SIGILL" else "")
    return f"exit {returncode}"


def probe_backend(server: str, gguf: Path, backend: str, port: int, timeout_s: float = 120.0) -> str | None:
    """None if llama-server with this CPU backend loads the model, warms up (one decode) and streams a completion;
    else the one-line reason."""
    from benchmarks.servers import SERVED_NAME, running_server

    argv = [server, "--model", str(gguf), "--alias", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
            "-c", "512", "-np", "1", "-t", "1", "--no-webui", "-fit", "off"]
    with tempfile.TemporaryDirectory(prefix="llamacpp-probe-") as log_dir:
        try:
            with running_server(f"probe-{backend}", argv, {"LLAMACPP_CPU_BACKEND": backend}, Path(log_dir), port,
                                timeout_s) as (url, _):
                return _probe_completion(url)
        except RuntimeError as error:
            return _probe_failure(str(error))


def _probe_completion(url: str) -> str | None:
    import httpx

    from benchmarks.servers import SERVED_NAME

    body = {"model": SERVED_NAME, "prompt": "The capital of France is", "max_tokens": 2, "temperature": 0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60, trust_env=False)
    if response.status_code != 200:
        return f"completion answered HTTP {response.status_code}: {response.text[:200]}"
    return None


def _probe_failure(message: str) -> str:
    """One line out of wait_ready's message (which carries the log's tail)."""
    match = re.match(r"server exited (-?\d+)", message)
    if match:
        return f"llama-server died: {_signal_name(int(match.group(1)))}"
    return message.splitlines()[0][:300]


def choose_backend(server: str, gguf: Path, preferred: str, port: int) -> tuple[str | None, dict[str, str]]:
    """The first CPU backend (the preferred one, then the others) whose server answers, and each probe's outcome;
    None when none runs here."""
    order = list(CPU_BACKENDS) if preferred == "auto" else [preferred]
    outcomes = {}
    for backend in order:
        reason = probe_backend(server, gguf, backend, port)
        outcomes[backend] = reason or "ok"
        if reason is None:
            return backend, outcomes
    return None, outcomes


def unavailable_reason(outcomes: dict[str, str]) -> str:
    return (f"llama-server runs with no CPU backend on this CPU ({' '.join(cpu_flags())}): "
            + "; ".join(f"{backend}: {outcome}" for backend, outcome in outcomes.items()))


@dataclass(frozen=True)
class LlamaCppPeer:
    """A llama-server ready to benchmark: the wrapper, the GGUF, the CPU backend that runs here."""
    server: str
    gguf: Path
    cpu_backend: str
    probes: dict[str, str]


def prepare_peer(model_dir: str, settings: LlamaCppSettings, port: int) -> LlamaCppPeer:
    """Install (once), convert (once) and probe; raises RuntimeError with a one-line reason when the peer cannot
    run here (no server, a model the converter does not take, no CPU backend this CPU can execute)."""
    from benchmarks.servers import llamacpp_server

    server = llamacpp_server()
    gguf = convert_to_gguf(model_dir, settings.weights, server)
    backend, probes = choose_backend(server, gguf, settings.cpu_backend, port)
    if backend is None:
        raise RuntimeError(unavailable_reason(probes))
    return LlamaCppPeer(server, gguf, backend, probes)
