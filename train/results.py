"""`results`: the paper's tables from the run folders of `run`: the final test top-1 of each
seed's run, mean +- std over seeds, beside the value the ICD paper prints
(train/published_results.json), in the paper's layout: one column per teacher/student
pair, one row per method (the teacher first), every cell of the table shown, those not run
marked as such; then the paper's headline metric, the average relative improvement over KD,
from the measured runs and from the paper's values.

`collect_tables` gives the tables as data (`ResultTable`), for the printout here and for
anything else that reports them (Markdown files, figures)."""
from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple

from .configs import CONFIGS, TABLE_METHODS, TABLES, applies
from .published import published_headline, published_number
from .run_folder import (RunFolderError, finished_log, read_probe_result, run_folder_name,
                         teacher_run_folder)
from .stats import mean_and_std

TEACHER = "teacher"  # the column (printed as the first row) of the teachers' own accuracy


@dataclass
class Cell:
    measured: List[float] = field(default_factory=list)  # final test top-1 %, one per seed
    published: Optional[float] = None  # the paper's value, where it reports one

    @property
    def mean(self) -> Optional[float]:
        return mean_and_std(self.measured)[0]

    @property
    def std(self) -> Optional[float]:
        return mean_and_std(self.measured)[1]


@dataclass
class ResultTable:
    name: str  # a key of configs.TABLES
    rows: List[str]  # "teacher -> student", every pair of the table
    # "teacher", then the table's methods ("method transfer-set" for linear probes)
    columns: List[str]
    cells: Dict[Tuple[str, str], Cell]  # (row, column) -> cell; absent: never run
    # (row, column) -> the paper's value: a float, or None where it reports none
    published: Dict[Tuple[str, str], Optional[float]] = field(default_factory=dict)
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


def _probe_accuracy(folder: Path, transfer_set: str) -> Optional[float]:
    """The test top-1 the folder's linear probe recorded, or None where there is none; a
    damaged record is reported on stderr and skipped."""
    try:
        record = read_probe_result(folder, transfer_set)
    except RunFolderError as error:
        print(f"warning: skipped {error}", file=sys.stderr)
        return None
    return record["test_acc"] if record is not None else None


def pair_label(teacher: str, student: str) -> str:
    return f"{teacher} -> {student}"


def _transfer_sets(table: str) -> Tuple[str, ...]:
    return next((c.transfer_sets for c in CONFIGS.values() if c.table == table), ())


def _table_columns(table: str) -> List[str]:
    columns = []
    for method in (TEACHER, *TABLE_METHODS[table]):
        columns += [method] + [f"{method} {s}" for s in _transfer_sets(table)]
    return columns


def _column_method(column: str) -> str:
    """The method of a column ("kd stl10" -> "kd")."""
    return column.split(" ")[0]


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
                probed = _probe_accuracy(folder, transfer_set)
                if probed is not None:
                    columns[f"{config.method} {transfer_set}"] = probed
            for column, value in columns.items():
                cells.setdefault((config.table, pair, column), Cell()).measured.append(value)
    for table, (dataset, pairs) in TABLES.items():
        for teacher, student in pairs:  # the teacher `run` trained for the table's configs
            pair = pair_label(teacher, student)
            accuracy = _reported_accuracy(teacher_run_folder(runs, dataset, teacher))
            if accuracy is not None:
                cells[(table, pair, TEACHER)] = Cell([accuracy])
            for transfer_set in _transfer_sets(table):  # probed once per teacher
                probed = _probe_accuracy(teacher_run_folder(runs, dataset, teacher),
                                         transfer_set)
                if probed is not None:
                    cells[(table, pair, f"{TEACHER} {transfer_set}")] = Cell([probed])
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
                value = published_number(table, teacher, student, column)
                result.published[(row, column)] = value
                if not applies(_column_method(column), teacher, student):
                    result.not_applicable.add((row, column))
                cell = measured.get((table, row, column))
                if cell is not None:
                    cell.published = value
                    result.cells[(row, column)] = cell
        tables.append(result)
    return tables


