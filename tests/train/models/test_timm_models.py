"""timm's models by name (timm_<name>) in the training application: teachers and students
for ICD, their penultimate feature (timm's pre-logits), feature points through timm's
feature_info, and timm checkpoints through the safe loader. timm's own tiny test
architectures (test_resnet, test_vit) keep this fast."""
import argparse

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is not installed: it is part of the [train] "
                           "extra, pip install -e \".[train]\"")

from train.checkpoints import CheckpointMismatch, load_model  # noqa: E402
from train.cli import main as cli_main  # noqa: E402
from train.data.digits import NUM_CLASSES, digits_datasets  # noqa: E402
from train.distillers import build_distiller  # noqa: E402
from train.models import FeatureTap, build_model, feature_points  # noqa: E402

CNN, VIT = "timm_test_resnet", "timm_test_vit"


def digits_batch(n=16, size=16):
    train, _ = digits_datasets(image_size=size)
    images, labels = train.tensors
    return images[:n], labels[:n]


def pre_logits(model, images):
    """timm's own definition of the penultimate feature."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


@pytest.mark.parametrize("student_name, teacher_name", [(CNN, VIT), (VIT, CNN)],
                         ids=["cnn-student_vit-teacher", "vit-student_cnn-teacher"])
def test_timm_models_distil_one_step_with_icd(student_name, teacher_name):
    torch.manual_seed(0)
    student = build_model(student_name, NUM_CLASSES, in_channels=1)
    teacher = build_model(teacher_name, NUM_CLASSES, in_channels=1)
    distiller = build_distiller("icd", student, teacher)
    distiller.train()
    images, labels = digits_batch()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    theta_before = distiller.criterion.log_scale.item()
    with torch.no_grad():
        expected_icd = distiller.criterion(pre_logits(student, images),
                                           pre_logits(teacher, images)).item()
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.05, momentum=0.9)

    logits, losses = distiller(images, labels)
    sum(losses.values()).backward()
    optimizer.step()

    assert logits.shape == (16, NUM_CLASSES)
    assert losses["icd"].item() == pytest.approx(expected_icd, rel=1e-6)
    assert distiller.criterion.log_scale.item() != theta_before
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize("name", [CNN, VIT, "timm_resnet18", "timm_vit_tiny_patch16_224"])
def test_tapped_feature_is_timms_pre_logits(name):
    """On CIFAR-sized images, including a ViT that timm pins to 224x224 inputs."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=7).eval()
    tap = FeatureTap(model)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(images)
        expected = pre_logits(model, images)
    assert logits.shape == (2, 7)
    assert tap.dim == expected.shape[1]
    assert torch.equal(tap.features, expected)


def test_unknown_timm_model_is_named():
    with pytest.raises(ValueError, match="unknown model 'timm_resnet9000': timm .* has no"):
        build_model("timm_resnet9000", 10)


def test_feature_points_of_a_timm_cnn_and_refusals():
    torch.manual_seed(0)
    cnn = build_model(CNN, 10)
    images = torch.randn(2, 3, 32, 32)
    features, logits = feature_points(cnn, images)
    # timm's features_only points (stem and four stages), then the pooled feature.
    with torch.no_grad():
        maps = timm.create_model("test_resnet", features_only=True)
        maps.load_state_dict({k: v for k, v in cnn.state_dict().items()
                              if not k.startswith("fc.")})
        expected = maps.train()(images)
    assert [f.shape for f in features[:-1]] == [e.shape for e in expected]
    assert torch.allclose(features[2], expected[2])
    assert features[-1].shape == (2, cnn.get_classifier().in_features)
    build_distiller("at", build_model(CNN, 10), cnn, example_images=images)
    with pytest.raises(ValueError, match="'blocks.0' gives a tensor of shape .* not a feature "
                                         "map"):
        build_distiller("at", build_model(CNN, 10), build_model(VIT, 10), example_images=images)
    with pytest.raises(ValueError, match="pre-activation .* not defined for timm models"):
        build_distiller("ab", build_model(CNN, 10), cnn, example_images=images)


def save_timm_train_checkpoint(model, path):
    """The layout of timm's train.py checkpoints: weights under state_dict, options as an
    argparse.Namespace."""
    torch.save({"epoch": 3, "arch": "test_resnet", "state_dict": model.state_dict(),
                "optimizer": {"state": {}, "param_groups": []}, "version": 2,
                "args": argparse.Namespace(model="test_resnet", lr=0.1), "metric": 71.5}, path)


def save_safetensors(model, path):
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(path))


@pytest.mark.parametrize("save", [
    lambda model, path: torch.save(model.state_dict(), path),  # pytorch_model.bin
    save_timm_train_checkpoint,
    save_safetensors,
], ids=["state_dict", "timm_train_checkpoint", "safetensors"])
def test_timm_checkpoint_round_trips(save, tmp_path):
    torch.manual_seed(0)
    model = build_model(CNN, 10).eval()
    path = tmp_path / ("model.safetensors" if save is save_safetensors else "model.pth")
    save(model, path)
    loaded = load_model(CNN, path, 10, 3).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    with pytest.raises(CheckpointMismatch, match="does not hold a timm_test_resnet of this "
                                                 "data set"):
        load_model(CNN, path, 100, 3)


def test_damaged_safetensors_file_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors cannot be read"):
        load_model(CNN, path, 10, 3)


def test_distill_command_with_timm_names(tmp_path, capsys):
    """--teacher-ckpt reads a timm state dict; the student is another timm architecture."""
    torch.manual_seed(0)
    teacher_file = tmp_path / "teacher.safetensors"
    save_safetensors(build_model(CNN, NUM_CLASSES, in_channels=1), teacher_file)
    assert cli_main(["distill", "--teacher", CNN, "--teacher-ckpt", str(teacher_file),
                     "--student", VIT, "--method", "icd", "--dataset", "digits",
                     "--epochs", "1", "--batch-size", "256", "--out", str(tmp_path / "s")]) == 0
    assert f"icd {VIT}: epoch 0" in capsys.readouterr().out
