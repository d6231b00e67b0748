"""Our C++ CPU kernels (csrc/), compiled once per machine with its own vector ISA, or None where they cannot be.

`make` compiles them with torch's JIT extension builder (`python -m aptserve.model.cpu_kernels build`: ninja and
a C++ compiler, about two minutes on 2 busy cores); first use compiles them the same way for anyone who skipped
make. Either puts them in $APTSERVE_CACHE_DIR/kernels/, one build per torch version and CPU feature set, so a cache
shared between machines never runs code built for another CPU. Anything that stops the build (no compiler, another
architecture, APTSERVE_CPU_KERNELS=0) leaves the plain torch path in use; the engine says so once.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from aptserve.paths import cache_dir

logger = logging.getLogger(__name__)

DISABLE_ENV = "APTSERVE_CPU_KERNELS"
CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "paged_decode.cpp", CSRC / "prefill_attention.cpp", CSRC / "rms_norm.cpp", CSRC / "bindings.cpp"]
HEADERS = [CSRC / "attention_common.h"]
MODULE_NAME = "aptserve_cpu_kernels"


CFLAGS = ["-O3", "-ffast-math", "-fopenmp"]  # -fopenmp for at::parallel_for's pragmas; torch's runtime at link


def _cpu_flags_line() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return ""


def _cpu_signature() -> str:
    source = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    # torch's version from its metadata (the same string as torch.__version__): `make` asks without importing torch.
    build = f"{importlib.metadata.version('torch')} {' '.join(CFLAGS)}".encode()
    digest = hashlib.sha256(_cpu_flags_line().encode() + source + build).hexdigest()[:12]
    return f"{platform.machine()}-{digest}"


def _build_dir() -> Path:
    return cache_dir() / "kernels" / _cpu_signature()


def _vector_isa() -> str:
    """The widest vector extension -march=native uses here, for people to read (the signature is the key)."""
    flags = set(_cpu_flags_line().split())
    return next((isa for isa in ("avx512f", "avx2", "avx") if isa in flags), "")


def _skip_reason() -> str | None:
    """Why the kernels are not wanted here at all (not a failure: said quietly)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return f"disabled by {DISABLE_ENV}=0"
    if platform.machine() not in ("x86_64", "AMD64", "aarch64"):
        return f"no kernels for {platform.machine()}"
    return None


def _put_venv_bin_on_path() -> None:
    """The JIT builder runs `ninja` from PATH; the venv's own is not on it when python is called by path."""
    venv_bin = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if venv_bin not in path.split(os.pathsep):
        os.environ["PATH"] = venv_bin + os.pathsep + path


def _missing_tool() -> str | None:
    """What the build needs and cannot find, said plainly (torch's own error is a traceback deep in the build)."""
    from torch.utils.cpp_extension import get_cxx_compiler

    _put_venv_bin_on_path()
    if shutil.which(get_cxx_compiler()) is None:
        return f"no C++ compiler ({get_cxx_compiler()}) on PATH"
    if shutil.which("ninja") is None:
        return "no ninja on PATH"
    return None


@contextlib.contextmanager
def _exclusive_build(build_dir: Path):
    """One builder at a time per build folder, by a lock the kernel drops when its holder dies. torch's own lock is
    a plain file that a killed build leaves behind, and every later load waits on it forever; under ours, any such
    file is a leftover and is removed."""
    with open(build_dir.with_name(build_dir.name + ".build-lock"), "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _load_kernels():
    """Compiles into _build_dir() unless a build of the same sources and flags is there (ninja then does nothing)."""
    from torch.utils.cpp_extension import load

    _put_venv_bin_on_path()
    build_dir = _build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    march = ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else ["-mcpu=native"]
    with _exclusive_build(build_dir):
        return load(name=MODULE_NAME, sources=[str(path) for path in SOURCES], extra_cflags=[*CFLAGS, *march],
                    extra_include_paths=[str(CSRC)], build_directory=str(build_dir), verbose=False)


def _describe(exc: Exception) -> str:
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first_line}"


@functools.cache
def cpu_kernels():
    """The compiled module, or None (the torch fallback is used)."""
    reason = _skip_reason()
    if reason is not None:
        logger.info("CPU kernels off (%s): torch's attention path is used", reason)
        return None
    missing = _missing_tool()
    if missing is not None:
        logger.warning("CPU kernels unavailable (%s); torch's attention path is used", missing)
        return None
    try:
        return _load_kernels()
    except Exception as exc:  # noqa: BLE001 - any build failure means the fallback, said once
        logger.warning("CPU kernels unavailable (%s); torch's attention path is used", _describe(exc))
        return None


def _is_built(build_dir: Path) -> bool:
    """Whether cpu_kernels() would only load the library: ninja has nothing to do. Asked without torch, whose
    import would be most of an up-to-date `make`'s time."""
    _put_venv_bin_on_path()
    ninja = shutil.which("ninja")
    if ninja is None or not (build_dir / f"{MODULE_NAME}.so").exists():
        return False
    dry_run = subprocess.run([ninja, "-n", "-C", str(build_dir)], capture_output=True, text=True)
    return dry_run.returncode == 0 and "no work to do" in dry_run.stdout


def build_cpu_kernels() -> str:
    """Builds the kernels now where cpu_kernels() will load them from, so serving never waits on a compiler;
    returns one line saying what happened. Never raises: without kernels the torch path still serves."""
    build_dir, reason = _build_dir(), _skip_reason()
    if reason is None and _is_built(build_dir):
        return f"CPU kernels: up to date ({build_dir})"
    reason = reason or _missing_tool()
    if reason is None:
        start = time.perf_counter()
        try:
            _load_kernels()
        except Exception as exc:  # noqa: BLE001 - reported in the line; make goes on
            reason = _describe(exc)
        else:
            target = " ".join(filter(None, [platform.machine(), _vector_isa()]))
            return f"CPU kernels: built for {target} in {time.perf_counter() - start:.0f} s ({build_dir})"
    return f"CPU kernels: not built ({reason}): the torch attention path will be used"


def main(argv: list[str] | None = None) -> int:
    """`python -m aptserve.model.cpu_kernels build`, what `make` runs: exits 0 even without kernels."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["build"]:
        print("usage: python -m aptserve.model.cpu_kernels build")
        return 2
    print(build_cpu_kernels())
    return 0


if __name__ == "__main__":
    sys.exit(main())
