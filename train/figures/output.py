"""Writing figures: the headless matplotlib backend, the file formats, and the sidecar JSON
of plotted values that goes next to every figure."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

FORMATS = ("png", "pdf", "svg")


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    try:
        import matplotlib
    except ImportError as error:
        raise ValueError("figures need matplotlib: pip install matplotlib "
                         "(or pip install -e .[train])") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def file_stem(*parts: str) -> str:
    """A file name from what the figure shows: '/' and other separators become '-'."""
    text = "_".join(p for p in parts if p)
    return re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9_.=+-]+", "-", text)).strip("-")


def _finite_or_none(value):
    # JSON has no NaN: a value nothing could be computed for is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def save_figure(fig, folder, stem: str, fmt: str, values: dict) -> Path:
    """Writes fig as folder/stem.fmt and the plotted values as folder/stem.json; closes fig
    and returns the figure's path."""
    if fmt not in FORMATS:
        raise ValueError(f"figure format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.{fmt}"
    fig.savefig(path, dpi=150, bbox_inches="tight")
    pyplot().close(fig)
    (folder / f"{stem}.json").write_text(json.dumps(_finite_or_none(values), indent=1) + "\n")
    return path
