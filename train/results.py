"""`results`: the paper's tables from the run folders of `run`: the final test top-1 of each
seed's run, mean +- std over seeds, one row per teacher/student pair, one column per method.

`collect_tables` gives the tables as data (`ResultTable`), for the printout here and for
anything else that reports them (Markdown files, figures)."""
from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .configs import CONFIGS, METHODS as METHOD_ORDER, TABLES
from .runs import run_folder_name


@dataclass
class Cell:
    measured: List[float] = field(default_factory=list)  # final test top-1 %, one per seed
    published: Optional[float] = None  # the paper's value, where it reports one

    @property
    def mean(self) -> Optional[float]:
        return statistics.mean(self.measured) if self.measured else None

    @property
    def std(self) -> Optional[float]:
        if not self.measured:
            return None
        return statistics.stdev(self.measured) if len(self.measured) > 1 else 0.0


@dataclass
class ResultTable:
    name: str  # a key of configs.TABLES
    rows: List[str]  # "teacher -> student"
    columns: List[str]  # methods ("method transfer-set" for linear probes), in table order
    cells: Dict[Tuple[str, str], Cell]  # (row, column) -> cell; absent: never run

    @property
    def title(self) -> str:
        return f"{self.name} (final test top-1 %, mean +- std over seeds)"


def final_accuracy(folder: Path) -> Optional[float]:
    """Test top-1 of a run folder's last finished epoch (None before the first)."""
    log = folder / "log.csv"
    if not log.exists():
        return None
    with open(log) as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["test_acc"]) if rows else None


def collect_tables(runs: Path) -> List[ResultTable]:
    """The tables with at least one finished run under `runs`, in TABLES order."""
    cells: Dict[Tuple[str, str, str], Cell] = {}  # (table, pair, column)
    for config in CONFIGS.values():
        for folder in sorted(runs.glob(run_folder_name(config.name, "*"))):
            accuracy = final_accuracy(folder)
            if accuracy is None:
                continue
            pair = f"{config.teacher} -> {config.student}"
            columns = {config.method: accuracy}
            for transfer_set in config.transfer_sets:
                probe_file = folder / f"probe-{transfer_set}.json"
                if probe_file.exists():
                    columns[f"{config.method} {transfer_set}"] = json.loads(
                        probe_file.read_text())["test_acc"]
            for column, value in columns.items():
                cells.setdefault((config.table, pair, column), Cell()).measured.append(value)
    tables = []
    for table in TABLES:
        keys = [k for k in cells if k[0] == table]
        if not keys:
            continue
        columns = sorted({k[2] for k in keys}, key=lambda c: (
            METHOD_ORDER.index(c.split()[0]), c))
        rows = list(dict.fromkeys(k[1] for k in keys))
        tables.append(ResultTable(name=table, rows=rows, columns=columns,
                                  cells={(k[1], k[2]): cells[k] for k in keys}))
    return tables


def format_tables(tables: List[ResultTable]) -> str:
    """Markdown tables: "mean +- std (seeds)" per cell, "-" where nothing was run."""
    lines = []
    for table in tables:
        lines += [f"\n{table.title}\n",
                  "| teacher -> student | " + " | ".join(table.columns) + " |",
                  "|---" * (len(table.columns) + 1) + "|"]
        for pair in table.rows:
            row = []
            for column in table.columns:
                cell = table.cells.get((pair, column))
                if cell is None or not cell.measured:
                    row.append("-")
                    continue
                row.append(f"{cell.mean:.2f} +- {cell.std:.2f} ({len(cell.measured)})")
            lines.append(f"| {pair} | " + " | ".join(row) + " |")
    return "\n".join(lines).lstrip("\n")


def results_tables(runs: Path) -> str:
    tables = collect_tables(runs)
    return format_tables(tables) if tables else f"no finished runs under {runs}"