def format_cell(table: ResultTable, row: str, column: str) -> str:
    """"mean +- std (n) / paper P"; "not run" where no seed finished; "n/a" where the
    method does not apply (no config); the paper's value is "n/r" where it reports none
    (where it prints n/a, or has no such row)."""
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


# The paper's headline: its footnote averages over the student models of Tables 1-2.
HEADLINE_TABLES = ("cifar100-same-family", "cifar100-other-family")


def relative_improvement_over_kd(pairs: Iterable[Tuple[float, float, float]]
                                 ) -> Optional[float]:
    """The paper's headline metric in percent: the mean over (vanilla, KD, method)
    accuracies of student models of (Acc_method - Acc_KD) / (Acc_KD - Acc_vanilla); None
    without pairs. A pair whose KD equals its vanilla has no ratio: an error names it."""
    ratios = []
    for vanilla, kd, method in pairs:
        if kd == vanilla:
            raise ValueError(f"relative improvement over KD: KD and vanilla are both {kd}; "
                             f"the ratio is undefined")
        ratios.append((method - kd) / (kd - vanilla))
    return 100 * statistics.mean(ratios) if ratios else None


@dataclass
class Headline:
    method: str
    measured: Optional[float]  # % from the measured means, over the pairs that have all three
    measured_pairs: int
    published: Optional[float]  # % from the paper's values
    published_pairs: int


def headline(tables: List[ResultTable]) -> List[Headline]:
    """Every method's average relative improvement over KD over the rows of HEADLINE_TABLES,
    from the measured means (rows where vanilla, KD and the method all finished, and KD's
    mean differs from vanilla's) and from the paper's values."""
    rows = [(t, row) for t in tables if t.name in HEADLINE_TABLES for row in t.rows]

    def measured(table, row, column):
        cell = table.cells.get((row, column))
        return cell.mean if cell is not None else None

    def triples(value_of, method):
        found = [tuple(value_of(t, row, c) for c in ("vanilla", "kd", method))
                 for t, row in rows]
        return [v for v in found if None not in v]

    methods = [m for m in TABLE_METHODS[HEADLINE_TABLES[0]] if m not in ("vanilla", "kd")]
    result = []
    for method in methods:
        ours = [v for v in triples(measured, method) if v[0] != v[1]]
        paper = triples(lambda t, row, c: t.published.get((row, c)), method)
        result.append(Headline(method, relative_improvement_over_kd(ours), len(ours),
                               relative_improvement_over_kd(paper), len(paper)))
    return result


def format_headline(headlines: List[Headline]) -> str:
    def value(percent, pairs, missing):
        return missing if percent is None else f"{percent:.2f} % ({pairs})"
    claimed = ", ".join(f"{m} {v:.2f} %" for m, v in published_headline().items())
    lines = ["relative-improvement-over-kd (the paper's headline: mean over the student models "
             "of Tables 1-2 of (Acc_method - Acc_KD) / (Acc_KD - Acc_vanilla); each cell: "
             f"percent (pairs); the paper claims {claimed})\n",
             "| method | ours | paper |", "|---|---|---|"]
    lines += [f"| {h.method} | {value(h.measured, h.measured_pairs, 'not run')} | "
              f"{value(h.published, h.published_pairs, 'n/r')} |" for h in headlines]
    return "\n".join(lines)


def results_tables(runs: Path, tables: Optional[List[ResultTable]] = None) -> str:
    """The printout of `tables` (default: collect_tables(runs)), then the headline."""
    tables = collect_tables(runs) if tables is None else tables
    note = "" if any(t.cells for t in tables) else f"no finished runs under {runs}\n\n"
    return note + format_tables(tables) + "\n\n" + format_headline(headline(tables))
