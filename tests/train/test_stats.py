"""The mean and deviation every printout uses (train/stats.py)."""
import statistics

import pytest

from train.stats import mean_and_std


@pytest.mark.parametrize("values", [[71.2], [70.0, 72.5, 71.1], []])
def test_mean_and_std_is_the_sample_deviation(values):
    mean, std = mean_and_std(values)
    if not values:
        assert (mean, std) == (None, None)
    elif len(values) == 1:
        assert (mean, std) == (values[0], 0.0)
    else:
        assert mean == pytest.approx(sum(values) / len(values))
        expected = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
        assert std == pytest.approx(expected) and std != statistics.pstdev(values)
