"""Checkpoints: the published formats load everywhere a checkpoint is taken, safely.

Every file is built here from a model's own state_dict() in the layout its publisher writes
(the CRD benchmark, mdistiller, torchvision, DataParallel, torch.compile), so nothing is
downloaded and no key name of the zoo is assumed.
"""
import argparse
import copy
import types
from collections import OrderedDict

import pytest
import torch
from torch import nn

from train.checkpoints import (CheckpointMismatch, UntrustedCheckpoint, extract_state_dict,
                               load_model, load_model_weights, read_checkpoint)
from train.cli import main
from train.distillers import build_distiller
from train.models import build_model, classifier_layer
from train.teachers import PUBLISHED_TEACHERS

from helpers import (cifar_zoo, logits_input, malicious_checkpoint, reference_weights,
                     trained_looking, write_cifar100, write_stl10)


def assert_same_weights(model, source):
    got, want = model.state_dict(), source.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def sgd_state(model):
    """An optimiser state dict with momentum buffers, as the publishers save beside the
    weights (of a step on a copy: the model itself is left as it is)."""
    model = copy.deepcopy(model)
    channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model(torch.rand(2, channels, 16, 16)).sum().backward()
    optimizer.step()
    return optimizer.state_dict()


class MdistillerLike(nn.Module):
    """mdistiller's distillers hold .student, .teacher and the method's own modules."""

    def __init__(self, student, teacher):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.conv_reg = nn.Conv2d(8, 16, 1)


def prefixed(state, prefix):
    return OrderedDict((prefix + key, value) for key, value in state.items())


def crd_options():
    return argparse.Namespace(model="resnet8", dataset="cifar100", learning_rate=0.05,
                              lr_decay_epochs=[150, 180, 210], weight_decay=5e-4, trial=0)


# Each publisher's layout around the source model's weights `state` (and the model itself).
FORMATS = {
    "this application's best.pt": lambda state, model: {
        "student": state, "epoch": 3, "test_acc": 61.5},
    "this application's last.pt": lambda state, model: {
        "distiller": build_distiller("icd", model, trained_looking("resnet20", seed=3),
                                     num_samples=10).state_dict(),
        "epoch": 3, "history": [{"epoch": 3, "test_acc": 61.5}], "method": "icd"},
    "CRD ckpt_epoch_240.pth": lambda state, model: {
        "epoch": 240, "model": state, "accuracy": torch.tensor(72.34),
        "optimizer": sgd_state(model)},
    "CRD <model>_best.pth": lambda state, model: {
        "epoch": 231, "model": state, "best_acc": torch.tensor(72.5),
        "optimizer": sgd_state(model)},
    "CRD <model>_last.pth (argparse options)": lambda state, model: {
        "opt": crd_options(), "model": state, "optimizer": sgd_state(model)},
    "DataParallel": lambda state, model: {
        "model": nn.DataParallel(model).state_dict()},
    "DDP state dict": lambda state, model: prefixed(state, "module."),
    "torch.compile": lambda state, model: torch.compile(model).state_dict(),
    "DDP of a compiled model": lambda state, model: prefixed(state, "module._orig_mod."),
    "mdistiller student_best": lambda state, model: {"model": state},
    "mdistiller best (DataParallel distiller)": lambda state, model: {
        "epoch": 240, "best_acc": 71.0, "optimizer": sgd_state(model),
        "model": nn.DataParallel(
            MdistillerLike(model, trained_looking("resnet20", seed=4))).state_dict()},
    "bare state dict": lambda state, model: state,
}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
@pytest.mark.parametrize("layout", list(FORMATS))
def test_every_published_format_loads_the_same_weights(layout, legacy, tmp_path):
    source = trained_looking()
    path = tmp_path / "ckpt.pth"
    # The CRD files date from torch 1.x: the pre-1.6 (non-zip) serialisation.
    torch.save(FORMATS[layout](source.state_dict(), source), path,
               _use_new_zipfile_serialization=not legacy)
    model = build_model("resnet8", 10, 3)
    load_model_weights(model, path)
    assert_same_weights(model, source)


def test_torchvision_imagenet_weight_files_load_into_tv_models(tmp_path):
    source = trained_looking("tv_mobilenet_v2", classes=1000)
    # torchvision's weight files are bare state dicts; the oldest ones (torch < 0.4.1)
    # predate the batch counters.
    path = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(source.state_dict(), path)
    model = build_model("tv_mobilenet_v2", 1000)
    load_model_weights(model, path)
    assert_same_weights(model, source)
    old = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    model = build_model("tv_mobilenet_v2", 1000)
    load_model_weights(model, tmp_path / "old.pth")
    for key, value in model.state_dict().items():
        expected = torch.tensor(0) if key.endswith("num_batches_tracked") else source.state_dict()[key]
        assert torch.equal(value, expected), key


