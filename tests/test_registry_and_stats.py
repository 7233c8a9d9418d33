"""Small shared pieces of the training application: the registries' decorator, the mean and
deviation every printout uses, and the named splits of a data set."""
import statistics

import pytest

from train.data.catalog import DataSets, load_data
from train.registry import registrar
from train.stats import mean_and_std


def test_registrar_files_classes_by_name_and_refuses_a_second_entry():
    table = {}
    register = registrar(table, "method")

    @register("a")
    class A:
        pass

    assert table == {"a": A} and A.method == "a"
    with pytest.raises(ValueError, match="'a' is registered twice"):
        register("a")(type("B", (), {}))


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


def test_load_data_names_its_parts():
    data = load_data("digits", None, False)
    assert isinstance(data, DataSets)
    assert (data.num_classes, data.in_channels) == (10, 1)
    train_set, test_set, classes, channels = data  # still unpacks as before
    assert len(train_set) + len(test_set) == 1797 and classes == 10
