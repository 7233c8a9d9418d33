"""Linear-probe transfer, and the configs of the paper's tables run by one command."""
import json

import pytest
import torch

from data_files import write_cifar100, write_image_folder, write_stl10
from helpers import printed_table
from train.cli import main
from train.configs import CONFIGS, TABLE_METHODS, TABLES, get_config
from train.data.digits import IN_CHANNELS, NUM_CLASSES, digits_datasets, stratified_subset
from train.distillers import DISTILLERS
from train.models import build_model, model_names
from train.probe import ProbeRecipe, classes_in_state_dict, linear_probe


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


def test_every_table_row_has_a_config_per_method():
    rows = {table: len(pairs) for table, (_, pairs) in TABLES.items()}
    assert rows == {"cifar100-same-family": 7, "cifar100-other-family": 6, "imagenet": 3,
                    "transfer": 1}
    # The paper's Table 3: ResNet-34 -> ResNet-18, ResNet-50 -> ResNet-18 and -> MobileNet V1.
    assert TABLES["imagenet"][1] == (("tv_resnet34", "tv_resnet18"),
                                     ("tv_resnet50", "tv_resnet18"),
                                     ("tv_resnet50", "mobilenet_v1"))
    # FSP cannot apply across widths: Table 1's wrn_40_2 -> wrn_40_1, Table 2's column, and
    # both ResNet-50 pairs of Table 3.
    assert len(CONFIGS) == 7 * 20 - 1 + 6 * 19 + rows["imagenet"] * 17 - 2 + 8
    # Every method of the tables is the registry's, but for the three baselines of the
    # paper's later version, which are implemented apart (train/distillers/, by those names).
    named = {m for methods in TABLE_METHODS.values() for m in methods}
    assert named - set(DISTILLERS) <= {"ofd", "wsld", "ipwd"}
    for config in CONFIGS.values():
        assert {config.teacher, config.student} <= set(model_names()), config
    assert get_config("cifar100/resnet32x4-ShuffleV2/icd_kd").student == "ShuffleV2"
    with pytest.raises(ValueError, match="unknown config 'cifar100/resnet56-resnet21/icd'; "
                                         "did you mean cifar100/resnet56-resnet20/icd"):
        get_config("cifar100/resnet56-resnet21/icd")
    with pytest.raises(ValueError) as unrelated:  # a typo is not matched to unrelated names
        get_config("cifar100/resnet32x4-ShuffleV2/ikd")
    assert "cifar100/vgg13-vgg8" not in str(unrelated.value)
    assert "cifar100/resnet32x4-ShuffleV2/kd" in str(unrelated.value)


def test_a_transfer_config_runs_end_to_end_from_one_command(tmp_path, no_md5, capsys):
    data = tmp_path / "data"
    write_cifar100(data, n_train=64, n_test=16)
    write_stl10(data, n_train=20, n_test=10)
    write_image_folder(data / "tiny-imagenet-200", classes=("n01", "n02", "n03"), per_class=4,
                       size=64)
    command = ["run", "transfer/wrn_40_2-wrn_16_2/icd_kd", "--data", str(data),
               "--stl10-data", str(data), "--tiny-imagenet-data", str(data / "tiny-imagenet-200"),
               "--runs", str(tmp_path / "runs"), "--epochs", "1", "--batch-size", "32",
               "--probe-epochs", "2", "--device", "cpu"]
    assert main(command) == 0
    out = capsys.readouterr().out
    teacher_run = tmp_path / "runs" / "cifar100" / "teacher-wrn_40_2"
    assert (teacher_run / "best.pt").exists()  # trained first, as no checkpoint existed
    student_run = tmp_path / "runs" / "transfer__wrn_40_2-wrn_16_2__icd_kd__seed0"
    assert (student_run / "best.pt").exists()
    assert {"probe-stl10.json", "probe-tiny-imagenet.json"} <= {p.name for p in student_run.iterdir()}
    # The teacher is probed too, once: its probes sit in its run folder, naming the final
    # epoch's checkpoint it was distilled from.
    teacher_probe = teacher_run / "probe-stl10.json"
    assert json.loads(teacher_probe.read_text())["checkpoint"] == str(
        (teacher_run / "last.pt").resolve())
    assert (teacher_run / "probe-tiny-imagenet.json").exists()
    assert "icd_kd wrn_16_2: epoch 0" in out
    assert "on stl10" in out and "on tiny-imagenet" in out
    # Run again: both stages resume from their finished checkpoints and train nothing more.
    stamp = (teacher_run / "last.pt").stat().st_mtime_ns
    probe_stamp = teacher_probe.stat().st_mtime_ns
    assert main(command) == 0
    assert (teacher_run / "last.pt").stat().st_mtime_ns == stamp
    assert teacher_probe.stat().st_mtime_ns == probe_stamp  # not probed again
    assert main(["run", "cifar100/resnet56-resnet21/icd"]) == 2
    assert main(["results", "--runs", str(tmp_path / "runs")]) == 0
    table = capsys.readouterr().out
    assert "| wrn_40_2 -> wrn_16_2 | " in table and "icd_kd stl10" in table
    probes = printed_table(table, "transfer")
    teacher_accuracy = json.loads(teacher_probe.read_text())["test_acc"]
    assert probes["teacher stl10"][1] == f"{teacher_accuracy:.2f} +- 0.00 (1) / 68.60"


