"""The embedded digits data set: a stratified, disjoint split."""
import torch

from train.data.digits import NUM_CLASSES, digits_datasets, stratified_subset


def test_digits_split_is_stratified_and_disjoint():
    train, test = digits_datasets(image_size=12)
    assert train.tensors[0].shape[1:] == (1, 12, 12)
    assert len(train) + len(test) == 1797
    for part in (train, test):
        counts = torch.bincount(part.tensors[1], minlength=NUM_CLASSES)
        assert counts.min() > 0.8 * counts.float().mean()
    flat_train = {tuple(x.flatten().tolist()) for x in train.tensors[0][:200]}
    assert not any(tuple(x.flatten().tolist()) in flat_train for x in test.tensors[0][:200])
    small = stratified_subset(train, 0.1)
    assert torch.bincount(small.tensors[1], minlength=NUM_CLASSES).min() >= 1
