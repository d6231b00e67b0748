"""What this machine computes natively, and the dtype `--dtype auto` resolves to on it (as vLLM resolves it).

Machines here differ (some AMD EPYC with AVX-512 and avx512_bf16, some AVX2 only), so the choice is made from the
CPU's own flags at start-up, never assumed: bf16 arithmetic only where the CPU has it (avx512_bf16 or AMX on x86,
the bf16 extension on Arm); elsewhere torch would emulate it, slower than float32.
"""
from __future__ import annotations

import functools
from pathlib import Path

# x86 flags (/proc/cpuinfo "flags") and Arm features ("Features") of native bf16 dot products.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not readable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_computes_bf16() -> bool:
    return bool(cpu_flags() & BF16_FLAGS)


def auto_dtype(checkpoint_dtype: str, device: str) -> tuple[str, str]:
    """(the dtype `--dtype auto` runs a checkpoint of `checkpoint_dtype` in on `device`, why). Like vLLM: a float32
    checkpoint runs in the device's preferred half type where it has one; on a CPU that is bf16 where the CPU
    computes it natively (float16 checkpoints too: CPUs have no fast float16), float32 elsewhere."""
    if device.startswith("cuda"):
        import torch

        half = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        if checkpoint_dtype == "float32" or (checkpoint_dtype == "bfloat16" and half == "float16"):
            return half, f"the checkpoint's {checkpoint_dtype} in the GPU's preferred {half}"
        return checkpoint_dtype, "the checkpoint's own dtype"
    if cpu_computes_bf16():
        return "bfloat16", f"the checkpoint is {checkpoint_dtype}; this CPU computes bf16 natively"
    return "float32", f"the checkpoint is {checkpoint_dtype}; this CPU has no native bf16 (no avx512_bf16 or AMX)"