def test_results_average_the_seeds_of_each_config(tmp_path, capsys):
    def finished_run(name, seed, accuracies):
        folder = tmp_path / f"{name}__seed{seed}"
        folder.mkdir()
        rows = "\n".join(f"{e},{a},0.05" for e, a in enumerate(accuracies))
        (folder / "log.csv").write_text(f"epoch,test_acc,lr\n{rows}\n")
    finished_run("cifar100__resnet56-resnet20__icd_kd", 0, [50.0, 70.0])
    finished_run("cifar100__resnet56-resnet20__icd_kd", 1, [40.0, 72.0])
    finished_run("cifar100__resnet56-resnet20__kd", 0, [69.5])
    finished_run("cifar100__resnet56-resnet20__icd", 3, [])  # started, no epoch finished
    assert main(["results", "--runs", str(tmp_path)]) == 0
    rows = printed_table(capsys.readouterr().out, "cifar100-same-family")
    column = rows["method"].index("resnet56 -> resnet20")
    # Final epochs 70 and 72: mean 71, sample std sqrt(2) = 1.41; the ICD authors' ICD+KD.
    assert rows["icd_kd"][column] == "71.00 +- 1.41 (2) / 71.81"
    assert rows["kd"][column] == "69.50 +- 0.00 (1) / 70.66"  # the CRD paper's KD
    assert rows["icd"][column] == "not run / 71.18"


@pytest.mark.parametrize("pair", sorted({(c.teacher, c.student, c.dataset)
                                         for c in CONFIGS.values()}), ids=str)
def test_every_table_pair_takes_an_icd_kd_step(pair):
    from train.distillers import build_distiller

    teacher_name, student_name, dataset = pair
    classes, size = (100, 32) if dataset == "cifar100" else (1000, 64)
    torch.manual_seed(0)
    distiller = build_distiller("icd_kd", build_model(student_name, classes),
                                build_model(teacher_name, classes))
    distiller.train()
    logits, losses = distiller(torch.randn(4, 3, size, size), torch.randint(0, classes, (4,)))
    assert logits.shape == (4, classes) and set(losses) == {"ce", "kd", "icd"}
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert distiller.criterion.log_scale.grad is not None
    assert all(p.grad is None for p in distiller.teacher.parameters())


IMAGENET_CONFIGS = sorted(name for name, c in CONFIGS.items()
                          if c.table == "imagenet" and c.method in DISTILLERS)


@pytest.fixture(scope="module")
def imagenet_models():
    """One set of weights per ImageNet architecture (built once: the ResNet-50 is large),
    copied for each config."""
    torch.manual_seed(0)
    names = {n for c in CONFIGS.values() if c.table == "imagenet" for n in (c.teacher, c.student)}
    return {name: build_model(name, 10) for name in names}


@pytest.mark.parametrize("name", IMAGENET_CONFIGS)
def test_every_imagenet_config_builds_its_distiller_and_takes_a_step(name, imagenet_models):
    """Table 3's methods on torchvision's ResNets and MobileNet V1 (feature points: the stem,
    the four stages, the pooled feature), on small inputs: both stages of the two-stage
    methods, and the student learns from each."""
    import copy

    from train.distillers import build_distiller

    config = get_config(name)
    student = copy.deepcopy(imagenet_models[config.student])
    teacher = copy.deepcopy(imagenet_models[config.teacher])
    samples = 16
    labels = torch.arange(samples) % 10
    distiller = build_distiller(config.method, student,
                                None if config.method == "vanilla" else teacher,
                                num_samples=samples, labels=labels,
                                example_images=torch.zeros(2, 3, 64, 64))
    torch.manual_seed(1)
    images, indices = torch.randn(4, 3, 64, 64), torch.tensor([0, 5, 10, 15])
    stages = [distiller.init_stage(), distiller]
    for stage in [s for s in stages if s is not None]:
        stage.train()
        params = (stage.trainable_parameters() if hasattr(stage, "trainable_parameters")
                  else [p for p in stage.parameters() if p.requires_grad])
        before = [p.detach().clone() for p in params]
        optimizer = torch.optim.SGD(params, lr=0.01)
        logits, losses = stage(images, labels[indices], indices)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        assert any(not torch.equal(b, p) for b, p in zip(before, params)), name
        if logits is not None:
            assert logits.shape == (4, 10)
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("choice, expected", [(None, "last.pt"), ("final", "last.pt"),
                                              ("best-on-test", "best.pt")])
def test_run_distils_from_the_teachers_final_epoch_unless_told(choice, expected, tmp_path,
                                                               monkeypatch):
    from train import runs

    loaded = []
    monkeypatch.setattr(runs, "load_data", lambda *a: None)
    monkeypatch.setattr(runs, "run_training", lambda *a, **k: None)
    monkeypatch.setattr(runs, "load_teacher", lambda name, data, ckpt, *a: loaded.append(ckpt))
    option = [] if choice is None else ["--teacher-epoch", choice]
    assert main(["run", "cifar100/resnet56-resnet20/kd", "--runs", str(tmp_path), *option]) == 0
    assert loaded == [tmp_path / "cifar100" / "teacher-resnet56" / expected]
