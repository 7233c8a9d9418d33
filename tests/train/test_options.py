"""The command line's door (train/cli.py): options become frozen, typed values, and a sweep's
cells are the `run` plan with the swept weight and the seed replaced."""
import dataclasses
from pathlib import Path

import pytest

from train import cli, sweeps
from train.cli import main
from train.options import LossWeights, RecipeOverrides, RunPlan, Session


def test_run_hands_the_config_a_frozen_typed_plan(tmp_path, monkeypatch):
    plans = []
    monkeypatch.setattr(cli, "run_config", lambda plan: plans.append(plan) or 0)
    assert main(["run", "cifar100/resnet56-resnet20/icd", "--runs", str(tmp_path),
                 "--epochs", "3", "--weight-decay", "0", "--lr-decay-epochs", "1", "2",
                 "--beta", "2.5", "--seed", "4", "--device", "cpu", "--no-progress",
                 "--teacher-epochs", "7", "--probe-epochs", "5"]) == 0
    [plan] = plans
    assert isinstance(plan, RunPlan) and plan.runs == tmp_path and plan.out is None
    assert plan.recipe == RecipeOverrides(epochs=3, lr_decay_epochs=(1, 2), weight_decay=0.0)
    assert plan.loss_weights == LossWeights(beta=2.5)
    assert plan.session == Session(device="cpu", seed=4)
    assert plan.teacher_epochs == 7 and plan.probe.epochs == 5 and plan.probe.seed == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.session.seed = 5


def test_a_sweep_runs_the_run_plan_with_the_weight_and_seed_replaced(tmp_path, monkeypatch):
    plans = []
    monkeypatch.setattr(sweeps, "run_config", lambda plan: plans.append(plan) or 0)
    monkeypatch.setattr(sweeps, "plot_sweep", lambda *a: tmp_path / "figure.png")
    assert main(["sweep", "cifar100/resnet56-resnet20/icd", "--param", "lambda",
                 "--values", "0.5", "2", "--seeds", "0", "3", "--runs", str(tmp_path),
                 "--alpha", "0.7", "--epochs", "2", "--device", "cpu", "--no-progress"]) == 0
    assert [(p.loss_weights.kd_weight, p.session.seed) for p in plans] == [
        (0.5, 0), (0.5, 3), (2.0, 0), (2.0, 3)]
    first = plans[0]
    # Everything else is the plan `run` would get from the same options.
    assert all(dataclasses.replace(p, loss_weights=first.loss_weights,
                                   session=first.session) == first for p in plans)
    assert first.loss_weights == LossWeights(kd_weight=0.5, alpha=0.7)
    assert first.recipe == RecipeOverrides(epochs=2) and first.out is None
    assert first.runs == Path(tmp_path)


def test_the_swept_weight_given_as_a_fixed_option_is_refused(tmp_path, capsys):
    assert main(["sweep", "cifar100/resnet56-resnet20/icd", "--param", "beta", "--beta", "1",
                 "--runs", str(tmp_path), "--plot-only"]) == 2
    assert "--beta is the swept parameter" in capsys.readouterr().err


def test_a_cells_linear_probe_draws_from_the_cells_seed(monkeypatch):
    from train import runs

    recipes = []
    monkeypatch.setattr(runs, "probe_checkpoint", lambda *a: recipes.append(a[5]) or 0.0)
    plan = RunPlan(config="cifar100/resnet56-resnet20/icd", runs=Path("runs"), data_root="d",
                   download=False, session=Session(seed=0, workers=2))
    cell = sweeps.cell_plan(plan, sweeps.SWEEP_PARAMETERS["beta"], 1.0, 3)
    runs.probe_plan(cell, "resnet20", "last.pt", "stl10", "root")
    assert (recipes[0].seed, recipes[0].num_workers) == (3, 2)
