"""Summary statistics the printouts and figures share."""
from __future__ import annotations

import statistics
from typing import Optional, Sequence, Tuple


def mean_and_std(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    """(mean, sample standard deviation) of the values; the deviation of one value is 0, and
    both are None for no value."""
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
