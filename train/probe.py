"""Linear-probe transfer: how well a frozen network's penultimate features serve another
data set (the transfer protocol of the distillation benchmark: STL-10 and Tiny-ImageNet,
resized to the network's 32x32 input).

The backbone is frozen, batch norm included (eval mode, no gradient), so its features are
computed once per image, from un-augmented images, and only a new linear classifier on top
of them is trained. Features come from FeatureTap, so this works for every model of the
zoo and any torchvision classifier, whatever its classifier layer is called.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .models import FeatureTap, classifier_layer
from .options import ProbeRecipe, Session


@torch.no_grad()
def extract_features(model: nn.Module, dataset: Dataset, batch_size: int = 256,
                     num_workers: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(features (N, dim) in float32 on the CPU, labels (N,)) of a model in eval mode."""
    device = next(model.parameters()).device
    tap = FeatureTap(model)
    was_training = model.training
    model.eval()
    features, labels = [], []
    try:
        for images, targets in DataLoader(dataset, batch_size=batch_size,
                                          num_workers=num_workers):
            model(images.to(device))
            features.append(tap.features.float().flatten(1).cpu())
            labels.append(torch.as_tensor(targets))
    finally:
        tap.remove()
        model.train(was_training)
    return torch.cat(features), torch.cat(labels)


def classes_in_state_dict(model: nn.Module, state: dict) -> int:
    """Number of outputs of the classifier that `state` holds for this architecture (a
    model built with any class count names its classifier the same way)."""
    layer = classifier_layer(model)
    name = next(n for n, m in model.named_modules() if m is layer)
    key = f"{name}.weight"
    if key not in state:
        raise ValueError(f"the checkpoint has no {key!r}: it does not hold a "
                         f"{type(model).__name__}")
    return state[key].shape[0]


def linear_probe(model: nn.Module, train_set: Dataset, test_set: Dataset, num_classes: int,
                 recipe: ProbeRecipe = ProbeRecipe()) -> Tuple[float, nn.Linear]:
    """Trains a linear classifier on the frozen model's features; returns (test top-1 %,
    the classifier). The model's weights and batch-norm statistics are left untouched."""
    model.requires_grad_(False)
    train_x, train_y = extract_features(model, train_set, num_workers=recipe.num_workers)
    test_x, test_y = extract_features(model, test_set, num_workers=recipe.num_workers)
    if train_y.numel() and int(train_y.max()) >= num_classes:
        raise ValueError(f"label {int(train_y.max())} out of range for {num_classes} classes")
    generator = torch.Generator().manual_seed(recipe.seed)
    head = nn.Linear(train_x.shape[1], num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        head.reset_parameters()
    optimizer = torch.optim.SGD(head.parameters(), lr=recipe.lr, momentum=0.9,
                                weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(recipe.lr_decay_epochs), 0.1)
    for _ in range(recipe.epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(order), recipe.batch_size):
            rows = order[start:start + recipe.batch_size]
            loss = F.cross_entropy(head(train_x[rows]), train_y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
    with torch.no_grad():
        accuracy = (head(test_x).argmax(1) == test_y).float().mean().item() * 100
    return accuracy, head


def probe_checkpoint(model_name: str, ckpt, dataset: str, root, image_size: int,
                     recipe: ProbeRecipe, session: Session, download: bool = False) -> float:
    """Linear probe of checkpoint ckpt (a model_name of any number of classes) on a transfer
    set, its images resized to image_size; returns the test top-1 in percent."""
    from . import distributed
    from .checkpoints import load_state, naming_the_file, read_state_dict
    from .data.catalog import load_probe_data
    from .models import build_model

    device = distributed.init_from_env(session.device)
    # Any class count names the layers alike: a 2-class template reads the keys.
    template = build_model(model_name, 2)
    state = read_state_dict(ckpt, template, session.trust_checkpoint, model_name)
    model = build_model(model_name, classes_in_state_dict(template, state))
    with naming_the_file(ckpt):
        load_state(model, state, model_name)
    train_set, test_set, classes = load_probe_data(dataset, root, image_size, download)
    accuracy, _ = linear_probe(model.to(device), train_set, test_set, classes, recipe)
    distributed.say(f"linear probe of {model_name} ({ckpt}) on {dataset}: test top-1 "
                    f"{accuracy:.2f}%")
    return accuracy
