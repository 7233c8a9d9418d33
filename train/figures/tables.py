"""`results --out DIR`: each table as Markdown and as a grouped bar chart, one group per
teacher/student pair and one bar per method, the measured mean with its std over seeds as
error bar beside the paper's published value (hatched)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

from ..results import ResultTable, format_tables
from .output import file_stem, pyplot, save_figure

MAX_WIDTH_INCHES = 30


def published_number(table: ResultTable, row: str, column: str) -> Optional[float]:
    """The paper's value of a cell where it reports a number (None: not recorded or n/a)."""
    value = table.published.get((row, column))
    if value is None:
        cell = table.cells.get((row, column))
        value = cell.published if cell is not None else None
    return float(value) if isinstance(value, (int, float)) else None


def table_values(table: ResultTable) -> dict:
    """What the chart draws, cell by cell (mean/std None: nothing measured; a method that
    does not apply to a pair has no cell)."""
    cells = []
    not_applicable = table.not_applicable
    for row in table.rows:
        for column in table.columns:
            if (row, column) in not_applicable:
                continue
            cell = table.cells.get((row, column))
            measured = list(cell.measured) if cell is not None else []
            cells.append({"row": row, "column": column, "measured": measured,
                          "mean": cell.mean if measured else None,
                          "std": cell.std if measured else None,
                          "published": published_number(table, row, column)})
    return {"table": table.name, "title": table.title, "rows": list(table.rows),
            "columns": list(table.columns), "cells": cells}


def plot_table(table: ResultTable, folder, fmt: str = "png") -> Path:
    plt = pyplot()
    values = table_values(table)
    cells = {(c["row"], c["column"]): c for c in values["cells"]}
    has_published = any(c["published"] is not None for c in values["cells"])
    slots = 2 if has_published else 1  # measured, then published, per method
    group = len(table.columns) * slots + 1  # one empty slot between pairs
    width = min(MAX_WIDTH_INCHES, max(6.0, 0.22 * group * len(table.rows) + 2))
    fig, ax = plt.subplots(figsize=(width, 4.2), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(table.columns) > len(colours):  # the tables' 17 methods: no colour twice
        colours = list(plt.get_cmap("tab20").colors)
    heights = [h for c in values["cells"] for h in (
        (c["mean"] - c["std"]) if c["mean"] is not None else None, c["published"])
        if h is not None]
    floor = max(0.0, math.floor(min(heights, default=0.0) - 5.0))
    missing_x = []
    labelled = set()  # each legend entry once, from the first bar drawn for it

    def label(text):
        if text in labelled:
            return None
        labelled.add(text)
        return text

    for j, column in enumerate(table.columns):
        colour = colours[j % len(colours)]
        for i, row in enumerate(table.rows):
            x = i * group + j * slots
            cell = cells.get((row, column))
            if cell is None:  # the method does not apply to this pair: an empty slot
                continue
            if cell["mean"] is not None:
                ax.bar(x, cell["mean"] - floor, bottom=floor, yerr=cell["std"], capsize=2,
                       color=colour, label=label(column))
            else:
                missing_x.append(x)
            if cell["published"] is not None:
                ax.bar(x + 1, cell["published"] - floor, bottom=floor, color=colour,
                       alpha=0.45, hatch="//", edgecolor="black", linewidth=0.3,
                       label=label(f"{column} (published)"))
    if missing_x:  # a cell nothing was measured for is marked, not drawn as zero
        ax.scatter(missing_x, [floor] * len(missing_x), marker="x", color="grey",
                   clip_on=False, zorder=3, label="not measured")
    centres = [i * group + (len(table.columns) * slots - 1) / 2 for i in range(len(table.rows))]
    ax.set_xticks(centres)
    ax.set_xticklabels(table.rows, fontsize=8)
    ax.set_ylim(bottom=floor)
    ax.set_ylabel("test top-1 %")
    ax.set_title(table.title + ("; hatched: published" if has_published else ""), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=max(1, len(table.columns) // 6 + 1), loc="upper left",
              bbox_to_anchor=(1.0, 1.0))
    stem = file_stem(table.name, "top1-measured-vs-published" if has_published
                     else "top1-measured")
    return save_figure(fig, folder, stem, fmt, values)


def write_table_files(tables: List[ResultTable], folder, fmt: str = "png") -> List[Path]:
    """Per table: TABLE.md and, where it has a value to draw, its bar chart; returns the
    paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for table in tables:
        markdown = folder / f"{file_stem(table.name)}.md"
        markdown.write_text(format_tables([table]) + "\n")
        paths.append(markdown)
        drawn = table_values(table)["cells"]
        if any(c["mean"] is not None or c["published"] is not None for c in drawn):
            paths.append(plot_table(table, folder, fmt))
    return paths
