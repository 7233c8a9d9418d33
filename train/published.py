"""The paper's published values (train/published_results.json): the CRD paper's CIFAR-100
Tables 1-2, the comparison the ICD paper's tables repeat, with the ICD authors' own CRD+KD,
ICD and ICD+KD values and their transfer table (sources named in the file). A value is a float, None (not
recorded: printed "n/r") or "n/a" (the method does not apply to the pair: no config)."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Dict, Optional, Union

PUBLISHED_FILE = Path(__file__).with_name("published_results.json")
NOT_APPLICABLE = "n/a"

Value = Union[float, str, None]


@functools.lru_cache(maxsize=None)
def published_tables() -> Dict[str, Dict[str, Dict[str, Value]]]:
    """table -> "teacher-student" -> method ("teacher" for the teacher itself) -> value."""
    return json.loads(PUBLISHED_FILE.read_text())["tables"]


def published_value(table: str, teacher: str, student: str, method: str) -> Optional[Value]:
    return published_tables().get(table, {}).get(f"{teacher}-{student}", {}).get(method)


def not_applicable(table: str, teacher: str, student: str, method: str) -> bool:
    return published_value(table, teacher, student, method) == NOT_APPLICABLE
