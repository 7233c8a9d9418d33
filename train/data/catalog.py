"""The data sets the commands know by name."""
from __future__ import annotations

from typing import NamedTuple

from torch.utils.data import Dataset

from .digits import IN_CHANNELS, NUM_CLASSES, digits_datasets

TRAINING_SETS = ("cifar100", "cifar10", "imagenet", "tiny-imagenet", "digits")
TRANSFER_SETS = ("stl10", "tiny-imagenet")


class DataSets(NamedTuple):
    """A training set by name: its two splits and what a model for it needs to know."""

    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int


def load_data(name: str, root, download: bool) -> DataSets:
    from . import vision

    if name == "digits":
        train_set, test_set = digits_datasets()
        return DataSets(train_set, test_set, NUM_CLASSES, IN_CHANNELS)
    if name in ("cifar100", "cifar10"):
        classes = 100 if name == "cifar100" else 10
        return DataSets(*vision.cifar_datasets(root, classes, download), classes, 3)
    if name in ("imagenet", "tiny-imagenet"):
        loader = vision.imagenet_datasets if name == "imagenet" else vision.tiny_imagenet_datasets
        train_set, test_set = loader(root)
        return DataSets(train_set, test_set, len(train_set.classes), 3)
    raise ValueError(f"unknown data set {name!r}; known: {', '.join(TRAINING_SETS)}")


def load_probe_data(name: str, root, image_size: int, download: bool = False):
    """(train, test, classes) of a transfer set, both splits without augmentation."""
    from . import vision

    if name == "stl10":
        train_set, test_set = vision.stl10_datasets(root, image_size, download)
        classes = 10
    elif name == "tiny-imagenet":
        train_set, test_set = vision.tiny_imagenet_datasets(root, image_size)
        classes = len(train_set.classes)
    else:
        raise ValueError(f"unknown transfer data set {name!r}; known: {', '.join(TRANSFER_SETS)}")
    train_set.transform = test_set.transform  # frozen features: one view of each image
    return train_set, test_set, classes
