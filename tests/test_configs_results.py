"""The tables as commands: every cell a config, the paper's published values, and `results`
in the paper's layout on run folders written here."""
import json

from helpers import printed_table
from train.cli import main
from train.configs import CONFIGS, TABLES
from train.run_folder import write_plan
from train.published import published_tables
from train.results import final_accuracy

COMPARISON = ("fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst")


def test_every_cell_of_tables_1_and_2_is_one_config(capsys):
    assert main(["configs"]) == 0
    listed = {line.strip() for line in capsys.readouterr().out.splitlines()
              if line.startswith("  ")}
    assert listed == set(CONFIGS)
    methods = ("vanilla", "kd") + COMPARISON + ("crd", "crd_kd", "icd", "icd_kd")
    for table in ("cifar100-same-family", "cifar100-other-family"):
        for teacher, student in TABLES[table][1]:
            for method in methods:
                name = f"cifar100/{teacher}-{student}/{method}"
                # FSP needs equal channels from the stem to the last stage: the paper's n/a.
                applicable = method != "fsp" or (
                    table == "cifar100-same-family" and student != "wrn_40_1")
                assert (name in listed) == applicable, name
    imagenet = {c.method for c in CONFIGS.values() if c.table == "imagenet"}
    assert imagenet == {"vanilla", "kd", "at", "sp", "crd", "crd_kd", "icd", "icd_kd"}
    transfer = {c.method for c in CONFIGS.values() if c.table == "transfer"}
    assert transfer == {"vanilla", "kd", "at", "fitnet", "crd", "crd_kd", "icd", "icd_kd"}


def test_published_values_are_the_papers_tables():
    tables = published_tables()
    expected_pairs = {table: {f"{t}-{s}" for t, s in TABLES[table][1]}
                      for table in ("cifar100-same-family", "cifar100-other-family", "transfer")}
    assert {k: set(v) for k, v in tables.items()} == expected_pairs
    columns = {"teacher", "vanilla", "kd", "crd", "crd_kd", "icd", "icd_kd", *COMPARISON}
    for table in ("cifar100-same-family", "cifar100-other-family"):
        for pair, values in tables[table].items():
            assert set(values) == columns, (table, pair)
            # The CRD paper's claim: CRD beats the other methods it compares and the
            # student alone; the ICD paper's: ICD+KD beats ICD alone and the student alone.
            others = [v for k, v in values.items()
                      if k not in ("teacher", "crd", "crd_kd", "icd", "icd_kd")
                      and isinstance(v, float)]
            assert values["crd"] > max(others), (table, pair)
            assert values["icd_kd"] > max(values["icd"], values["vanilla"]), (table, pair)
    # Spot checks against the CRD paper's Tables 1 and 2 and the ICD authors' README tables.
    same, other = tables["cifar100-same-family"], tables["cifar100-other-family"]
    assert same["resnet32x4-resnet8x4"]["crd"] == 75.51
    assert same["wrn_40_2-wrn_16_2"]["teacher"] == 75.61
    assert same["wrn_40_2-wrn_40_1"]["fsp"] == "n/a"
    assert other["vgg13-MobileNetV2"]["at"] == 59.40
    assert other["wrn_40_2-ShuffleV1"]["nst"] == 74.89
    assert all(v["fsp"] == "n/a" for v in other.values())
    assert same["resnet32x4-resnet8x4"]["crd_kd"] == 75.46
    assert same["wrn_40_2-wrn_16_2"]["icd_kd"] == 76.06
    assert other["resnet32x4-ShuffleV2"]["icd"] == 75.26
    probes = tables["transfer"]["wrn_40_2-wrn_16_2"]
    assert (probes["icd_kd stl10"], probes["icd_kd tiny-imagenet"]) == (72.5, 36.2)


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
    assert list(same)[1:] == ["teacher", "vanilla", "kd", *COMPARISON, "crd", "crd_kd", "icd",
                              "icd_kd"]
    column = header.index("resnet32x4 -> resnet8x4")
    assert same["teacher"][column] == "79.00 +- 0.00 (1) / 79.42"
    # Seeds 73 and 74: mean 73.5, sample std 0.71; the paper's FitNet 73.50.
    assert same["fitnet"][column] == "73.50 +- 0.71 (2) / 73.50"
    assert same["ab"][column] == "not run / 73.17"
    assert same["crd_kd"][column] == "not run / 75.46"
    assert same["fsp"][header.index("wrn_40_2 -> wrn_40_1")] == "n/a"

    other = printed_table(out, "cifar100-other-family")
    column = other["method"].index("resnet32x4 -> ShuffleV1")
    assert other["ab"][column] == "73.25 +- 0.00 (1) / 73.55"
    assert other["teacher"][column] == "79.00 +- 0.00 (1) / 79.42"  # the same teacher run
    assert set(other["fsp"][1:]) == {"n/a"}

    probes = printed_table(out, "transfer")
    assert probes["at stl10"][1] == "70.50 +- 0.00 (1) / 70.70"
    assert probes["at tiny-imagenet"][1] == "not run / 34.20"
    assert probes["at"][1] == "74.00 +- 0.00 (1) / n/r"  # no CIFAR-100 value in that table


def test_results_without_runs_say_so_and_still_list_every_cell(tmp_path, capsys):
    assert main(["results", "--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"no finished runs under {tmp_path}")
    imagenet = printed_table(out, "imagenet")
    assert list(imagenet)[1:] == ["teacher", "vanilla", "kd", "at", "sp", "crd", "crd_kd",
                                  "icd", "icd_kd"]
    assert all(cell == "not run / n/r" for row in list(imagenet.values())[1:]
               for cell in row[1:])
