"""Figures: correlation maps, sweeps, run curves and the results' bar charts. The values each
figure plots are read back from the JSON written beside it and compared with a direct
computation (numpy.corrcoef on the same logits, the runs' own log.csv files)."""
import csv
import json
import math
import statistics

import numpy as np
import pytest
import torch

from data_files import write_cifar100
from train.cli import main
from train.data.catalog import load_data
from train.figures.correlation import LogitCorrelation, correlation_differences
from train.figures.output import save_figure, pyplot
from train.figures.tables import plot_table
from train.models import build_model
from train.results import Cell, ResultTable
from train.run_folder import parse_run_folder_name, run_folder_name


def sidecar(figure_path):
    return json.loads(figure_path.with_suffix(".json").read_text())


def only_file(folder, pattern):
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, (pattern, [p.name for p in folder.iterdir()])
    return found[0]


def off_diagonal(matrix):
    return matrix[~np.eye(len(matrix), dtype=bool)]


def test_streamed_correlation_equals_numpy_corrcoef():
    generator = torch.Generator().manual_seed(0)
    # Correlated classes far from zero mean: a naive sum-of-squares formula loses digits here.
    mixing = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    logits = 1e4 + torch.randn(203, 6, generator=generator, dtype=torch.float64) @ mixing
    streamed = LogitCorrelation(6)
    for batch in torch.split(logits, [1, 64, 7, 0, 131]):
        streamed.update(batch)
    np.testing.assert_allclose(streamed.matrix(), np.corrcoef(logits.numpy().T),
                               rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match=r"shape \(batch, 6\), got \(3, 5\)"):
        streamed.update(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="at least 2 samples, got 1"):
        one = LogitCorrelation(6)
        one.update(logits[:1])
        one.matrix()


def test_difference_statistics_are_over_the_off_diagonal_entries():
    teacher = np.array([[1.0, 0.5, -0.2], [0.5, 1.0, 0.1], [-0.2, 0.1, 1.0]])
    student = np.array([[1.0, 0.1, 0.3], [0.1, 1.0, 0.1], [0.3, 0.1, 1.0]])
    (d,) = correlation_differences(teacher, [student], ["kd"])
    # off-diagonal |differences|: 0.4, 0.5, 0.4, 0.0, 0.5, 0.0
    assert d.mean_abs == pytest.approx(1.8 / 6) and d.max_abs == pytest.approx(0.5)


def save_run_checkpoint(folder, model_name, seed):
    torch.manual_seed(seed)
    model = build_model(model_name, 100)
    folder.mkdir(parents=True)
    # A run folder is read by its final epoch's last.pt (the distiller's state: the student's
    # weights under "student.").
    distiller = {f"student.{k}": v for k, v in model.state_dict().items()}
    torch.save({"distiller": distiller, "epoch": 0}, folder / "last.pt")
    return model


