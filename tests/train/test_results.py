"""`results` (train/results.py): the tables from the run folders, the headline metric."""
import json

import pytest

from train.cli import main
from train.configs import applies
from train.results import final_accuracy, relative_improvement_over_kd
from train.run_folder import write_plan

from helpers import COMPARISON, printed_table


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


def finished_run(folder, accuracies):
    folder.mkdir(parents=True)
    rows = "\n".join(f"{e},{a},0.05" for e, a in enumerate(accuracies))
    (folder / "log.csv").write_text(f"epoch,test_acc,lr\n{rows}\n")


def test_relative_improvement_over_kd_is_the_papers_ratio():
    # (72 - 70) / (70 - 69) = 2 and (70 - 71) / (71 - 67) = -0.25: mean 87.5 %.
    assert relative_improvement_over_kd([(69.0, 70.0, 72.0), (67.0, 71.0, 70.0)]) == 87.5
    assert relative_improvement_over_kd([]) is None
    with pytest.raises(ValueError, match="KD and vanilla are both 70.0"):
        relative_improvement_over_kd([(70.0, 70.0, 71.0)])


def test_an_interrupted_run_is_not_a_result(tmp_path):
    folder = tmp_path / "cifar100__resnet32x4-resnet8x4__kd__seed0"
    finished_run(folder, [50.0, 60.0])
    write_plan(folder, {"method": "kd", "epochs": 5})  # asked for 5 epochs, stopped after 2
    assert final_accuracy(folder) is None
    assert main(["results", "--runs", str(tmp_path)]) == 0
    write_plan(folder, {"method": "kd", "epochs": 2})
    assert final_accuracy(folder) == 60.0


def test_results_print_the_papers_layout_beside_its_values(tmp_path, capsys):
    runs = tmp_path / "runs"
    finished_run(runs / "cifar100" / "teacher-resnet32x4", [60.0, 79.0])
    finished_run(runs / "cifar100__resnet32x4-resnet8x4__fitnet__seed0", [73.0])
    finished_run(runs / "cifar100__resnet32x4-resnet8x4__fitnet__seed1", [74.0])
    finished_run(runs / "cifar100__resnet32x4-ShuffleV1__ab__seed0", [73.25])
    transfer = runs / "transfer__wrn_40_2-wrn_16_2__at__seed0"
    finished_run(transfer, [74.0])
    (transfer / "probe-stl10.json").write_text(json.dumps({"test_acc": 70.5}))
    assert main(["results", "--runs", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "no finished runs" not in out

    same = printed_table(out, "cifar100-same-family")
    header = same["method"]
    assert header[1:] == ["wrn_40_2 -> wrn_16_2", "wrn_40_2 -> wrn_40_1", "resnet56 -> resnet20",
                          "resnet110 -> resnet20", "resnet110 -> resnet32",
                          "resnet32x4 -> resnet8x4", "vgg13 -> vgg8"]
    assert list(same)[1:] == ["teacher", "vanilla", "kd", *COMPARISON, "crd", "crd_kd", "ofd",
                              "wsld", "ipwd", "icd", "icd_kd"]
    column = header.index("resnet32x4 -> resnet8x4")
    assert same["teacher"][column] == "79.00 +- 0.00 (1) / 79.42"
    # Seeds 73 and 74: mean 73.5, sample std 0.71; the paper's FitNet 73.50.
    assert same["fitnet"][column] == "73.50 +- 0.71 (2) / 73.50"
    assert same["ab"][column] == "not run / 73.17"
    assert same["crd_kd"][column] == "not run / 75.46"
    assert same["fsp"][header.index("wrn_40_2 -> wrn_40_1")] == "n/a"
    # The paper prints n/a for WSLD here, yet WSLD applies: a config, not reported.
    assert same["wsld"][header.index("wrn_40_2 -> wrn_16_2")] == "not run / n/r"
    assert same["cc"][header.index("vgg13 -> vgg8")] == "not run / 70.81"  # not the CRD paper's

    other = printed_table(out, "cifar100-other-family")
    column = other["method"].index("resnet32x4 -> ShuffleV1")
    assert other["ab"][column] == "73.25 +- 0.00 (1) / 73.55"
    assert other["teacher"][column] == "79.00 +- 0.00 (1) / 79.42"  # the same teacher run
    assert set(other["fsp"][1:]) == {"n/a"}

    probes = printed_table(out, "transfer")
    assert probes["at stl10"][1] == "70.50 +- 0.00 (1) / 70.70"
    assert probes["at tiny-imagenet"][1] == "not run / 34.20"
    assert probes["at"][1] == "74.00 +- 0.00 (1) / n/r"  # no CIFAR-100 value in that table


def test_results_without_runs_print_the_papers_four_tables_and_headline(tmp_path, capsys):
    assert main(["results", "--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"no finished runs under {tmp_path}")
    imagenet = printed_table(out, "imagenet")
    assert list(imagenet)[1:] == ["teacher", "vanilla", "kd", "at", "sp", "cc", "vid", "rkd",
                                  "ab", "ft", "fsp", "nst", "crd", "ofd", "wsld", "ipwd", "icd",
                                  "icd_kd"]
    assert imagenet["method"][1:] == ["tv_resnet34 -> tv_resnet18", "tv_resnet50 -> tv_resnet18",
                                      "tv_resnet50 -> mobilenet_v1"]
    assert imagenet["teacher"][1:] == ["not run / 73.31", "not run / 76.16", "not run / 76.16"]
    assert imagenet["fsp"][1:] == ["not run / 70.58", "n/a", "n/a"]
    assert imagenet["ipwd"][1:] == ["not run / 71.88", "not run / n/r", "not run / 72.65"]
    probes = printed_table(out, "transfer")
    assert probes["teacher stl10"][1] == "not run / 68.60"
    assert probes["teacher tiny-imagenet"][1] == "not run / 31.50"
    claimed = printed_table(out, "relative-improvement-over-kd")
    assert claimed["icd"][1:] == ["not run", "20.31 % (13)"]
    assert claimed["icd_kd"][1:] == ["not run", "70.24 % (13)"]
    assert claimed["ipwd"][1:] == ["not run", "88.88 % (8)"]


def test_results_print_the_headline_of_the_measured_runs(tmp_path, capsys):
    runs = tmp_path / "runs"
    # resnet56 -> resnet20: vanilla 69, KD 71, ICD 72 (ratio 0.5); wrn_40_2 -> ShuffleV1:
    # vanilla 70, KD 74, ICD 73 over two seeds (ratio -0.25); resnet110 -> resnet32 has no
    # vanilla run and does not count.
    for name, accuracy in (("resnet56-resnet20__vanilla", 69.0), ("resnet56-resnet20__kd", 71.0),
                           ("resnet56-resnet20__icd", 72.0), ("wrn_40_2-ShuffleV1__vanilla", 70.0),
                           ("wrn_40_2-ShuffleV1__kd", 74.0), ("resnet110-resnet32__kd", 73.0),
                           ("resnet110-resnet32__icd", 74.0)):
        finished_run(runs / f"cifar100__{name}__seed0", [accuracy])
    finished_run(runs / "cifar100__wrn_40_2-ShuffleV1__icd__seed0", [72.5])
    finished_run(runs / "cifar100__wrn_40_2-ShuffleV1__icd__seed1", [73.5])
    assert main(["results", "--runs", str(runs)]) == 0
    rows = printed_table(capsys.readouterr().out, "relative-improvement-over-kd")
    assert rows["icd"][1:] == ["12.50 % (2)", "20.31 % (13)"]
    assert rows["icd_kd"][1] == "not run"
