"""The offline digits demo (train/demo.py)."""
from train.cli import main as cli_main


def test_demo_prints_the_table(capsys, tmp_path):
    assert cli_main(["demo", "--teacher-epochs", "1", "--epochs", "1", "--seeds", "2",
                     "--image-size", "8", "--methods", "vanilla", "icd",
                     "--figures", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| vanilla |" in out and "| icd |" in out and "+-" in out
