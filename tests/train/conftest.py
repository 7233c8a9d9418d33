"""Fixtures the training application's tests share."""
import pytest
import torch

from train.data.digits import NUM_CLASSES
from train.distillers import build_distiller
from train.models import build_model

from helpers import fit_briefly, tiny_problem


@pytest.fixture(scope="module")
def trained_teacher():
    train, test = tiny_problem()
    torch.manual_seed(0)
    teacher = build_model("resnet8", NUM_CLASSES, in_channels=1)
    fit_briefly(build_distiller("vanilla", teacher), train, test, epochs=4)
    return teacher
