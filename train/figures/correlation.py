"""Figure 1 of the paper: how much of the teacher's inter-class structure a student takes
on, read from |C_teacher - C_student|, where C is the correlation matrix of the class logits
over a test set (rows and columns are classes).

The matrices are accumulated batch by batch (running means and co-moments, merged with
Chan et al.'s update, in float64): no model's logits are kept beyond their batch."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from .. import distributed, run_folder
from ..checkpoints import load_model
from ..data.catalog import load_data
from ..options import CorrelationRequest
from .output import file_stem, pyplot, save_figure
from .run_folders import describe_run, run_labels



class LogitCorrelation:
    """The correlation matrix of the columns (classes) of logits that arrive in batches."""

    def __init__(self, classes: int):
        self.classes = classes
        self.count = 0
        self.mean = torch.zeros(classes, dtype=torch.float64)
        self.comoment = torch.zeros(classes, classes, dtype=torch.float64)  # sum of outer
        # products of the deviations from the running mean

    def update(self, logits: torch.Tensor) -> None:
        if logits.ndim != 2 or logits.shape[1] != self.classes:
            raise ValueError(f"logits must have shape (batch, {self.classes}), got "
                             f"{tuple(logits.shape)}")
        batch = logits.detach().to("cpu", torch.float64)
        n = batch.shape[0]
        if n == 0:
            return
        batch_mean = batch.mean(0)
        centred = batch - batch_mean
        delta = batch_mean - self.mean
        total = self.count + n
        self.comoment += centred.T @ centred + torch.outer(delta, delta) * (self.count * n / total)
        self.mean += delta * (n / total)
        self.count = total

    def matrix(self) -> np.ndarray:
        """C[i, j] = corr(logit i, logit j); NaN in the rows of a class whose logit never
        varies (as numpy.corrcoef)."""
        if self.count < 2:
            raise ValueError(f"a correlation needs at least 2 samples, got {self.count}")
        comoment = self.comoment.numpy()
        scale = np.sqrt(np.diag(comoment))
        with np.errstate(divide="ignore", invalid="ignore"):
            corr = comoment / np.outer(scale, scale)
        return np.clip(corr, -1.0, 1.0)


def logit_correlations(models: Sequence[torch.nn.Module], dataset, classes: int,
                       batch_size: int = 256, device=torch.device("cpu"),
                       num_workers: int = 0) -> List[np.ndarray]:
    """Each model's class-logit correlation matrix over dataset, in one pass over it."""
    accumulators = [LogitCorrelation(classes) for _ in models]
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    with torch.no_grad():
        for images, _ in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
            images = images.to(device)
            for model, accumulator in zip(models, accumulators):
                accumulator.update(model(images))
    for model, mode in zip(models, modes):
        model.train(mode)
    return [accumulator.matrix() for accumulator in accumulators]


@dataclass
class CorrelationDifference:
    label: str  # the student's method, named in its panel
    difference: np.ndarray  # |C_teacher - C_student|

    def _off_diagonal(self) -> np.ndarray:
        # The diagonal is 1 in both matrices: it says nothing about inter-class structure.
        return self.difference[~np.eye(len(self.difference), dtype=bool)]

    @property
    def mean_abs(self) -> float:
        values = self._off_diagonal()
        return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan

    @property
    def max_abs(self) -> float:
        values = self._off_diagonal()
        return float(np.nanmax(values)) if np.isfinite(values).any() else math.nan


def correlation_differences(teacher_corr: np.ndarray, student_corrs: Sequence[np.ndarray],
                            labels: Sequence[str]) -> List[CorrelationDifference]:
    return [CorrelationDifference(label, np.abs(teacher_corr - corr))
            for label, corr in zip(labels, student_corrs)]


