"""The class label of every sample of a training set, read from the data set's metadata
(never by decoding its images): what class-aware samplers (CRD's negatives) need up front."""
from __future__ import annotations

from typing import Callable, Tuple, Type

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset


def _subset_labels(subset: Subset) -> torch.Tensor:
    return dataset_labels(subset.dataset)[torch.as_tensor(subset.indices, dtype=torch.long)]


def _concat_labels(concat: ConcatDataset) -> torch.Tensor:
    return torch.cat([dataset_labels(part) for part in concat.datasets])


def _tensor_dataset_labels(dataset: TensorDataset) -> torch.Tensor:
    if len(dataset.tensors) < 2:
        raise ValueError("a TensorDataset without a second tensor has no labels")
    return dataset.tensors[1]


# Wrappers and containers whose labels come from their parts, checked before the attributes.
LABEL_READERS: Tuple[Tuple[Type[Dataset], Callable[..., torch.Tensor]], ...] = (
    (Subset, _subset_labels),
    (ConcatDataset, _concat_labels),
    (TensorDataset, _tensor_dataset_labels),
)
# torchvision: CIFAR, ImageFolder/DatasetFolder and MNIST keep `targets`, STL-10 `labels`.
LABEL_ATTRIBUTES = ("targets", "labels")


def _read_labels(dataset) -> torch.Tensor:
    for kind, read in LABEL_READERS:
        if isinstance(dataset, kind):
            return read(dataset)
    for attribute in LABEL_ATTRIBUTES:
        labels = getattr(dataset, attribute, None)
        if labels is not None:
            try:
                return torch.as_tensor(labels)
            except (TypeError, ValueError, RuntimeError) as error:
                raise ValueError(f"{type(dataset).__name__}.{attribute} is not a sequence of "
                                 f"integer labels ({error})") from error
    raise ValueError(f"cannot read the labels of a {type(dataset).__name__} without decoding "
                     f"every sample: give it a `targets` attribute (one class index per "
                     f"sample), or wrap a TensorDataset/Subset/ConcatDataset")


def dataset_labels(dataset) -> torch.Tensor:
    """A 1-D int64 CPU tensor: the class index (>= 0) of every sample, in data-set order."""
    labels = _read_labels(dataset)
    if labels.dim() != 1:
        raise ValueError(f"labels of {type(dataset).__name__} must be one class index per "
                         f"sample (1-D), got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels of {type(dataset).__name__} must be integers, "
                         f"got {labels.dtype}")
    if len(labels) != len(dataset):
        raise ValueError(f"{type(dataset).__name__} has {len(dataset)} samples but "
                         f"{len(labels)} labels: every sample needs a label")
    labels = labels.to("cpu", torch.long)
    if len(labels) and int(labels.min()) < 0:
        first = int((labels < 0).nonzero()[0])
        raise ValueError(f"sample {first} of {type(dataset).__name__} has label "
                         f"{int(labels[first])}: every sample needs a class label >= 0 "
                         f"(unlabelled samples cannot be used)")
    return labels
