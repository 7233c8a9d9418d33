"""ICD inside torchdistill: the sample configs of configs/torchdistill/, read by torchdistill's
own YAML loader, build torchdistill's distillation box on small files in torchvision's
formats, and the loss it logs over a few iterations is CE (+ KD) + icd_fast.icd_loss of the
features recorded here by hooks of the test's own."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchdistill", reason="torchdistill is not installed: the integration "
                    "is the optional extra, pip install -e \".[torchdistill]\"")

import icd_fast  # noqa: E402
from helpers import write_cifar100, write_image_folder  # noqa: E402
from torchdistill.common import yaml_util  # noqa: E402
from torchdistill.common.main_util import import_dependencies, load_ckpt  # noqa: E402
from torchdistill.core.distillation import get_distillation_box  # noqa: E402
from torchdistill.misc.log import MetricLogger  # noqa: E402
from torchdistill.models.official import get_image_classification_model  # noqa: E402
from torchdistill.models.registry import get_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "torchdistill"
CIFAR_ICD = CONFIGS / "cifar100" / "icd-resnet8x4_from_resnet32x4.yaml"
CIFAR_ICD_KD = CONFIGS / "cifar100" / "icd_kd-resnet8x4_from_resnet32x4.yaml"
IMAGENET_ICD = CONFIGS / "ilsvrc2012" / "icd-resnet18_from_resnet34.yaml"
BATCH = 8
KD_TEMPERATURE = 4.0  # the samples' KDLoss temperature (the paper's T)


def load_model(model_config):
    """As torchdistill's examples/torchvision/image_classification.py builds its models."""
    model = get_image_classification_model(model_config, distributed=False)
    if model is None:
        model = get_model(model_config["key"], model_config.get("repo_or_dir"),
                          **model_config["kwargs"])
    load_ckpt(model_config.get("src_ckpt"), model=model, strict=True)
    return model


def small_loaders(train_config):
    for loader in ("train_data_loader", "val_data_loader"):
        train_config[loader]["kwargs"].update(batch_size=BATCH, num_workers=0, pin_memory=False)


def read_config(path, home, monkeypatch):
    """The sample config as torchdistill reads it, its data sets under home/datasets (the
    configs' `~/datasets/`)."""
    monkeypatch.setenv("HOME", str(home))
    config = yaml_util.load_yaml_file(str(path))
    import_dependencies(config.get("dependencies"))
    return config


class Recorder:
    """Forward hooks of the test's own (not torchdistill's io_dict): the pooled features and
    the logits of the network, on every forward."""

    def __init__(self, model):
        self.values = {}
        model.avgpool.register_forward_hook(self.keep("features"))
        model.register_forward_hook(self.keep("logits"))

    def keep(self, name):
        def hook(module, inputs, output):
            self.values[name] = output.detach().flatten(1).clone()
        return hook


def expected_loss(box, student_seen, teacher_seen, targets, with_kd):
    """CE (+ T^2 KD) + icd_fast.icd_loss of the heads applied to the recorded features, with
    theta and b as they were at the forward."""
    student, teacher = box.student_model, box.teacher_model
    with torch.no_grad():
        z_s = F.linear(student_seen["features"], student.embed.weight, student.embed.bias)
        z_t = F.linear(teacher_seen["features"], teacher.embed.weight, teacher.embed.bias)
        icd = icd_fast.icd_loss(z_s, z_t, student.params.log_scale, student.params.bias,
                                alpha=0.5, max_scale=10.0)
        logits = student_seen["logits"]
        loss = F.cross_entropy(logits, targets) + icd
        if with_kd:
            loss = loss + KD_TEMPERATURE ** 2 * F.kl_div(
                F.log_softmax(logits / KD_TEMPERATURE, dim=1),
                F.softmax(teacher_seen["logits"] / KD_TEMPERATURE, dim=1),
                reduction="batchmean")
    return icd.item(), loss.item()


def distil_a_few_steps(config, teacher, student, with_kd):
    """torchdistill's training loop of its example script, one epoch; returns the box, the
    logged losses, the expected ones, the ICD terms and the teacher head's initial weight."""
    box = get_distillation_box(teacher, student, config["datasets"], config["train"],
                               torch.device("cpu"), None, False, 1)
    teacher_head = box.teacher_model.embed.weight.detach().clone()
    teacher_seen, student_seen = Recorder(teacher), Recorder(student)
    metric_logger = MetricLogger(delimiter="  ")
    logged, expected, icd_terms = [], [], []
    box.pre_epoch_process(epoch=0)
    for sample_batch, targets, supp_dict in box.train_data_loader:
        loss = box.forward_process(sample_batch, targets, supp_dict)
        icd, total = expected_loss(box, student_seen.values, teacher_seen.values, targets,
                                   with_kd)
        box.post_forward_process(loss=loss)
        metric_logger.update(loss=loss.item())
        logged.append(metric_logger.meters["loss"].value)
        expected.append(total)
        icd_terms.append(icd)
    return box, logged, expected, icd_terms, teacher_head


