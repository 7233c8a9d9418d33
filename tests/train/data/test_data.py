"""The real loaders on small files written in the data sets' own on-disk formats."""
import pytest
import torch

from train.data.vision import (cifar_datasets, image_folder_datasets, stl10_datasets,
                               tiny_imagenet_datasets)

from helpers import write_cifar100, write_image_folder, write_stl10


def test_cifar100_reads_the_pickle_batches(tmp_path, no_md5):
    last_batch = write_cifar100(tmp_path)
    train, test = cifar_datasets(tmp_path, 100)
    assert len(train) == 6 and len(test) == 4
    image, label = test[2]
    assert image.shape == (3, 32, 32) and label == 2
    # The test transform is ToTensor + Normalize: undo it and compare with the raw bytes.
    mean = torch.tensor((0.5071, 0.4867, 0.4408)).view(3, 1, 1)
    std = torch.tensor((0.2675, 0.2565, 0.2761)).view(3, 1, 1)
    raw = torch.tensor(last_batch["data"][2].reshape(3, 32, 32), dtype=torch.float32) / 255
    assert torch.allclose(image * std + mean, raw, atol=1e-5)


def test_missing_cifar_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass --download.*cifar-100-python"):
        cifar_datasets(tmp_path, 100)


def test_stl10_reads_the_binaries(tmp_path, no_md5):
    write_stl10(tmp_path, n_train=5, n_test=3)
    train, test = stl10_datasets(tmp_path, image_size=32)
    assert len(train) == 5 and len(test) == 3
    image, label = test[2]
    assert image.shape == (3, 32, 32) and label == 2


def test_image_folders(tmp_path):
    write_image_folder(tmp_path)
    train, val = image_folder_datasets(tmp_path, image_size=32)
    assert len(train) == 4 and train.classes == ["cat", "dog"]
    assert train[0][0].shape == (3, 32, 32) and val[3][1] == 1
    tiny_train, _ = tiny_imagenet_datasets(tmp_path, image_size=24)
    assert tiny_train[0][0].shape == (3, 24, 24)


def test_missing_image_folder_names_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train/<class>/<image>"):
        image_folder_datasets(tmp_path / "imagenet")