def test_files_without_batch_counters_load_with_the_counters_at_zero(tmp_path):
    source = trained_looking()
    state = source.state_dict()
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert counters  # resnet8 has batch norm
    torch.save({"model": {k: v for k, v in state.items() if k not in counters}},
               tmp_path / "old.pth")
    model = trained_looking(seed=5)  # counters at 7: filling must set them, not keep them
    load_model_weights(model, tmp_path / "old.pth")
    for key, value in model.state_dict().items():
        assert torch.equal(value, torch.tensor(0) if key in counters else state[key]), key


def test_a_missing_weight_is_not_filled_and_the_error_names_it(tmp_path):
    state = trained_looking().state_dict()
    dropped = next(k for k in state if k.endswith("running_mean"))
    torch.save({"model": {k: v for k, v in state.items() if k != dropped}}, tmp_path / "a.pth")
    with pytest.raises(CheckpointMismatch) as error:
        load_model_weights(build_model("resnet8", 10), tmp_path / "a.pth", name="resnet8")
    message = str(error.value)
    assert str(tmp_path / "a.pth") in message and "does not hold a resnet8" in message
    assert f"missing keys {dropped}" in message and "unexpected" not in message


def test_unexpected_and_missing_keys_are_named_first_five_and_a_count(tmp_path):
    state = trained_looking().state_dict()
    extra = {f"extra{i}.weight": torch.zeros(1) for i in range(7)}
    torch.save({**state, **extra}, tmp_path / "b.pth")
    with pytest.raises(CheckpointMismatch, match="unexpected keys extra0.weight, extra1.weight, "
                                                 "extra2.weight, extra3.weight, extra4.weight "
                                                 "and 2 more"):
        load_model_weights(build_model("resnet8", 10), tmp_path / "b.pth")
    # Another architecture: both lists.
    with pytest.raises(CheckpointMismatch, match=r"does not hold a resnet20 .*missing keys .*"):
        load_model_weights(build_model("resnet20", 10), tmp_path / "b.pth", name="resnet20")


def test_another_class_count_names_the_classifier_and_its_shapes(tmp_path):
    torch.save({"model": trained_looking(classes=10).state_dict()}, tmp_path / "c.pth")
    model = build_model("resnet8", 5)
    layer = classifier_layer(model)
    name = next(n for n, m in model.named_modules() if m is layer)
    with pytest.raises(CheckpointMismatch) as error:
        load_model_weights(model, tmp_path / "c.pth", name="resnet8")
    message = str(error.value)
    assert "does not hold a resnet8 of this data set" in message
    assert f"{name}.weight (10, {layer.in_features}) instead of (5, {layer.in_features})" in message


def test_a_file_without_weights_or_not_a_checkpoint_is_a_clear_error(tmp_path):
    torch.save({"epoch": 3, "accuracy": 50.0}, tmp_path / "no_weights.pth")
    with pytest.raises(CheckpointMismatch, match="no_weights.pth holds no model weights"):
        load_model_weights(build_model("resnet8", 10), tmp_path / "no_weights.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "no_weights.pth").read_bytes()[:100])
    for name in ("text.pth", "empty.pth", "cut.pth"):
        with pytest.raises(ValueError, match=f"{name} cannot be read: not a file torch.save"):
            read_checkpoint(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="nowhere.pth does not exist"):
        read_checkpoint(tmp_path / "nowhere.pth")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_a_checkpoint_carrying_a_command_is_refused_unless_trusted(tmp_path, legacy):
    path, marker = malicious_checkpoint(tmp_path, legacy=legacy)
    with pytest.raises(UntrustedCheckpoint) as error:
        load_model_weights(build_model("resnet8", 10), path)
    assert not marker.exists()
    message = str(error.value)
    assert str(path) in message and "system" in message and "--trust-checkpoint" in message
    # The opt-in really unpickles everything: the file's command runs, the weights load.
    model = build_model("resnet8", 10)
    load_model_weights(model, path, trust=True)
    assert marker.exists()
    assert_same_weights(model, trained_looking())


def test_the_allow_list_is_argparse_namespace_alone(tmp_path):
    state = trained_looking().state_dict()
    torch.save({"model": state, "opt": types.SimpleNamespace(lr=0.05)}, tmp_path / "o.pth")
    with pytest.raises(UntrustedCheckpoint, match="types.SimpleNamespace"):
        read_checkpoint(tmp_path / "o.pth")
    torch.save({"model": state, "opt": crd_options()}, tmp_path / "n.pth")
    assert read_checkpoint(tmp_path / "n.pth")["opt"] == crd_options()
    # A pickled model (torch.save(model)) names its class; the opt-in loads it.
    torch.save(trained_looking(), tmp_path / "m.pth")
    with pytest.raises(UntrustedCheckpoint, match="ResNet|resnet|Module|Conv2d|BatchNorm"):
        read_checkpoint(tmp_path / "m.pth")
    model = build_model("resnet8", 10)
    load_model_weights(model, tmp_path / "m.pth", trust=True)
    assert_same_weights(model, trained_looking())


def test_extract_state_dict_picks_the_student_of_a_distiller():
    student, teacher = trained_looking(), trained_looking("resnet20", seed=3)
    distiller = build_distiller("icd", student, teacher, num_samples=10)
    state = extract_state_dict({"model": prefixed(distiller.state_dict(), "module.")},
                               build_model("resnet8", 10))
    assert state.keys() == student.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in student.state_dict().items())


