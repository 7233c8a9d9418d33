"""The data sets by name (train/data/catalog.py)."""
from train.data.catalog import DataSets, load_data


def test_load_data_names_its_parts():
    data = load_data("digits", None, False)
    assert isinstance(data, DataSets)
    assert (data.num_classes, data.in_channels) == (10, 1)
    train_set, test_set, classes, channels = data  # still unpacks as before
    assert len(train_set) + len(test_set) == 1797 and classes == 10
