"""The tables as commands: every cell a config, the paper's published values, and `results`
in the paper's layout on run folders written here."""
import json
from pathlib import Path

import pytest
import torch

from helpers import printed_table
from train.cli import main
from train.configs import CONFIGS, TABLE_METHODS, TABLES, applies
from train.models import build_model, feature_points
from train.published import (PAPER, published_headline, published_tables, published_value,
                             sources)
from train.results import (collect_tables, final_accuracy, headline,
                           relative_improvement_over_kd)
from train.run_folder import write_plan

COMPARISON = ("fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst")
PAPER_TABLES = json.loads((Path(__file__).parent / "fixtures" / "paper_tables.json").read_text())
# The transcription's table names -> the application's.
TRANSCRIBED = {"table1_cifar100_same_family": "cifar100-same-family",
               "table2_cifar100_other_family": "cifar100-other-family",
               "table3_imagenet": "imagenet"}


def transcribed_pair(table: str, pair: str) -> str:
    """The application's name of a transcribed pair (ImageNet: torchvision's ResNets)."""
    if table != "imagenet":
        return pair
    return "-".join(m if m == "mobilenet_v1" else f"tv_{m}" for m in pair.split("-"))


def test_every_cell_of_the_papers_tables_is_one_config(capsys):
    assert main(["configs"]) == 0
    listed = {line.strip() for line in capsys.readouterr().out.splitlines()
              if line.startswith("  ")}
    assert listed == set(CONFIGS)
    counts = {table: sum(c.table == table for c in CONFIGS.values()) for table in TABLES}
    # 7 pairs x 20 methods less FSP of wrn_40_2 -> wrn_40_1; 6 x 19 (no FSP); 3 x 17 less FSP
    # of both ResNet-50 pairs; 8 transfer methods.
    assert counts == {"cifar100-same-family": 139, "cifar100-other-family": 114,
                      "imagenet": 49, "transfer": 8}
    cifar = ("vanilla", "kd") + COMPARISON + ("crd", "crd_kd", "ofd", "wsld", "ipwd", "icd",
                                              "icd_kd")
    for table in ("cifar100-same-family", "cifar100-other-family"):
        for teacher, student in TABLES[table][1]:
            for method in cifar:
                name = f"cifar100/{teacher}-{student}/{method}"
                # FSP needs equal channels from the stem to the last stage: the paper's n/a.
                applicable = method != "fsp" or (
                    table == "cifar100-same-family" and student != "wrn_40_1")
                assert (name in listed) == applicable, name
    # Table 3: every method the paper prints a row for, n/a cells included (they apply),
    # except FSP across widths.
    for transcribed, cells in PAPER_TABLES["tables"]["table3_imagenet"].items():
        pair = transcribed_pair("imagenet", transcribed)
        printed = {m for m in cells if m != "teacher"}
        configs = {c.method for c in CONFIGS.values()
                   if c.table == "imagenet" and f"{c.teacher}-{c.student}" == pair}
        expected = printed if pair == "tv_resnet34-tv_resnet18" else printed - {"fsp"}
        assert configs == expected, pair
    assert "imagenet/tv_resnet50-tv_resnet18/wsld" in listed  # n/a in the paper: still runs
    transfer = {c.method for c in CONFIGS.values() if c.table == "transfer"}
    assert transfer == {"vanilla", "kd", "at", "fitnet", "crd", "crd_kd", "icd", "icd_kd"}


@pytest.mark.parametrize("table", sorted(TABLES))
def test_fsp_has_a_config_exactly_where_the_widths_match(table):
    dataset, pairs = TABLES[table]
    size = 32 if dataset == "cifar100" else 64
    for teacher, student in pairs:
        widths = []
        for name in (teacher, student):
            model = build_model(name, 10).eval()
            with torch.no_grad():
                points, _ = feature_points(model, torch.zeros(1, 3, size, size))
            widths.append([p.shape[1] for p in points[:-1]])  # the stem and the stages
        assert applies("fsp", teacher, student) == (widths[0] == widths[1]), (teacher, student)
        assert all(applies(m, teacher, student) for m in TABLE_METHODS[table] if m != "fsp")


def test_published_values_are_the_papers_cell_for_cell():
    tables = published_tables()
    seen = 0
    for transcribed, table in TRANSCRIBED.items():
        assert set(tables[table]) == {f"{t}-{s}" for t, s in TABLES[table][1]}
        for pair, cells in PAPER_TABLES["tables"][transcribed].items():
            name = transcribed_pair(table, pair)
            teacher, student = name.split("-")
            assert set(tables[table][name]) == set(cells), (table, name)
            for method, cell in cells.items():
                assert published_value(table, teacher, student, method) == cell["value"]
                seen += 1
    probes = PAPER_TABLES["tables"]["table4_transfer_wrn_40_2-wrn_16_2"]
    for transcribed_set, transfer_set in (("stl10", "stl10"), ("tiny_imagenet", "tiny-imagenet")):
        for method, cell in probes[transcribed_set].items():
            assert published_value("transfer", "wrn_40_2", "wrn_16_2",
                                   f"{method} {transfer_set}") == cell["value"]
            seen += 1
    assert seen == 7 * 21 + 6 * 20 + 3 * 18 + 2 * 9
    # The cells where other publications print another number are theirs, named.
    assert published_value("cifar100-same-family", "vgg13", "vgg8", "cc") == 70.81
    assert published_value("cifar100-same-family", "vgg13", "vgg8", "cc", "crd-paper") == 70.71
    assert published_value("cifar100-other-family", "wrn_40_2", "ShuffleV1", "nst") == 76.09
    assert published_value("cifar100-other-family", "resnet32x4", "ShuffleV1", "icd_kd",
                           "dcd-readme") == 76.01
    assert published_value("cifar100-same-family", "vgg13", "vgg8", "icd",
                           "icd-paper-earlier-version") == 72.98
    assert list(sources())[0] == PAPER and len(sources()) == 4
    with pytest.raises(ValueError, match="unknown source of published values 'crd'"):
        published_tables("crd")


def test_the_published_values_give_the_papers_headline(tmp_path):
    assert published_headline() == {"icd": 20.31, "icd_kd": 70.24}
    by_method = {h.method: h for h in headline(collect_tables(tmp_path))}
    assert round(by_method["icd"].published, 2) == 20.31
    assert round(by_method["icd_kd"].published, 2) == 70.24
    assert by_method["icd"].published_pairs == by_method["icd_kd"].published_pairs == 13
    # WSLD is reported for 8 of the 13 students, FSP (equal widths only) for 6.
    assert (by_method["wsld"].published_pairs, by_method["fsp"].published_pairs) == (8, 6)
    assert all(h.measured is None and h.measured_pairs == 0 for h in by_method.values())


def test_relative_improvement_over_kd_is_the_papers_ratio():
    # (72 - 70) / (70 - 69) = 2 and (70 - 71) / (71 - 67) = -0.25: mean 87.5 %.
    assert relative_improvement_over_kd([(69.0, 70.0, 72.0), (67.0, 71.0, 70.0)]) == 87.5
    assert relative_improvement_over_kd([]) is None
    with pytest.raises(ValueError, match="KD and vanilla are both 70.0"):
        relative_improvement_over_kd([(70.0, 70.0, 71.0)])


def finished_run(folder, accuracies):
    folder.mkdir(parents=True)
    rows = "\n".join(f"{e},{a},0.05" for e, a in enumerate(accuracies))
    (folder / "log.csv").write_text(f"epoch,test_acc,lr\n{rows}\n")


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