def test_correlation_command_maps_each_student_against_the_teacher(tmp_path, no_md5, capsys):
    data = tmp_path / "data"
    write_cifar100(data, n_train=4, n_test=48)
    runs = tmp_path / "runs"
    teacher = save_run_checkpoint(runs / "cifar100" / "teacher-resnet56", "resnet56", 0)
    kd = save_run_checkpoint(runs / "cifar100__resnet56-resnet20__kd__seed0", "resnet20", 1)
    icd = save_run_checkpoint(runs / "cifar100__resnet56-resnet20__icd__seed0", "resnet20", 2)
    figures = tmp_path / "figures"
    assert main(["correlation", "--dataset", "cifar100", "--data", str(data), "--device", "cpu",
                 "--teacher-ckpt", str(runs / "cifar100" / "teacher-resnet56"),
                 "--student", str(runs / "cifar100__resnet56-resnet20__kd__seed0"),
                 str(runs / "cifar100__resnet56-resnet20__icd__seed0"),
                 "--batch-size", "10", "--out", str(figures)]) == 0
    out = capsys.readouterr().out
    figure = only_file(figures, "*.png")
    assert figure.name == ("cifar100_teacher-resnet56_logit-correlation-difference_kd-icd.png")
    values = sidecar(figure)
    # Direct computation: all test logits at once (from the command's batches of 10, so
    # that they are the same float32 numbers), then numpy.corrcoef.
    images = torch.stack([image for image, _ in load_data("cifar100", data, False)[1]])
    with torch.no_grad():
        corr = {name: np.corrcoef(torch.cat([model.eval()(batch) for batch in
                                             images.split(10)]).double().numpy().T)
                for name, model in (("teacher", teacher), ("kd", kd), ("icd", icd))}
    np.testing.assert_allclose(values["teacher_correlation"], corr["teacher"], atol=1e-9)
    assert [s["label"] for s in values["students"]] == ["kd", "icd"]  # from the run configs
    largest = 0.0
    for student in values["students"]:
        expected = np.abs(corr["teacher"] - corr[student["label"]])
        np.testing.assert_allclose(student["difference"], expected, atol=1e-9)
        mean, peak = off_diagonal(expected).mean(), off_diagonal(expected).max()
        assert student["mean_abs_difference"] == pytest.approx(mean, abs=1e-9)
        assert student["max_abs_difference"] == pytest.approx(peak, abs=1e-9)
        assert (f"{student['label']}: mean |C_teacher - C_student| {mean:.4f}, "
                f"max {peak:.4f}") in out
        largest = max(largest, peak)
    assert values["colour_scale"] == pytest.approx([0.0, largest])  # shared by the panels
    # A bare checkpoint needs its architecture; a wrong one is named.
    assert main(["correlation", "--dataset", "cifar100", "--data", str(data), "--device", "cpu",
                 "--teacher-ckpt", str(runs / "cifar100" / "teacher-resnet56" / "last.pt"),
                 "--student", str(tmp_path / "runs" / "cifar100__resnet56-resnet20__kd__seed0"
                                  / "last.pt"), "--student-model", "resnet8",
                 "--out", str(figures)]) == 2
    assert "does not hold a resnet8" in capsys.readouterr().err


def final_top1(folder):
    with open(folder / "log.csv") as f:
        return float(list(csv.DictReader(f))[-1]["test_acc"])


def test_sweep_runs_each_cell_once_and_plots_mean_and_std_over_seeds(tmp_path, no_md5, capsys):
    data = tmp_path / "data"
    write_cifar100(data, n_train=32, n_test=16)
    save_run_checkpoint(tmp_path / "teacher", "resnet56", 0)
    runs = tmp_path / "runs"
    config = "cifar100/resnet56-resnet20/icd"
    command = ["sweep", config, "--param", "beta", "--values", "0.1", "10", "--seeds", "0", "1",
               "--data", str(data), "--runs", str(runs), "--teacher-ckpt",
               str(tmp_path / "teacher" / "last.pt"), "--epochs", "1", "--batch-size", "16",
               "--device", "cpu"]
    assert main(command) == 0
    figure = only_file(runs / "figures", "*.png")
    assert figure.name == "cifar100_resnet56-resnet20_icd_top1-vs-beta.png"
    folders = {(value, seed): runs / run_folder_name(config, seed, {"beta": value})
               for value in (0.1, 10.0) for seed in (0, 1)}
    stamps = {key: (folder / "last.pt").stat().st_mtime_ns for key, folder in folders.items()}
    values = sidecar(figure)
    assert values["log_axis"] is True  # 0.1 to 10 spans two decades
    assert [p["value"] for p in values["points"]] == [0.1, 10.0]
    for point in values["points"]:
        top1 = [final_top1(folders[(point["value"], seed)]) for seed in (0, 1)]
        assert point["top1"] == top1
        assert point["mean"] == pytest.approx(statistics.mean(top1))
        assert point["std"] == pytest.approx(statistics.stdev(top1))
    # Again, with one more value, plotted only: nothing is retrained and the new value is
    # named as not run.
    capsys.readouterr()
    assert main(command) == 0
    assert main([*command[:5], "0.1", "1", "10", *command[7:], "--plot-only"]) == 0
    assert "beta = 1: top-1 not run" in capsys.readouterr().out
    assert {key: (folder / "last.pt").stat().st_mtime_ns
            for key, folder in folders.items()} == stamps
    assert sorted(p.name for p in runs.iterdir()) == sorted(
        ["figures", *(f.name for f in folders.values())])
    assert [p["mean"] is None for p in sidecar(figure)["points"]] == [False, True, False]
    # The swept weight cannot also be fixed.
    assert main([*command, "--beta", "2"]) == 2


