"""The paper's training recipes, and how command-line options override them."""
from __future__ import annotations

from typing import NamedTuple, Tuple

from .options import RecipeOverrides


class Recipe(NamedTuple):
    epochs: int
    batch_size: int
    lr: float
    lr_decay_epochs: Tuple[int, ...]
    weight_decay: float


RECIPES = {
    "cifar": Recipe(epochs=240, batch_size=64, lr=0.05, lr_decay_epochs=(150, 180, 210),
                    weight_decay=5e-4),
    "imagenet": Recipe(epochs=100, batch_size=256, lr=0.1, lr_decay_epochs=(30, 60, 90),
                       weight_decay=1e-4),
    "digits": Recipe(epochs=30, batch_size=32, lr=0.05, lr_decay_epochs=(20, 25),
                     weight_decay=5e-4),
}
# The benchmark trains these students with a smaller lr on CIFAR.
SMALL_LR_MODELS = ("mobilenet", "shuffle")
SMALL_LR = 0.01


# The benchmark's initialisation stage of two-stage methods (AB, FT, FSP) runs at the
# student's learning rate, held constant, except FT with a CIFAR ResNet or WRN student: 0.01
# (helper/pretrain.py of the CRD benchmark).
INIT_STAGE_EPOCHS = 30
SMALL_INIT_LR = {"ft": ("resnet", "wrn_")}
SMALL_INIT_STAGE_LR = 0.01


def describe_recipes() -> str:
    """The recipes in words, for the command line's help (written from RECIPES, never
    retyped)."""
    def epochs(r: Recipe) -> str:
        return "/".join(str(e) for e in r.lr_decay_epochs)

    def decay(r: Recipe) -> str:
        return f"{r.weight_decay:.0e}".replace("e-0", "e-")

    cifar, imagenet = RECIPES["cifar"], RECIPES["imagenet"]
    return (f"Recipes (overridable): CIFAR {cifar.epochs} epochs, batch {cifar.batch_size}, SGD "
            f"momentum 0.9, lr {cifar.lr:g} ({SMALL_LR:g} for MobileNetV2/ShuffleNet students), "
            f"x0.1 at {epochs(cifar)}, weight decay {decay(cifar)}; ImageNet "
            f"{imagenet.epochs} epochs, batch {imagenet.batch_size}, lr {imagenet.lr:g}, x0.1 at "
            f"{epochs(imagenet)}, weight decay {decay(imagenet)}.")


def recipe_family(dataset: str) -> str:
    return {"cifar100": "cifar", "cifar10": "cifar", "digits": "digits"}.get(dataset, "imagenet")


def init_stage_lr(method: str, student_name: str, lr: float, dataset: str) -> float:
    if (recipe_family(dataset) == "cifar" and lr > SMALL_INIT_STAGE_LR
            and student_name.startswith(SMALL_INIT_LR.get(method, ()))):
        return SMALL_INIT_STAGE_LR
    return lr


def recipe(dataset: str, overrides: RecipeOverrides, model_name: str) -> Recipe:
    """The recipe of the data set for model_name, with every number the user gave (not None)
    in place of its default: an explicit 0 (e.g. --weight-decay 0) is honoured."""
    family = recipe_family(dataset)
    default = RECIPES[family]
    if family == "cifar" and any(k in model_name.lower() for k in SMALL_LR_MODELS):
        default = default._replace(lr=SMALL_LR)

    def chosen(option):
        value = getattr(overrides, option)
        return getattr(default, option) if value is None else value

    return Recipe(epochs=chosen("epochs"), batch_size=chosen("batch_size"), lr=chosen("lr"),
                  lr_decay_epochs=tuple(chosen("lr_decay_epochs")),
                  weight_decay=chosen("weight_decay"))
