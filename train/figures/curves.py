"""`plot`: the curves of one or more runs from their log.csv, on one figure so that methods
can be compared: train loss per term, test top-1, learning rate."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List

from .. import run_folder
from ..run_folder import LOG
from .output import file_stem, pyplot, save_figure
from .run_folders import describe_run, run_labels

# log.csv columns that are not loss terms (engine.fit writes one row per epoch).
NON_LOSS_COLUMNS = ("epoch", "test_acc", "lr", "seconds")
LINE_STYLES = ("-", "--", ":", "-.")


def read_log(folder) -> Dict[str, List[float]]:
    """A run's log.csv as columns of floats (NaN where a row has no value)."""
    if not (Path(folder) / LOG).is_file():
        raise FileNotFoundError(f"{folder} has no {LOG} (not a run folder, or no epoch "
                                f"finished yet)")
    rows = run_folder.read_log(folder)
    if not rows:
        raise ValueError(f"{Path(folder) / LOG} has no finished epoch yet")
    return {c: [r[c] for r in rows] for c in rows[0]}


def loss_terms(log: Dict[str, List[float]]) -> List[str]:
    """The total ("loss") first, then the method's terms (ce, kd, icd, ...)."""
    terms = [c for c in log if c not in NON_LOSS_COLUMNS]
    return sorted(terms, key=lambda c: (c != "loss", c))


def plot_curves(folders, out, fmt: str = "png", name: str = None) -> Path:
    plt = pyplot()
    folders = [Path(f) for f in folders]
    logs = [read_log(f) for f in folders]
    labels = run_labels([describe_run(f) for f in folders])
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(14, 3.8),
                                                 constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    values = {"runs": []}
    for i, (folder, label, log) in enumerate(zip(folders, labels, logs)):
        colour = colours[i % len(colours)]
        epochs = log["epoch"]
        terms = loss_terms(log)
        for j, term in enumerate(terms):
            ax_loss.plot(epochs, log[term], color=colour, linestyle=LINE_STYLES[j % 4],
                         label=f"{label}: {term}")
        if "test_acc" in log:
            ax_acc.plot(epochs, log["test_acc"], color=colour, label=label)
        if "lr" in log:
            ax_lr.plot(epochs, log["lr"], color=colour, label=label)
        values["runs"].append({"label": label, "folder": str(folder), "epoch": epochs,
                               "train_loss": {t: log[t] for t in terms},
                               "test_top1": log.get("test_acc"), "lr": log.get("lr")})
    ax_loss.set_title("train loss per term (epoch mean)", fontsize=9)
    ax_acc.set_title("test top-1 %", fontsize=9)
    ax_lr.set_title("learning rate", fontsize=9)
    if all(v > 0 for log in logs for v in log.get("lr", []) if math.isfinite(v)):
        ax_lr.set_yscale("log")  # step schedules are decades apart
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    stem = file_stem("curves", name or "-vs-".join(labels))
    if len(stem) > 150:  # many runs: the folder count instead of every label
        stem = file_stem("curves", f"{len(folders)}-runs", name or "")
    return save_figure(fig, out, stem, fmt, values)

