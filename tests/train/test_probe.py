"""The linear probe of the transfer table (train/probe.py)."""
import pytest
import torch

from train.cli import main
from train.data.digits import IN_CHANNELS, NUM_CLASSES, digits_datasets, stratified_subset
from train.models import build_model
from train.probe import ProbeRecipe, classes_in_state_dict, linear_probe

from helpers import write_stl10


def test_probe_trains_a_classifier_on_frozen_features():
    train, test = digits_datasets(image_size=12)
    test = stratified_subset(test, 0.5, 0)
    torch.manual_seed(0)
    model = build_model("resnet8", 5, IN_CHANNELS)  # its own classifier has 5 classes
    before = {k: v.clone() for k, v in model.state_dict().items()}
    accuracy, head = linear_probe(model, train, test, NUM_CLASSES,
                                  ProbeRecipe(epochs=15, lr=0.5, lr_decay_epochs=(10,)))
    assert head.out_features == NUM_CLASSES and head.in_features == 64
    # Random convolutional features of digits are linearly separable well above chance (10%).
    assert accuracy > 50
    for k, v in model.state_dict().items():  # weights and batch-norm statistics untouched
        assert torch.equal(v, before[k]), k
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_2", "vgg8", "ShuffleV2", "MobileNetV2",
                                  "tv_mobilenet_v2"])
def test_classifier_size_is_read_whatever_the_classifier_is_called(name):
    state = build_model(name, 37).state_dict()
    assert classes_in_state_dict(build_model(name, 2), state) == 37
    with pytest.raises(ValueError, match="does not hold"):
        classes_in_state_dict(build_model(name, 2), {"other.weight": torch.zeros(1)})


def test_linear_probe_command_on_stl10_files(tmp_path, no_md5, capsys):
    write_stl10(tmp_path, n_train=30, n_test=10)
    torch.save({"student": build_model("resnet8", 100).state_dict()}, tmp_path / "s.pt")
    assert main(["linear-probe", "--dataset", "stl10", "--data", str(tmp_path), "--model",
                 "resnet8", "--ckpt", str(tmp_path / "s.pt"), "--probe-epochs", "2"]) == 0
    assert "linear probe of resnet8" in capsys.readouterr().out
    assert main(["linear-probe", "--dataset", "stl10", "--data", str(tmp_path), "--model",
                 "resnet20", "--ckpt", str(tmp_path / "s.pt")]) == 2
    assert "does not hold a resnet20" in capsys.readouterr().err
