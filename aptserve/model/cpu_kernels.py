"""Our C++ CPU kernels (csrc/), compiled once per machine with its own vector ISA, or None where they cannot be.

torch's JIT extension builder compiles them at first use (ninja and a C++ compiler; about a minute on 2 cores)
into $APTSERVE_CACHE_DIR/kernels/, one build per torch version and CPU feature set, so a cache shared between
machines never runs code built for another CPU. Anything that stops the build (no compiler, another
architecture, APTSERVE_CPU_KERNELS=0) leaves the plain torch path in use; the engine says so once.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
from pathlib import Path

import torch

from aptserve.paths import cache_dir

logger = logging.getLogger(__name__)

DISABLE_ENV = "APTSERVE_CPU_KERNELS"
CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "paged_decode.cpp", CSRC / "bindings.cpp"]
HEADERS = [CSRC / "attention_common.h"]


CFLAGS = ["-O3", "-ffast-math", "-fopenmp"]  # -fopenmp for at::parallel_for's pragmas; torch's runtime at link


def _cpu_signature() -> str:
    flags = ""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    source = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    build = f"{torch.__version__} {' '.join(CFLAGS)}".encode()
    digest = hashlib.sha256(flags.encode() + source + build).hexdigest()[:12]
    return f"{platform.machine()}-{digest}"


@functools.cache
def cpu_kernels():
    """The compiled module, or None (the torch fallback is used)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        logger.info("CPU kernels disabled (%s=0): torch's attention path is used", DISABLE_ENV)
        return None
    if platform.machine() not in ("x86_64", "AMD64", "aarch64"):
        return None
    try:
        from torch.utils.cpp_extension import load

        # The JIT builder runs `ninja` from PATH; the venv's own may not be on it when python is called by path.
        os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
        build_dir = cache_dir() / "kernels" / _cpu_signature()
        build_dir.mkdir(parents=True, exist_ok=True)
        march = ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else ["-mcpu=native"]
        return load(name="aptserve_cpu_kernels", sources=[str(path) for path in SOURCES],
                    extra_cflags=[*CFLAGS, *march], extra_include_paths=[str(CSRC)],
                    build_directory=str(build_dir), verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means the fallback, said once
        logger.warning("CPU kernels unavailable (%s: %s); torch's attention path is used", type(exc).__name__,
                       str(exc).splitlines()[0] if str(exc) else "")
        return None
