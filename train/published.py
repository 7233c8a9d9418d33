"""The published values (train/published_results.json): what the ICD paper itself prints in
its Tables 1-4 and its headline, cell by cell, and apart from them, named, the values other
publications print for the same cells where they differ (the paper's earlier version, the
CRD paper, the ICD authors' repository README).

A value is a float, "n/a" where the paper prints n/a (not reported; whether the method applies
is the configs' business, train.configs), or None where the paper's table has no such cell."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Dict, Optional, Union

PUBLISHED_FILE = Path(__file__).with_name("published_results.json")
PAPER = "icd-paper"  # the source of published_value's default: the ICD paper's own tables
NOT_REPORTED = "n/a"  # what the paper prints where it reports no value

Value = Union[float, str, None]


@functools.lru_cache(maxsize=None)
def _published_file() -> dict:
    return json.loads(PUBLISHED_FILE.read_text())


def sources() -> Dict[str, str]:
    """source name -> what it is; PAPER first."""
    other = _published_file()["other_sources"]
    return {PAPER: _published_file()["about"], **{k: v["about"] for k, v in other.items()}}


def published_tables(source: str = PAPER) -> Dict[str, Dict[str, Dict[str, Value]]]:
    """table -> "teacher-student" -> method ("teacher" for the teacher itself; "<method>
    <transfer set>" for the transfer table's probes) -> value, as `source` prints it (the other
    sources hold only the cells where they differ from the paper)."""
    if source == PAPER:
        return _published_file()["tables"]
    other = _published_file()["other_sources"]
    if source not in other:
        raise ValueError(f"unknown source of published values {source!r}; known: "
                         f"{', '.join(sources())}")
    return other[source]["tables"]


def published_value(table: str, teacher: str, student: str, method: str,
                    source: str = PAPER) -> Optional[Value]:
    return published_tables(source).get(table, {}).get(f"{teacher}-{student}", {}).get(method)


def published_number(table: str, teacher: str, student: str, method: str,
                     source: str = PAPER) -> Optional[float]:
    """The value where `source` prints a number; None where it reports none."""
    value = published_value(table, teacher, student, method, source)
    return float(value) if isinstance(value, (int, float)) else None


def published_headline() -> Dict[str, float]:
    """The paper's average relative improvement over KD (%), by method."""
    return dict(_published_file()["headline"]["relative_improvement_over_kd_percent"])
