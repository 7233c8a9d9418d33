"""Figure 2 of the paper: top-1 against one loss weight, mean +- std over seeds, from the
points train/sweeps.py collects."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

from .output import file_stem, pyplot, save_figure


def spans_decades(values: Sequence[float]) -> bool:
    """A log axis where all values are positive and the largest is >= 100 x the smallest."""
    return min(values) > 0 and max(values) / min(values) >= 100


def plot_sweep(config: str, name: str, symbol: str, points: List[dict], folder,
               fmt: str = "png") -> Path:
    """points: [{"value", "mean", "std", ...}] of collect_sweep; symbol: the axis label."""
    plt = pyplot()
    measured = [p for p in points if p["mean"] is not None]
    log_axis = spans_decades([p["value"] for p in points])
    fig, ax = plt.subplots(figsize=(5, 3.6), constrained_layout=True)
    ax.errorbar([p["value"] for p in measured], [p["mean"] for p in measured],
                yerr=[p["std"] for p in measured], marker="o", capsize=3)
    if log_axis:
        ax.set_xscale("log")
    missing = [p["value"] for p in points if p["mean"] is None]
    if missing:  # cells without a finished run are named, not drawn
        ax.text(0.01, 0.01, "not run: " + ", ".join(f"{v:g}" for v in missing),
                transform=ax.transAxes, fontsize=7, color="grey")
    ax.set_xlabel(symbol)
    ax.set_ylabel("test top-1 % (mean ± std over seeds)")
    ax.set_title(config, fontsize=9)
    ax.grid(alpha=0.3)
    values = {"config": config, "parameter": name, "log_axis": log_axis, "points": points}
    return save_figure(fig, folder, file_stem(config.replace("/", "_"), f"top1-vs-{name}"),
                       fmt, values)