def test_run_folder_names_read_back():
    name = run_folder_name("cifar100/wrn_40_2-wrn_16_2/icd_kd", 2, {"lam": 0.25, "alpha": 1e-5})
    assert parse_run_folder_name(name) == ("cifar100/wrn_40_2-wrn_16_2/icd_kd",
                                           {"alpha": 1e-5, "lam": 0.25}, 2)
    assert parse_run_folder_name("teacher-resnet56") is None


def write_log(folder, rows):
    folder.mkdir(parents=True)
    with open(folder / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_plot_draws_each_runs_logged_values(tmp_path, capsys):
    kd = [{"epoch": 0, "ce": 0.23, "kd": 1.5, "loss": 1.73, "lr": 0.05, "seconds": 3.0,
           "test_acc": 41.5},
          {"epoch": 1, "ce": 0.2, "kd": 1.25, "loss": 1.45, "lr": 0.005, "seconds": 3.1,
           "test_acc": 48.25}]
    icd = [{"epoch": 0, "ce": 2.0, "icd": 4.0, "loss": 6.0, "lr": 0.05, "seconds": 4.0,
            "test_acc": 40.0}]
    write_log(tmp_path / "cifar100__resnet56-resnet20__kd__seed0", kd)
    write_log(tmp_path / "cifar100__resnet56-resnet20__icd__beta=2__seed0", icd)
    assert main(["plot", str(tmp_path / "cifar100__resnet56-resnet20__kd__seed0"),
                 str(tmp_path / "cifar100__resnet56-resnet20__icd__beta=2__seed0"),
                 "--out", str(tmp_path / "figures"), "--format", "svg"]) == 0
    figure = only_file(tmp_path / "figures", "*.svg")
    assert figure.name == "curves_kd-vs-icd-beta=2.svg"
    assert f"figure: {figure}" in capsys.readouterr().out
    plotted = sidecar(figure)["runs"]
    assert [r["label"] for r in plotted] == ["kd", "icd (beta=2)"]
    for run, rows in zip(plotted, (kd, icd)):
        assert run["epoch"] == [r["epoch"] for r in rows]
        assert run["test_top1"] == [r["test_acc"] for r in rows]
        assert run["lr"] == [r["lr"] for r in rows]
        terms = [k for k in rows[0] if k not in ("epoch", "lr", "seconds", "test_acc")]
        assert list(run["train_loss"]) == ["loss", *sorted(t for t in terms if t != "loss")]
        for term in terms:
            assert run["train_loss"][term] == [r[term] for r in rows]
    assert main(["plot", str(tmp_path / "nowhere")]) == 2


def test_results_out_writes_markdown_and_a_bar_chart_per_table(tmp_path, capsys):
    runs = tmp_path / "runs"
    for name, accuracies in (("cifar100__resnet56-resnet20__kd__seed0", [60.0, 69.5]),
                             ("cifar100__resnet56-resnet20__icd_kd__seed0", [70.0]),
                             ("cifar100__resnet56-resnet20__icd_kd__seed1", [72.0]),
                             ("cifar100__resnet110-resnet20__icd__seed0", [66.0])):
        write_log(runs / name, [{"epoch": e, "test_acc": a, "lr": 0.05}
                                for e, a in enumerate(accuracies)])
    out = tmp_path / "out"
    assert main(["results", "--runs", str(runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    markdown = (out / "cifar100-same-family.md").read_text()
    assert "resnet56 -> resnet20" in markdown and "71.00 +- 1.41 (2)" in markdown
    chart = out / "cifar100-same-family_top1-measured-vs-published.png"
    assert f"wrote {chart}" in printed and chart.exists()
    cells = {(c["row"], c["column"]): c for c in sidecar(chart)["cells"]}
    both = cells[("resnet56 -> resnet20", "icd_kd")]
    assert both["measured"] == [70.0, 72.0] and both["mean"] == 71.0
    assert both["std"] == pytest.approx(math.sqrt(2))
    kd = cells[("resnet56 -> resnet20", "kd")]
    # The CRD paper's Table 1: KD resnet56 -> resnet20, 70.66.
    assert kd["mean"] == 69.5 and kd["published"] == 70.66
    # Nothing was measured for this cell: it is kept, marked empty, not drawn as zero.
    assert cells[("resnet56 -> resnet20", "icd")]["mean"] is None
    assert cells[("resnet110 -> resnet20", "icd")]["measured"] == [66.0]
    # FSP does not apply to wrn_40_2 -> wrn_40_1 (the paper's "n/a"): no bar, no mark.
    assert ("wrn_40_2 -> wrn_40_1", "fsp") not in cells
    assert ("wrn_40_2 -> wrn_16_2", "fsp") in cells


def test_bar_chart_puts_the_published_value_beside_the_measured(tmp_path):
    pair = "wrn_40_2 -> wrn_16_2"
    table = ResultTable(name="cifar100-same-family", rows=[pair], columns=["kd", "icd"],
                        cells={(pair, "kd"): Cell(measured=[74.5, 75.5], published=74.92),
                               (pair, "icd"): Cell(published=76.1)})
    path = plot_table(table, tmp_path, "pdf")
    assert path.name == "cifar100-same-family_top1-measured-vs-published.pdf"
    cells = sidecar(path)["cells"]
    assert [(c["column"], c["mean"], c["published"]) for c in cells] == [
        ("kd", 75.0, 74.92), ("icd", None, 76.1)]


def test_an_unknown_figure_format_is_named(tmp_path):
    figure = pyplot().figure()
    with pytest.raises(ValueError, match="one of png, pdf, svg, got 'jpg'"):
        save_figure(figure, tmp_path, "x", "jpg", {})


def test_demo_writes_its_figures_and_prints_each_methods_difference(tmp_path, capsys):
    assert main(["demo", "--teacher-epochs", "1", "--epochs", "1", "--seeds", "1",
                 "--image-size", "8", "--methods", "vanilla", "icd_kd",
                 "--figures", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    maps = tmp_path / "digits_teacher-resnet20_logit-correlation-difference_vanilla-icd_kd.png"
    chart = tmp_path / "digits-demo_top1-measured.png"
    assert maps.exists() and chart.exists() and str(maps) in out and str(chart) in out
    for student in sidecar(maps)["students"]:
        difference = np.array(student["difference"])
        assert difference.shape == (10, 10)
        assert (f"{student['label']:>8}: {off_diagonal(difference).mean():.4f}") in out
    table_rows = [line for line in out.splitlines() if line.startswith("| vanilla |")]
    assert len(table_rows) == 1
    (vanilla,) = [c for c in sidecar(chart)["cells"] if c["column"] == "vanilla"]
    assert table_rows[0] == f"| vanilla | {vanilla['mean']:.2f} +- 0.00 |"


def test_run_labels_come_from_the_folder_names_or_the_recorded_run_plan(tmp_path):
    from train.run_folder import write_plan
    from train.figures.run_folders import describe_run, run_labels

    distilled = tmp_path / "my-distillation"
    distilled.mkdir()
    write_plan(distilled, {"method": "icd_kd", "epochs": 3})
    runs = [describe_run(tmp_path / name) for name in (
        "cifar100__wrn_40_2-wrn_40_1__kd__seed0", "cifar100__wrn_40_2-wrn_40_1__kd__seed1",
        "cifar100__wrn_40_2-wrn_40_1__icd__alpha=0.1__seed0", "teacher-wrn_40_2")]
    runs.append(describe_run(distilled))
    assert run_labels(runs) == ["kd seed 0", "kd seed 1", "icd (alpha=0.1)", "teacher wrn_40_2",
                                "icd_kd"]
    assert [r.model for r in runs] == ["wrn_40_1"] * 3 + ["wrn_40_2", None]
    assert runs[0].teacher == "wrn_40_2"


def test_the_lambda_grid_spans_the_papers_range_on_a_log_axis():
    from train.figures.sweep import spans_decades
    from train.sweeps import SWEEP_PARAMETERS

    # The paper tests lambda from 0.1 to 100 and names 50 and 100 (collapse) and 0.5 to 1.
    for name in ("lambda", "kd-weight"):
        grid = SWEEP_PARAMETERS[name].grid
        assert (min(grid), max(grid)) == (0.1, 100) and {0.5, 1, 50, 100} <= set(grid)
        assert spans_decades(grid)
