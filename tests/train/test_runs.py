"""`run` (train/runs.py): a config end to end, the teacher it distils from, the run folders of
loss weights."""
import json

import pytest

from train.cli import main

from helpers import printed_table, write_cifar100, write_image_folder, write_stl10


def test_run_folders_of_other_loss_weights_stay_apart():
    from train.run_folder import run_folder_name

    name = "cifar100/wrn_40_2-wrn_16_2/icd"
    assert run_folder_name(name, 0) == "cifar100__wrn_40_2-wrn_16_2__icd__seed0"
    assert run_folder_name(name, 1, {"beta": 2.0, "alpha": 0.1}) == (
        "cifar100__wrn_40_2-wrn_16_2__icd__alpha=0.1__beta=2__seed1")
    # the results' glob of a config's own runs does not pick up a sweep's
    import fnmatch
    assert not fnmatch.fnmatch(run_folder_name(name, 1, {"beta": 2.0}),
                               run_folder_name(name, "*"))


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
