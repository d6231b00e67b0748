"""Small helpers shared by the benchmark scripts: JSON results with machine info and git commit, PNG charts.

Results are only comparable when taken side by side in one run on one machine, so every JSON carries
the machine, the library versions and the commit it was measured on.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path

from aptserve.bench.cli import load_average  # noqa: F401 - one definition, re-exported for the scripts

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def git_commit() -> dict:
    """HEAD's hash and whether the tree had local changes (a dirty tree means HEAD is not the whole story)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD") or None,
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    except (ValueError, OSError):
        return None


def fp32_kv_bytes_per_token(model_dir: str) -> int:
    """K and V rows of every layer for one token in float32: what aptserve's KV kind and vLLM both store."""
    from aptserve.registry import load_model_config
    from aptserve.cache.geometry import bytes_per_unit

    return 2 * bytes_per_unit(load_model_config(model_dir), block_size=1, dtype="float32")


def cpu_snapshot() -> dict:
    """Core-seconds the whole machine and this process (with its waited-for children) have been busy."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    ticks = os.sysconf("SC_CLK_TCK")
    times = os.times()
    return {"machine_busy_s": (sum(fields[:8]) - idle) / ticks, "wall_s": time.monotonic(),
            "own_s": times.user + times.system + times.children_user + times.children_system}


def other_cpu_fraction(before: dict, after: dict) -> float:
    """Share of the machine's cores that other processes used between two snapshots (0 = undisturbed)."""
    other_s = (after["machine_busy_s"] - before["machine_busy_s"]) - (after["own_s"] - before["own_s"])
    capacity_s = (after["wall_s"] - before["wall_s"]) * (os.cpu_count() or 1)
    return round(max(other_s, 0.0) / capacity_s, 3) if capacity_s > 0 else 0.0


def wait_until_idle(max_busy: float, timeout_s: float, log=print) -> float:
    """Wait (at most timeout_s) until other processes use under `max_busy` of the cores over 3 s;
    on a small shared machine any other work skews timings badly. Returns the last busy share."""
    start = time.monotonic()
    last_log = start - 60
    while True:
        before = cpu_snapshot()
        time.sleep(3.0)
        busy = other_cpu_fraction(before, cpu_snapshot())
        now = time.monotonic()
        if busy < max_busy or now - start >= timeout_s:
            return busy
        if now - last_log >= 30:
            log(f"other processes use {busy:.0%} of the CPUs; waiting (up to {timeout_s - (now - start):.0f} s more)")
            last_log = now


# Vector and matrix extensions that decide which kernels run (oneDNN's packed GEMMs, bf16 paths).
ISA_FLAG = re.compile(r"^(avx\w*|amx\w*|fma|f16c|sse4_2|vnni\w*)$")


def cpu_flags() -> list[str]:
    """The CPU's vector ISA flags from /proc/cpuinfo (machines here differ: some AVX-512 with bf16, some AVX2)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(flag for flag in line.split(":", 1)[1].split() if ISA_FLAG.match(flag))
    except OSError:
        pass
    return []


def machine_info() -> dict:
    info = {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "num_cpus": os.cpu_count(),
            "memory_gib": total_memory_gib(), "platform": platform.platform(), "python": platform.python_version(),
            "load_average": load_average()}
    try:
        import torch

        from aptserve.model.linear import can_pack
        info.update(torch=torch.__version__, torch_num_threads=torch.get_num_threads(),
                    cuda_available=torch.cuda.is_available(),
                    onednn_packed_fp32=can_pack(torch.empty(0)),
                    onednn_packed_bf16=can_pack(torch.empty(0, dtype=torch.bfloat16)))
    except ImportError:
        pass
    return info


def write_json(path: str | Path, payload: dict) -> Path:
    """Write `payload` plus machine info, git commit and a UTC timestamp; written via a temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(), "git": git_commit(), **payload}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return path


def bar_chart(path: str | Path, labels: list[str], values: list[float], *, title: str, ylabel: str,
              annotations: list[str] | None = None, footnote: str = "") -> Path:
    """One bar per label, each with its value (and an optional note such as a ratio) printed on top;
    `footnote` (e.g. which system failed) goes under the axes."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(labels) + 2), 4.5))
    bars = ax.bar(labels, values, color=plt.cm.tab10.colors[:len(labels)])
    notes = annotations or [""] * len(values)
    for bar, value, note in zip(bars, values, notes):
        ax.annotate((f"{value:,.0f}" if value >= 100 else f"{value:.3g}") + (f"\n{note}" if note else ""),
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=9)
    ax.set_title("\n".join(textwrap.wrap(title, 75)), fontsize=10)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(values, default=1) * 1.25 or 1)
    ax.grid(axis="y", alpha=0.3)
    if footnote:
        fig.text(0.01, 0.01, "\n".join(textwrap.wrap(footnote, 110)), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.06 if footnote else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_figure(fig, path: str | Path, title: str) -> None:
    """Give a finished multi-panel figure its title, lay it out, write it and free it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
