"""Small files in the data sets' own on-disk formats, for the loader and command tests."""
import pickle

import numpy as np


def write_cifar100(root, n_train=6, n_test=4):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "fine_labels": [i % 100 for i in range(n)], "coarse_labels": [0] * n,
                 "filenames": [f"{i}.png" for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "meta").write_bytes(pickle.dumps(
        {"fine_label_names": [f"class{i}" for i in range(100)],
         "coarse_label_names": [f"super{i}" for i in range(20)]}))
    return batch


def write_image_folder(root, classes=("cat", "dog"), per_class=2, size=40):
    from PIL import Image

    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.JPEG")


def write_stl10(root, n_train=5, n_test=3):
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("test", n_test)):
        rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8).tofile(folder / f"{split}_X.bin")
        (np.arange(n, dtype=np.uint8) % 10 + 1).tofile(folder / f"{split}_y.bin")  # 1-based
    (folder / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)))
    (folder / "fold_indices.txt").write_text("0 1 2\n" * 10)


