"""Plots of a benchmark result (the JSON `aptserve bench` writes): SLO attainment vs request rate, one line per
server, and the CDFs of TTFT and per-request P99 TBT at one rate, with the SLOs and the target marked."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np

RULE_STYLES = {"attainment": ("-", "paper rule"), "attainment_vllm": (":", "vLLM rule")}


def cdf_rate(servers: dict[str, dict], target: float) -> float | None:
    """The rate the CDFs show: the highest rate every server was measured at where some server still reaches
    the target (the knee, where servers differ most); else the lowest common rate."""
    rate_sets = [{p["rate"] for p in s.get("points", [])} for s in servers.values()]
    common = sorted(set.intersection(*rate_sets)) if rate_sets else []
    if not common:
        return None
    passing = [rate for rate in common if any(p["rate"] == rate and (p["attainment"] or 0) >= target
                                              for s in servers.values() for p in s["points"])]
    return max(passing) if passing else common[0]


def _plot_attainment(ax, servers: dict[str, dict], target: float) -> None:
    for index, (name, server) in enumerate(servers.items()):
        points, color = server.get("points", []), f"C{index}"
        if not points:
            continue
        best = server["effective_throughput"]["paper"]["best_rate"]
        for key, (style, rule) in RULE_STYLES.items():
            label = f"{name} ({rule}" + (f", eff. {best:g}/s)" if key == "attainment" and best else ")")
            ax.plot([p["rate"] for p in points], [p[key] for p in points], style, marker="o", color=color,
                    label=label)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set(xlabel="request rate (req/s)", ylabel="SLO attainment", ylim=(-0.02, 1.02),
           title="SLO attainment vs rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _plot_cdf(ax, servers: dict[str, dict], rate: float, metric: str, slo_s: float, title: str) -> None:
    """Empirical CDF over all requests of the point at `rate`; failed requests count as never arriving, so a
    curve that stops below 1 shows the failures."""
    for index, (name, server) in enumerate(servers.items()):
        values = next((p["requests"][metric] for p in server.get("points", []) if p["rate"] == rate), None)
        if not values:
            continue
        finite = np.sort([v for v in values if v is not None and math.isfinite(v)])
        fractions = np.arange(1, len(finite) + 1) / len(values)
        ax.step(finite, fractions, where="post", color=f"C{index}", label=name)
    ax.axvline(slo_s, color="grey", linestyle="--", linewidth=1, label=f"SLO {slo_s:.3g} s")
    ax.set(xlabel="seconds (log)", ylabel="fraction of requests", ylim=(0, 1.02), xscale="log",
           title=f"{title} at {rate:g} req/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_results(path: str | Path, result: dict) -> Path:
    """A PNG with three panels: attainment vs rate, TTFT CDF, P99 TBT CDF."""
    import matplotlib
    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt

    servers, slo, target = result["servers"], result["slo"], result["config"]["target"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    _plot_attainment(axes[0], servers, target)
    rate = cdf_rate(servers, target)
    if rate is not None:
        _plot_cdf(axes[1], servers, rate, "ttft_s", slo["ttft_slo_s"], "TTFT CDF")
        _plot_cdf(axes[2], servers, rate, "p99_tbt_s", slo["tbt_slo_s"], "per-request P99 TBT CDF")
    fig.suptitle("\n".join(textwrap.wrap(result.get("title", ""), 160)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