# --- through the command line -----------------------------------------------------------

DIGITS = ["--dataset", "digits"]


def evaluate_line(capsys, ckpt, *extra):
    assert main(["evaluate", *DIGITS, "--model", "resnet8", "--ckpt", str(ckpt), *extra]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    return line.split(": test top-1 ")[1]


def test_evaluate_reads_every_format_of_a_trained_model(tmp_path, capsys):
    assert main(["train-teacher", "--model", "resnet8", "--out", str(tmp_path / "t"), *DIGITS,
                 "--epochs", "1", "--batch-size", "64"]) == 0
    accuracy = evaluate_line(capsys, tmp_path / "t" / "best.pt")
    assert float(accuracy.rstrip("%")) > 10  # trained: above chance, so a mix-up shows
    assert evaluate_line(capsys, tmp_path / "t" / "last.pt") == accuracy
    model = build_model("resnet8", 10, 1)
    load_model_weights(model, tmp_path / "t" / "best.pt")
    # One of each publisher through the command (every layout is loaded above).
    for layout in ("CRD ckpt_epoch_240.pth", "CRD <model>_last.pth (argparse options)",
                   "mdistiller best (DataParallel distiller)", "DDP of a compiled model"):
        torch.save(FORMATS[layout](model.state_dict(), model), tmp_path / "f.pth")
        assert evaluate_line(capsys, tmp_path / "f.pth") == accuracy, layout


def test_evaluate_refuses_a_malicious_file_and_names_the_opt_in(tmp_path, capsys):
    path, marker = malicious_checkpoint(tmp_path)
    assert main(["evaluate", *DIGITS, "--model", "resnet8", "--ckpt", str(path)]) == 2
    assert not marker.exists()
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {path} needs the Python global posix.system")
    assert "--trust-checkpoint" in err


def test_resume_reads_last_pt_safely(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    path, marker = malicious_checkpoint(out, name="last.pt")
    assert main(["train-teacher", "--model", "resnet8", "--out", str(out), *DIGITS,
                 "--epochs", "1", "--batch-size", "64", "--resume"]) == 2
    assert not marker.exists()
    err = capsys.readouterr().err
    assert "last.pt" in err and "--trust-checkpoint" in err


def test_linear_probe_reads_the_crd_last_file(tmp_path, no_md5, capsys):
    write_stl10(tmp_path, n_train=30, n_test=10)
    source = trained_looking(classes=100)
    torch.save(FORMATS["CRD <model>_last.pth (argparse options)"](source.state_dict(), source),
               tmp_path / "resnet8_last.pth", _use_new_zipfile_serialization=False)
    assert main(["linear-probe", "--dataset", "stl10", "--data", str(tmp_path), "--model",
                 "resnet8", "--ckpt", str(tmp_path / "resnet8_last.pth"),
                 "--probe-epochs", "1"]) == 0
    assert "linear probe of resnet8" in capsys.readouterr().out
    path, marker = malicious_checkpoint(tmp_path)
    assert main(["linear-probe", "--dataset", "stl10", "--data", str(tmp_path), "--model",
                 "resnet8", "--ckpt", str(path), "--probe-epochs", "1"]) == 2
    assert not marker.exists() and "--trust-checkpoint" in capsys.readouterr().err
    assert main(["linear-probe", "--dataset", "stl10", "--data", str(tmp_path), "--model",
                 "resnet8", "--ckpt", str(path), "--probe-epochs", "1",
                 "--trust-checkpoint"]) == 0
    assert marker.exists()


def write_published_teacher(folder, teacher, classes, channels, seed=2):
    """A teacher in the CRD benchmark's layout and format (legacy serialisation)."""
    torch.manual_seed(seed)
    model = build_model(teacher, classes, channels)  # finite logits through 56 layers
    path = folder / f"{teacher}_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir(parents=True)
    torch.save({"epoch": 240, "model": model.state_dict(), "accuracy": torch.tensor(70.0),
                "optimizer": {"state": {}, "param_groups": []}}, path,
               _use_new_zipfile_serialization=False)
    return path


def test_distill_takes_the_teacher_of_a_teachers_folder(tmp_path, capsys):
    teachers = tmp_path / "teachers"
    # Any architecture in the benchmark's layout (a small one: the published ones are slow
    # on a CPU; `run` below takes a published one).
    path = write_published_teacher(teachers, "resnet8", classes=10, channels=1)
    assert main(["distill", *DIGITS, "--teacher", "resnet8", "--teachers", str(teachers),
                 "--student", "resnet8", "--method", "kd", "--epochs", "1", "--batch-size",
                 "64", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert f"teacher resnet8 from {path}: test top-1 " in out and "published" not in out
    # The accuracy printed is the file's: evaluate reads the same file.
    printed = out.split(f"teacher resnet8 from {path}: test top-1 ")[1].split("%")[0]
    assert main(["evaluate", *DIGITS, "--model", "resnet8", "--ckpt", str(path)]) == 0
    assert f"test top-1 {printed}%" in capsys.readouterr().out
    # Missing file: the error names the path the layout expects.
    assert main(["distill", *DIGITS, "--teacher", "wrn_40_2", "--teachers", str(teachers),
                 "--student", "resnet8", "--out", str(tmp_path / "s2")]) == 2
    err = capsys.readouterr().err
    assert str(teachers / "wrn_40_2_vanilla" / "ckpt_epoch_240.pth") in err
    # Exactly one teacher source.
    with pytest.raises(SystemExit):
        main(["distill", *DIGITS, "--teacher", "resnet8", "--teachers", str(teachers),
              "--teacher-ckpt", str(path), "--student", "resnet8", "--out", str(tmp_path)])


def test_run_uses_the_published_teacher_instead_of_training_one(tmp_path, no_md5, capsys):
    write_cifar100(tmp_path / "data", n_train=8, n_test=4)
    teachers = tmp_path / "teachers"
    write_published_teacher(teachers, "resnet56", classes=100, channels=3)
    runs = tmp_path / "runs"
    assert main(["run", "cifar100/resnet56-resnet20/kd", "--data", str(tmp_path / "data"),
                 "--runs", str(runs), "--teachers", str(teachers), "--epochs", "1",
                 "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "(published: 72.34%)" in out and "kd resnet20: epoch 0" in out
    assert not (runs / "cifar100" / "teacher-resnet56").exists()  # no teacher was trained
    assert main(["run", "cifar100/resnet110-resnet20/kd", "--data", str(tmp_path / "data"),
                 "--runs", str(runs), "--teachers", str(teachers), "--epochs", "1",
                 "--batch-size", "4"]) == 2
    assert str(teachers / "resnet110_vanilla" / "ckpt_epoch_240.pth") in capsys.readouterr().err


def test_the_published_teachers_are_the_benchmarks_with_its_accuracies():
    # As the CRD benchmark reports them (issue 8): each config's CIFAR-100 teacher is one.
    assert PUBLISHED_TEACHERS == {"resnet56": 72.34, "resnet110": 74.31, "resnet32x4": 79.42,
                                  "wrn_40_2": 75.61, "vgg13": 74.64, "ResNet50": 79.34}
    from train.configs import CONFIGS

    cifar_teachers = {c.teacher for c in CONFIGS.values() if c.dataset == "cifar100"}
    assert cifar_teachers == set(PUBLISHED_TEACHERS)


@pytest.mark.parametrize("teacher", sorted(PUBLISHED_TEACHERS))
def test_published_teacher_files_built_from_the_reference_keys_give_the_reference_logits(
        teacher, tmp_path):
    record = cifar_zoo()[teacher]
    # As the benchmark wrote them: torch 1.x serialisation, no batch counters, float32.
    state = {k: v.float() for k, v in reference_weights(record["state_dict"]).items()
             if not k.endswith("num_batches_tracked")}
    path = tmp_path / f"{teacher}_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir()
    torch.save({"epoch": 240, "model": state, "accuracy": torch.tensor(70.0),
                "optimizer": {"state": {}, "param_groups": []}}, path,
               _use_new_zipfile_serialization=False)
    model = load_model(teacher, path, 100, 3).double().eval()
    with torch.no_grad():
        logits = model(logits_input())
    expected = torch.tensor(record["logits"], dtype=torch.float64)
    # float32 weights: agreement to float32 rounding, far below any wrong-key mix-up.
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