@pytest.mark.parametrize("path, with_kd", [(CIFAR_ICD, False), (CIFAR_ICD_KD, True)],
                         ids=["icd", "icd_kd"])
def test_cifar100_sample_config_logs_the_icd_loss(path, with_kd, tmp_path, monkeypatch,
                                                  no_md5):
    torch.manual_seed(0)
    write_cifar100(tmp_path / "datasets" / "cifar100", n_train=3 * BATCH, n_test=BATCH)
    config = read_config(path, tmp_path, monkeypatch)
    small_loaders(config["train"])
    models = config["models"]
    # The teacher's weights: a file in the CRD benchmark's published format, read through
    # the hub entry's safe loader (the sample's `checkpoint`).
    trained = get_model("resnet32x4", str(REPO), source="local", num_classes=100)
    teacher_file = tmp_path / "resnet32x4_vanilla" / "ckpt_epoch_240.pth"
    teacher_file.parent.mkdir()
    torch.save({"epoch": 240, "model": trained.state_dict(), "accuracy": 79.42}, teacher_file)
    for role in ("teacher_model", "student_model"):
        assert models[role]["repo_or_dir"] == "."  # the checkout the command runs from
        models[role]["repo_or_dir"] = str(REPO)
    models["teacher_model"]["kwargs"]["checkpoint"] = str(teacher_file)
    teacher, student = load_model(models["teacher_model"]), load_model(models["student_model"])
    assert torch.equal(teacher.fc.weight, trained.fc.weight)
    backbone_before = {k: v.clone() for k, v in teacher.state_dict().items()}

    box, logged, expected, icd_terms, teacher_head = distil_a_few_steps(config, teacher, student,
                                                                        with_kd)

    assert len(logged) == 3
    assert logged == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert all(term > 0 for term in icd_terms)
    theta = box.student_model.params.log_scale.item()
    assert theta != 1.0  # the sample's init_log_scale, trained by torchdistill's optimiser
    # The teacher's network is frozen and its batch-norm statistics stay fixed; its head learns.
    after = teacher.state_dict()
    assert all(torch.equal(after[k], v) for k, v in backbone_before.items())
    assert not teacher.training
    assert not torch.equal(box.teacher_model.embed.weight, teacher_head)


def test_imagenet_sample_config_logs_the_icd_loss(tmp_path, monkeypatch):
    import torchvision.transforms as T

    torch.manual_seed(0)
    write_image_folder(tmp_path / "datasets" / "ilsvrc2012", classes=("a", "b"), per_class=8,
                       size=40)
    config = read_config(IMAGENET_ICD, tmp_path, monkeypatch)
    small_loaders(config["train"])
    # Small images (the sample crops 224) and no download of torchvision's ResNet-34 weights.
    for dataset in config["datasets"].values():
        dataset.transform = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()])
    assert config["models"]["teacher_model"]["kwargs"]["weights"] is not None
    config["models"]["teacher_model"]["kwargs"]["weights"] = None
    teacher = load_model(config["models"]["teacher_model"])
    student = load_model(config["models"]["student_model"])

    box, logged, expected, _, _ = distil_a_few_steps(config, teacher, student, with_kd=False)

    assert len(logged) == 2
    assert logged == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert box.student_model.params.log_scale.item() != 1.0


def test_missing_hook_names_the_config_entry(tmp_path, monkeypatch, no_md5):
    """A config that forgets to hook the student's head gets an error saying what to add."""
    write_cifar100(tmp_path / "datasets" / "cifar100", n_train=BATCH, n_test=BATCH)
    config = read_config(CIFAR_ICD, tmp_path, monkeypatch)
    small_loaders(config["train"])
    config["train"]["student"]["forward_hook"]["output"].remove("embed")
    student = get_model("resnet8x4", str(REPO), source="local", num_classes=100)
    teacher = get_model("resnet8x4", str(REPO), source="local", num_classes=100)
    box = get_distillation_box(teacher, student, config["datasets"], config["train"],
                               torch.device("cpu"), None, False, 1)
    box.pre_epoch_process(epoch=0)
    sample_batch, targets, supp_dict = next(iter(box.train_data_loader))
    with pytest.raises(KeyError, match="student's io_dict holds no output of 'embed'.*"
                                       "forward_hook.output"):
        box.forward_process(sample_batch, targets, supp_dict)


def test_the_package_imports_no_framework():
    """icd_fast and icd_fast.integrations import without torchdistill: only the integration
    module itself needs it."""
    import subprocess
    import sys

    code = ("import sys, icd_fast, icd_fast.integrations; "
            "assert 'torchdistill' not in sys.modules, 'torchdistill was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
