"""The commands end to end (train/cli.py): teacher, distill, evaluate; a missing data set."""
from train.cli import main as cli_main


def test_teacher_distill_evaluate_commands_end_to_end(tmp_path, capsys):
    common = ["--dataset", "digits", "--epochs", "2", "--batch-size", "64"]
    assert cli_main(["train-teacher", "--model", "resnet8", "--out", str(tmp_path / "t"),
                     *common]) == 0
    teacher_ckpt = tmp_path / "t" / "best.pt"
    assert cli_main(["distill", "--teacher", "resnet8", "--teacher-ckpt", str(teacher_ckpt),
                     "--student", "resnet8", "--method", "icd_kd", "--out", str(tmp_path / "s"),
                     *common]) == 0
    assert cli_main(["evaluate", "--dataset", "digits", "--model", "resnet8",
                     "--ckpt", str(tmp_path / "s" / "best.pt")]) == 0
    out = capsys.readouterr().out
    assert "icd_kd resnet8: epoch 1" in out and "test top-1" in out
    # Resuming a finished run trains nothing more and keeps its history.
    assert cli_main(["distill", "--teacher", "resnet8", "--teacher-ckpt", str(teacher_ckpt),
                     "--student", "resnet8", "--out", str(tmp_path / "s"), "--resume",
                     *common]) == 0
    assert cli_main(["evaluate", "--dataset", "digits", "--model", "resnet20",
                     "--ckpt", str(teacher_ckpt)]) == 2
    assert "does not hold a resnet20" in capsys.readouterr().err


def test_missing_data_set_is_one_clear_line(tmp_path, capsys):
    assert cli_main(["train-teacher", "--model", "resnet8", "--dataset", "cifar100",
                     "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: CIFAR-100 not found") and "--download" in err
