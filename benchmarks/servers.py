"""Starting and stopping the OpenAI servers the serving benchmarks compare: aptserve's, vLLM's CPU build and
llama.cpp's llama-server.

Every server runs alone (started, measured, stopped before the next), in its own process group, with its output
in a log file. vLLM gets every core for its compute threads and its defaults otherwise (prefix caching, chunked
prefill, its compiled model); `eager=True` runs it with --enforce-eager, its other CPU mode. llama-server gets the
same cores, slots = max-num-seqs and a KV context of the same bytes, with the settings of benchmarks/_llamacpp.py.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks._llamacpp import LlamaCppSettings, context_tokens
from benchmarks.common import REPO_ROOT

SERVED_NAME = "default"
VLLM = "vllm"
VLLM_ENV_SCRIPT = REPO_ROOT / "benchmarks" / "vllm_cpu_env.sh"
LLAMACPP = "llamacpp"
LLAMACPP_ENV_SCRIPT = REPO_ROOT / "benchmarks" / "llamacpp_env.sh"


def vllm_python(explicit: str | None = None) -> str:
    """The interpreter of the vLLM venv (created on first use by vllm_cpu_env.sh)."""
    return explicit or _made_by(VLLM_ENV_SCRIPT)


def llamacpp_server(explicit: str | None = None) -> str:
    """The llama-server wrapper of the llama.cpp venv (created on first use by llamacpp_env.sh)."""
    return explicit or _made_by(LLAMACPP_ENV_SCRIPT)


def _made_by(env_script: Path) -> str:
    """The path a peer's set-up script prints last (it creates the peer's venv once, then only prints)."""
    done = subprocess.run(["bash", str(env_script)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{env_script.name} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def first_error_line(log_text: str) -> str:
    """The root cause (the first 'SomeError: ...' line) followed by the log's tail, for the JSON."""
    errors = [line for line in log_text.splitlines() if re.match(r"^\w+(Error|Exception): ", line)]
    return (errors[0] if errors else "no error line in the log") + "\nlog tail:\n" + log_text[-2000:]


def vllm_env(threads: int) -> dict:
    """All `threads` cores for vLLM's compute threads (its default keeps one back for its engine process)."""
    return {"VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


# A harness's --dtype choices for the servers it starts; "default" passes none (each server's own choice).
SERVED_DTYPES = ("float32", "bfloat16", "default")


def served_dtype(choice: str) -> str | None:
    """The dtype a server gets for a SERVED_DTYPES choice: None (no flag) for 'default'."""
    return None if choice == "default" else choice


def dtype_flag(dtype: str | None) -> list[str]:
    """`--dtype X`, or nothing for None: each server's own default (both resolve 'auto' from the checkpoint and the
    CPU), which is what a user comparing the two out of the box gets."""
    return ["--dtype", dtype] if dtype else []


def vllm_command(python: str, model_dir: str, kv_cache_memory: int, max_num_seqs: int, max_model_len: int,
                 port: int, threads: int, eager: bool = False, dtype: str | None = "float32") -> tuple[list[str], dict]:
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--served-model-name",
            SERVED_NAME, *dtype_flag(dtype), "--kv-cache-memory-bytes", str(kv_cache_memory),
            "--gpu-memory-utilization", "0.3", "--max-num-seqs", str(max_num_seqs), "--max-model-len",
            str(max_model_len), "--seed", "0", "--host", "127.0.0.1", "--port", str(port),
            "--disable-uvicorn-access-log"]
    return argv + (["--enforce-eager"] if eager else []), vllm_env(threads)


