"""The embedded default data set: scikit-learn's handwritten digits (1,797 real 8x8 images,
shipped with scikit-learn, no download), upscaled to a small image size and split into a
stratified train and test set."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

NUM_CLASSES = 10
IN_CHANNELS = 1


def stratified_subset(dataset: TensorDataset, fraction: float, seed: int = 0) -> TensorDataset:
    """The same fraction of every class (at least one image each), chosen by `seed`."""
    images, labels = dataset.tensors
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        keep.append(idx[:max(1, int(round(fraction * len(idx))))])
    keep = torch.cat(keep)
    return TensorDataset(images[keep], labels[keep])


def digits_datasets(image_size: int = 16, test_fraction: float = 0.25,
                    seed: int = 0) -> Tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                               align_corners=False)
    gen = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(NUM_CLASSES):  # stratified: the same fraction of every digit
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = int(round(test_fraction * len(idx)))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train_idx, test_idx = torch.cat(train_idx), torch.cat(test_idx)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return (TensorDataset(images[train_idx], labels[train_idx]),
            TensorDataset(images[test_idx], labels[test_idx]))