def plot_correlation_differences(differences: List[CorrelationDifference], teacher_corr,
                                 dataset: str, teacher: str, folder, fmt: str = "png") -> Path:
    """One heatmap per student on a shared colour scale (0 to the largest difference of
    all), the method and the off-diagonal mean in each panel's title."""
    plt = pyplot()
    vmax = max((d.max_abs for d in differences if math.isfinite(d.max_abs)), default=1.0)
    per_row = min(len(differences), 4)
    rows = math.ceil(len(differences) / per_row)
    fig, axes = plt.subplots(rows, per_row, figsize=(3.4 * per_row + 0.8, 3.4 * rows),
                             squeeze=False, constrained_layout=True)
    image = None
    classes = len(teacher_corr)
    step = 1 if classes <= 20 else (10 if classes <= 200 else 100)
    for ax in axes.flat[len(differences):]:
        ax.set_visible(False)
    for ax, d in zip(axes.flat, differences):
        image = ax.imshow(d.difference, cmap="viridis", vmin=0.0, vmax=vmax,
                          interpolation="nearest")
        ax.set_title(f"{d.label}\nmean {d.mean_abs:.3f}, max {d.max_abs:.3f}", fontsize=9)
        ax.set_xticks(range(0, classes, step))
        ax.set_yticks(range(0, classes, step))
        ax.tick_params(labelsize=6)
        ax.set_xlabel("class")
    axes[0, 0].set_ylabel("class")
    fig.colorbar(image, ax=list(axes.flat), shrink=0.8,
                 label=r"$|C_{teacher} - C_{student}|$")
    fig.suptitle(f"Class-logit correlation difference to teacher {teacher} ({dataset} test)",
                 fontsize=10)
    stem = file_stem(dataset, f"teacher-{teacher}", "logit-correlation-difference",
                     "-".join(d.label for d in differences))
    values = {"dataset": dataset, "teacher": teacher, "colour_scale": [0.0, vmax],
              "statistics": "mean and max over the off-diagonal entries",
              "teacher_correlation": teacher_corr.tolist(),
              "students": [{"label": d.label, "mean_abs_difference": d.mean_abs,
                            "max_abs_difference": d.max_abs,
                            "difference": d.difference.tolist()} for d in differences]}
    return save_figure(fig, folder, stem, fmt, values)


def _checkpoint_and_folder(spec):
    path = Path(spec)
    if path.is_dir():
        return path / run_folder.FINAL, path
    if not path.exists():
        raise FileNotFoundError(f"{spec} is neither a checkpoint nor a run folder")
    return path, path.parent


def correlation_command(request: CorrelationRequest) -> int:
    """Teacher and students (checkpoints or run folders) on a data set's test split: the
    heatmaps of |C_teacher - C_student|, and each student's mean and max difference."""
    students = [_checkpoint_and_folder(spec) for spec in request.students]
    descriptions = [describe_run(folder) for _, folder in students]
    labels = list(request.labels or run_labels(descriptions))
    if len(labels) != len(students):
        raise ValueError(f"--labels gives {len(labels)} labels for {len(students)} students")
    models = list(request.student_models or [d.model for d in descriptions])
    if len(models) == 1 and len(students) > 1:
        models = models * len(students)
    if len(models) != len(students):
        raise ValueError(f"--student-model gives {len(models)} architectures for "
                         f"{len(students)} students (one, or one per student)")
    for (ckpt, _), model in zip(students, models):
        if model is None:
            raise ValueError(f"the architecture of {ckpt} is not known from its run folder's "
                             f"name: give it with --student-model")
    teacher_ckpt, teacher_folder = _checkpoint_and_folder(request.teacher_checkpoint)
    teacher_name = (request.teacher or describe_run(teacher_folder).model
                    or next((d.teacher for d in descriptions if d.teacher), None))
    if teacher_name is None:
        raise ValueError("the teacher's architecture is not known from the run folders' "
                         "names: give it with --teacher")
    device = distributed.init_from_env(request.session.device)
    _, test_set, classes, channels = load_data(request.data.dataset, request.data.root,
                                             request.data.download)
    trust = request.session.trust_checkpoint
    networks = [load_model(teacher_name, teacher_ckpt, classes, channels, trust).to(device)]
    networks += [load_model(model, ckpt, classes, channels, trust).to(device)
                 for (ckpt, _), model in zip(students, models)]
    teacher_corr, *student_corrs = logit_correlations(
        networks, test_set, classes, request.batch_size, device, request.session.workers)
    differences = correlation_differences(teacher_corr, student_corrs, labels)
    for d, (ckpt, _) in zip(differences, students):
        print(f"{d.label}: mean |C_teacher - C_student| {d.mean_abs:.4f}, max "
              f"{d.max_abs:.4f} ({ckpt})")
    path = plot_correlation_differences(differences, teacher_corr, request.data.dataset,
                                        teacher_name, request.out, request.format)
    print(f"figure: {path}")
    return 0
