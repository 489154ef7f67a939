"""A PNG bar chart of stored runs: one bar per run and score, with 95%
confidence intervals (1.96 standard errors) where the score has one."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lanner.evals.results import RunRecord


def bar_chart(runs: list[RunRecord], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(k for r in runs for k in r.metrics))
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(keys) * len(runs)), 4))
    for i, run in enumerate(runs):
        values = [run.metrics.get(k, {}).get("value", 0.0) for k in keys]
        errors = [1.96 * (run.metrics.get(k, {}).get("stderr") or 0.0) for k in keys]
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(keys))]
        bars = ax.bar(xs, values, width, yerr=errors, capsize=4,
                      label=f"{run.model} ({run.backend}) {run.id[:8]}")
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax.set_xticks(range(len(keys)), keys)
    tasks = ", ".join(dict.fromkeys(r.task for r in runs))
    ax.set_title(f"{tasks}: scores with 95% confidence intervals")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
