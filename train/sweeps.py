"""`sweep`: one config over a grid of one loss weight and several seeds (Figure 2 of the
paper). Each cell of the grid is an ordinary `run` of the config with that weight and seed
(runs.run_config), in the run folder run_folder.run_folder_name gives it, so a sweep resumes
and never retrains a finished cell; figures/sweep.py draws the result."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

from . import distributed
from .configs import get_config
from .figures.sweep import plot_sweep
from .options import RunPlan, SweepRequest
from .results import final_accuracy
from .run_folder import run_folder_name
from .runs import run_config
from .stats import mean_and_std
from .training import loss_weight_options


@dataclass(frozen=True)
class SweepParameter:
    argument: str  # the field of LossWeights that sets it
    grid: Tuple[float, ...]  # the default values
    symbol: str  # its name on the figure's axis


LAMBDA_GRID = (0.1, 0.5, 1, 2, 5, 10, 50, 100)
SWEEP_PARAMETERS: Dict[str, SweepParameter] = {
    # The paper's grids for alpha (ICD's invariance weight) and beta (ICD's weight).
    "alpha": SweepParameter("alpha", (0.01, 0.1, 0.3, 0.5, 0.7, 1, 2, 5), r"$\alpha$"),
    "beta": SweepParameter("beta", (0.1, 0.5, 1, 2, 5, 10, 50, 100), r"$\beta$"),
    # lambda (the KD weight): the paper tests 0.1 to 100 (50 and 100 collapse training, 0.5
    # to 1 perform alike) without listing its values; its beta grid spans the same range.
    "lambda": SweepParameter("kd_weight", LAMBDA_GRID, r"$\lambda$"),
    "kd-weight": SweepParameter("kd_weight", LAMBDA_GRID, r"$\lambda$"),
    "gamma": SweepParameter("gamma", (0.1, 0.5, 1, 2, 5), r"$\gamma$"),
}


def cell_plan(plan: RunPlan, parameter: SweepParameter, value: float, seed: int) -> RunPlan:
    """The `run` plan of one cell: the sweep's own with this value and seed, in the run
    folder named after them."""
    return dataclasses.replace(
        plan, out=None, session=dataclasses.replace(plan.session, seed=seed),
        loss_weights=dataclasses.replace(plan.loss_weights, **{parameter.argument: value}))


def cell_folder(plan: RunPlan, parameter: SweepParameter, value: float, seed: int) -> Path:
    cell = cell_plan(plan, parameter, value, seed)
    return Path(plan.runs) / run_folder_name(plan.config, seed,
                                             loss_weight_options(cell.loss_weights))


def collect_sweep(plan: RunPlan, parameter: SweepParameter, values, seeds) -> List[dict]:
    """Per value: the final top-1 of each seed's run that finished all its epochs (an
    interrupted run is not a result: results.final_accuracy)."""
    points = []
    for value in values:
        folders = [cell_folder(plan, parameter, value, seed) for seed in seeds]
        runs = [(seed, folder, final_accuracy(folder)) for seed, folder in zip(seeds, folders)]
        top1 = [acc for _, _, acc in runs if acc is not None]
        mean, std = mean_and_std(top1)
        points.append({
            "value": value, "seeds": [seed for seed, _, acc in runs if acc is not None],
            "top1": top1, "runs": [folder.name for _, folder, acc in runs if acc is not None],
            "mean": mean, "std": std})
    return points


def sweep_command(sweep: SweepRequest) -> int:
    plan = sweep.plan
    get_config(plan.config)  # an unknown config fails before any run
    parameter = SWEEP_PARAMETERS[sweep.param]
    values = list(sweep.values) or list(parameter.grid)
    if getattr(plan.loss_weights, parameter.argument) is not None:
        raise ValueError(f"--{sweep.param} is the swept parameter: give its values with "
                         f"--values, not as a fixed option")
    if not sweep.plot_only:
        for value in values:
            for seed in sweep.seeds:
                distributed.say(f"sweep {plan.config}: {sweep.param} = {value:g}, seed {seed}")
                run_config(cell_plan(plan, parameter, value, seed))
    if not distributed.is_main():
        return 0
    points = collect_sweep(plan, parameter, values, sweep.seeds)
    for p in points:
        shown = f"{p['mean']:.2f} +- {p['std']:.2f} ({len(p['top1'])} seeds)" if p["top1"] \
            else "not run"
        print(f"{sweep.param} = {p['value']:g}: top-1 {shown}")
    path = plot_sweep(plan.config, sweep.param, parameter.symbol, points,
                      sweep.figures or Path(plan.runs) / "figures", sweep.format)
    print(f"figure: {path}")
    return 0