def aptserve_command(model: str, kv_cache_memory: int, max_num_seqs: int, max_model_len: int, port: int,
                     threads: int, scheduler: str | None = None, extra: list[str] | None = None,
                     python: str = sys.executable, dtype: str | None = "float32") -> tuple[list[str], dict]:
    argv = [python, "-m", "aptserve.cli", "serve", "--model", model, "--served-model-name", SERVED_NAME,
            *dtype_flag(dtype), "--kv-cache-memory", str(kv_cache_memory), "--max-num-seqs", str(max_num_seqs),
            "--max-model-len", str(max_model_len), "--host", "127.0.0.1", "--port", str(port),
            "--disable-uvicorn-access-log"]
    argv += (["--scheduler", scheduler] if scheduler else []) + (extra or [])
    return argv, {"APTSERVE_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}


def llamacpp_command(server: str, gguf: str, model_dir: str, kv_cache_memory: int, max_num_seqs: int,
                     max_model_len: int, port: int, threads: int, settings: LlamaCppSettings = LlamaCppSettings(),
                     cpu_backend: str = "auto") -> tuple[list[str], dict]:
    """llama-server's OpenAI server on `gguf`, served as SERVED_NAME: `threads` compute threads for decode and
    prefill, one slot per sequence, continuous batching, and a KV context (`-c`) of as many tokens as
    `kv_cache_memory` bytes hold at the KV type. Unified (-kvu), every slot may use the whole context, as in a
    paged pool; split (-no-kvu), each slot owns c / slots tokens, which must hold max_model_len. No prompt cache in
    RAM beyond the KV (-cram 0: that would be memory the other servers do not get), no web UI, and no fitting of
    unset values to memory (-fit off: the settings are the ones given)."""
    threads = settings.threads or threads
    slots = settings.slots or max_num_seqs
    context = context_tokens(kv_cache_memory, model_dir, settings)
    if context < max_model_len or (not settings.unified_kv and context // slots < max_model_len):
        per_slot = context if settings.unified_kv else context // slots
        raise ValueError(f"llama.cpp's context of {context} tokens gives each of {slots} slots {per_slot} tokens, "
                         f"under max-model-len {max_model_len}")
    argv = [server, "--model", str(gguf), "--alias", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
            "-t", str(threads), "-tb", str(threads), "--poll", str(settings.poll), "-np", str(slots),
            "-kvu" if settings.unified_kv else "-no-kvu", "-c", str(context), "-cb",
            "-fa", settings.flash_attn, "-ctk", settings.cache_type_k, "-ctv", settings.cache_type_v,
            "-b", str(settings.batch), "-ub", str(settings.ubatch), "-cram", "0", "-fit", "off", "--no-webui",
            "-lv", "4"]  # verbosity 4: the context, KV and thread lines settings_lines keeps
    if settings.cpu_strict:
        argv += ["--cpu-range", f"0-{threads - 1}", "--cpu-strict", "1"]
    return argv + list(settings.extra), {"LLAMACPP_CPU_BACKEND": cpu_backend}


def _exit_cleanly_on_sigterm() -> None:
    """A benchmark stopped by `timeout` or kill gets SIGTERM, whose default ends Python without running `finally`:
    the server (its own session, so not signalled with us) would run on and load the next measurement."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@contextlib.contextmanager
def running_server(name: str, argv: list[str], env: dict, log_dir: Path, port: int, timeout_s: float,
                   cwd: Path = REPO_ROOT):
    """Start a server in its own process group, wait until /health and /v1/models answer, stop the whole group."""
    _exit_cleanly_on_sigterm()
    log_path = log_dir / f"{name}.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, cwd=cwd,
                                   env={**os.environ, **env}, start_new_session=True)
    try:
        start_s = time.perf_counter()
        wait_ready(process, f"http://127.0.0.1:{port}", timeout_s, log_path)
        yield f"http://127.0.0.1:{port}", time.perf_counter() - start_s
    finally:
        stop(process)


# Startup log lines that show the settings a server really ran with (batching, blocks, threads).
SETTINGS_LINE = re.compile(r"non-default args|chunked prefill|max_num_batched_tokens|OpenMP thread|core ids|"
                           r"KV cache size|block_size|Torch threads|cache pool|system_info|llama_context: (n_ctx|"
                           r"n_ctx_seq|n_seq_max|n_batch|n_ubatch|flash_attn|kv_unified) |llama_kv_cache: size", re.IGNORECASE)


def settings_lines(log_path: Path, max_lines: int = 12) -> list[str]:
    lines = log_path.read_text(errors="replace").splitlines()
    return [line[-400:] for line in lines if SETTINGS_LINE.search(line)][:max_lines]


def wait_ready(process: subprocess.Popen, url: str, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited {process.returncode}: "
                               + first_error_line(log_path.read_text(errors="replace")))
        with contextlib.suppress(httpx.HTTPError):
            if all(httpx.get(url + path, timeout=5, trust_env=False).status_code == 200
                   for path in ("/health", "/v1/models")):
                return
        time.sleep(1)
    raise RuntimeError(f"server not ready after {timeout_s} s; log tail:\n"
                       + log_path.read_text(errors="replace")[-2000:])


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the group this script started (vLLM has child processes), then SIGKILL for any straggler."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(60)


def scrape(url: str, prefix: str = "aptserve:") -> dict[tuple[str, tuple], float]:
    """Samples of a server's /metrics whose names start with `prefix`: {(name, sorted labels): value}."""
    text = httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name.startswith(prefix)}
