"""The real loaders on small files written in the data sets' own on-disk formats."""
import pickle

import numpy as np
import pytest
import torch
import torchvision

from train.data.vision import (cifar_datasets, image_folder_datasets, stl10_datasets,
                               tiny_imagenet_datasets)


@pytest.fixture
def no_md5(monkeypatch):
    # The loaders check the original archives' MD5 sums, which tiny test files cannot match;
    # everything else (file layout, parsing, transforms) is the real code path.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(torchvision.datasets.stl10, "check_integrity", lambda *a, **k: True)


def write_cifar100(root, n_train=6, n_test=4):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "fine_labels": list(range(n)), "coarse_labels": [0] * n,
                 "filenames": [f"{i}.png" for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "meta").write_bytes(pickle.dumps(
        {"fine_label_names": [f"class{i}" for i in range(100)],
         "coarse_label_names": [f"super{i}" for i in range(20)]}))
    return batch


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
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for split, n in (("train", 5), ("test", 3)):
        rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8).tofile(folder / f"{split}_X.bin")
        (np.arange(n, dtype=np.uint8) + 1).tofile(folder / f"{split}_y.bin")  # 1-based
    (folder / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)))
    (folder / "fold_indices.txt").write_text("0 1 2\n" * 10)
    train, test = stl10_datasets(tmp_path, image_size=32)
    assert len(train) == 5 and len(test) == 3
    image, label = test[2]
    assert image.shape == (3, 32, 32) and label == 2


def write_image_folder(root, classes=("cat", "dog"), per_class=2, size=40):
    from PIL import Image

    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.JPEG")


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
