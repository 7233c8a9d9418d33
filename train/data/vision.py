"""The real data sets, with the paper's augmentation and normalisation.

CIFAR-10/100 and STL-10 are read by torchvision from their original files (`download=True`
fetches them); ImageNet and Tiny-ImageNet are image folders (`root/train/<class>/*.JPEG`,
`root/val/<class>/*`). A missing data set raises FileNotFoundError saying how to get it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

from torch.utils.data import Dataset

CIFAR_STATS = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
STL10_STATS = ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713))


def _missing(name: str, root: Path, how: str) -> FileNotFoundError:
    return FileNotFoundError(f"{name} not found under {root}: {how}")


def cifar_datasets(root, num_classes: int = 100, download: bool = False) -> Tuple[Dataset, Dataset]:
    """CIFAR-10/100 train (random crop 32 with 4 padding, horizontal flip) and test sets."""
    import torchvision
    from torchvision import transforms as T

    if num_classes not in CIFAR_STATS:
        raise ValueError(f"CIFAR has 10 or 100 classes, got {num_classes}")
    cls = torchvision.datasets.CIFAR100 if num_classes == 100 else torchvision.datasets.CIFAR10
    mean, std = CIFAR_STATS[num_classes]
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(mean, std)])
    test_tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    try:
        return (cls(str(root), train=True, transform=train_tf, download=download),
                cls(str(root), train=False, transform=test_tf, download=download))
    except RuntimeError as error:
        folder = "cifar-100-python" if num_classes == 100 else "cifar-10-batches-py"
        raise _missing(f"CIFAR-{num_classes}", Path(root),
                       f"pass --download, or unpack the original archive so that "
                       f"{Path(root) / folder} exists ({error})") from error


def stl10_datasets(root, image_size: int = 32, download: bool = False) -> Tuple[Dataset, Dataset]:
    """STL-10 labelled train and test splits, resized to image_size (the transfer protocol
    probes students trained on 32x32 images)."""
    import torchvision
    from torchvision import transforms as T

    mean, std = STL10_STATS
    train_tf = T.Compose([T.Resize(image_size), T.RandomCrop(image_size, padding=4),
                          T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    test_tf = T.Compose([T.Resize(image_size), T.ToTensor(), T.Normalize(mean, std)])
    try:
        return (torchvision.datasets.STL10(str(root), split="train", transform=train_tf,
                                           download=download),
                torchvision.datasets.STL10(str(root), split="test", transform=test_tf,
                                           download=download))
    except RuntimeError as error:
        raise _missing("STL-10", Path(root), f"pass --download, or unpack stl10_binary.tar.gz "
                       f"so that {Path(root) / 'stl10_binary'} exists ({error})") from error


def image_folder_datasets(root, image_size: int = 224, name: str = "ImageNet",
                          train_resize: bool = True) -> Tuple[Dataset, Dataset]:
    """An image-folder data set (ImageNet, Tiny-ImageNet): random-resized-crop and flip for
    training, resize + centre crop (ratio 0.875) for validation."""
    from torchvision import datasets
    from torchvision import transforms as T

    root = Path(root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise _missing(name, root, f"expected {root / split}/<class>/<image> folders "
                           f"(for Tiny-ImageNet, sort val/images into class folders using "
                           f"val/val_annotations.txt)")
    mean, std = IMAGENET_STATS
    train_ops = [T.RandomResizedCrop(image_size)] if train_resize else [T.RandomCrop(image_size, padding=image_size // 8)]
    train_tf = T.Compose(train_ops + [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    test_tf = T.Compose([T.Resize(int(round(image_size / 0.875))), T.CenterCrop(image_size),
                         T.ToTensor(), T.Normalize(mean, std)])
    return (datasets.ImageFolder(str(root / "train"), transform=train_tf),
            datasets.ImageFolder(str(root / "val"), transform=test_tf))


def imagenet_datasets(root) -> Tuple[Dataset, Dataset]:
    return image_folder_datasets(root, 224, "ImageNet")


def tiny_imagenet_datasets(root, image_size: int = 64) -> Tuple[Dataset, Dataset]:
    return image_folder_datasets(root, image_size, "Tiny-ImageNet", train_resize=False)
