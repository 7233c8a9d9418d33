"""`results`: the paper's tables from the run folders of `run`: the final test top-1 of each
seed's run, mean +- std over seeds, beside the paper's published value
(train/published_results.json), in the paper's layout: one column per teacher/student
pair, one row per method (the teacher first), every cell of the table shown, those not run
marked as such.

`collect_tables` gives the tables as data (`ResultTable`), for the printout here and for
anything else that reports them (Markdown files, figures)."""
from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple, Union

from .configs import CONFIGS, TABLE_METHODS, TABLES
from .run_folder import RunFolderError, finished_log
from .published import NOT_APPLICABLE, published_value
from .runs import run_folder_name, teacher_run_folder

TEACHER = "teacher"  # the column (printed as the first row) of the teachers' own accuracy


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
    rows: List[str]  # "teacher -> student", every pair of the table
    # "teacher", then the table's methods ("method transfer-set" for linear probes)
    columns: List[str]
    cells: Dict[Tuple[str, str], Cell]  # (row, column) -> cell; absent: never run
    # (row, column) -> the paper's value: a float, None (not recorded) or "n/a"
    published: Dict[Tuple[str, str], Union[float, str, None]] = field(default_factory=dict)
    not_applicable: Set[Tuple[str, str]] = field(default_factory=set)  # no config

    @property
    def title(self) -> str:
        return f"{self.name} (final test top-1 %, mean +- std over seeds)"


def final_accuracy(folder: Path) -> Optional[float]:
    """Test top-1 of a run folder's last epoch, or None while the run has not finished all
    the epochs its run.json asks for (interrupted runs are not results)."""
    rows = finished_log(folder)
    return rows[-1]["test_acc"] if rows is not None else None


def _reported_accuracy(folder: Path) -> Optional[float]:
    """final_accuracy, with a damaged folder reported on stderr and skipped: one bad folder
    does not stop the tables."""
    try:
        return final_accuracy(folder)
    except RunFolderError as error:
        print(f"warning: skipped {folder}: {error}", file=sys.stderr)
        return None


def pair_label(teacher: str, student: str) -> str:
    return f"{teacher} -> {student}"


def _table_columns(table: str) -> List[str]:
    columns = [TEACHER]
    transfer_sets = next((c.transfer_sets for c in CONFIGS.values() if c.table == table), ())
    for method in TABLE_METHODS[table]:
        columns += [method] + [f"{method} {s}" for s in transfer_sets]
    return columns


def _measured_cells(runs: Path) -> Dict[Tuple[str, str, str], Cell]:
    """(table, pair, column) -> the finished runs' accuracies."""
    cells: Dict[Tuple[str, str, str], Cell] = {}
    for config in CONFIGS.values():
        for folder in sorted(runs.glob(run_folder_name(config.name, "*"))):
            accuracy = _reported_accuracy(folder)
            if accuracy is None:
                continue
            pair = pair_label(config.teacher, config.student)
            columns = {config.method: accuracy}
            for transfer_set in config.transfer_sets:
                probe_file = folder / f"probe-{transfer_set}.json"
                if probe_file.exists():
                    try:
                        columns[f"{config.method} {transfer_set}"] = float(json.loads(
                            probe_file.read_text())["test_acc"])
                    except (OSError, ValueError, KeyError, TypeError):
                        print(f"warning: skipped {probe_file}: not the JSON `run` writes",
                              file=sys.stderr)
            for column, value in columns.items():
                cells.setdefault((config.table, pair, column), Cell()).measured.append(value)
    for table, (dataset, pairs) in TABLES.items():
        for teacher, student in pairs:  # the teacher `run` trained for the table's configs
            accuracy = _reported_accuracy(teacher_run_folder(runs, dataset, teacher))
            if accuracy is not None:
                cells[(table, pair_label(teacher, student), TEACHER)] = Cell([accuracy])
    return cells


def collect_tables(runs: Path) -> List[ResultTable]:
    """Every table of configs.TABLES, with the finished runs under `runs` and the paper's
    values."""
    measured = _measured_cells(runs)
    tables = []
    for table, (_, pairs) in TABLES.items():
        columns = _table_columns(table)
        result = ResultTable(name=table, rows=[pair_label(t, s) for t, s in pairs],
                             columns=columns, cells={})
        for teacher, student in pairs:
            row = pair_label(teacher, student)
            for column in columns:
                value = published_value(table, teacher, student, column)
                result.published[(row, column)] = value
                if value == NOT_APPLICABLE:
                    result.not_applicable.add((row, column))
                cell = measured.get((table, row, column))
                if cell is not None:
                    cell.published = value if isinstance(value, float) else None
                    result.cells[(row, column)] = cell
        tables.append(result)
    return tables


def format_cell(table: ResultTable, row: str, column: str) -> str:
    """"mean +- std (n) / paper P"; "not run" where no seed finished; "n/a" where the
    method does not apply; the paper's value is "n/r" where it is not recorded."""
    if (row, column) in table.not_applicable:
        return "n/a"
    cell = table.cells.get((row, column))
    ours = (f"{cell.mean:.2f} +- {cell.std:.2f} ({len(cell.measured)})"
            if cell is not None and cell.measured else "not run")
    paper = table.published.get((row, column))
    return f"{ours} / {'n/r' if paper is None else f'{paper:.2f}'}"


def format_tables(tables: List[ResultTable]) -> str:
    """Markdown tables in the paper's layout: a column per teacher/student pair, a row per
    method; each cell "ours (seeds) / paper"."""
    lines = []
    for table in tables:
        lines += [f"\n{table.title}; each cell: ours (seeds) / paper's value\n",
                  "| method | " + " | ".join(table.rows) + " |",
                  "|---" * (len(table.rows) + 1) + "|"]
        for column in table.columns:
            lines.append(f"| {column} | " + " | ".join(
                format_cell(table, row, column) for row in table.rows) + " |")
    return "\n".join(lines).lstrip("\n")


def results_tables(runs: Path, tables: Optional[List[ResultTable]] = None) -> str:
    """The printout of `tables` (default: collect_tables(runs))."""
    tables = collect_tables(runs) if tables is None else tables
    note = "" if any(t.cells for t in tables) else f"no finished runs under {runs}\n\n"
    return note + format_tables(tables)
