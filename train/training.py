"""One training run of a model by a method: the distiller, its optimiser and schedule, and
the engine's loop; the recipe and run folder come from a TrainingRequest."""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Dict, Optional

import torch

from . import distributed, engine
from .data.labels import dataset_labels
from .distillers import DISTILLERS, build_distiller
from .models import build_model
from .options import LossWeights, TrainingRequest
from .recipes import INIT_STAGE_EPOCHS, init_stage_lr, recipe


# LossWeights' fields -> the distillers' option names (paper eq. 13:
# gamma CE + lambda KD + beta method, and ICD's alpha inside its loss).
LOSS_WEIGHT_OPTIONS = {"gamma": "gamma", "kd_weight": "lam", "beta": "beta", "alpha": "alpha"}


def loss_weight_options(weights: LossWeights) -> Dict[str, float]:
    """The loss weights given (those left out keep the method's defaults), as distiller
    options."""
    return {option: getattr(weights, field) for field, option in LOSS_WEIGHT_OPTIONS.items()
            if getattr(weights, field) is not None}


def example_batch(dataset) -> torch.Tensor:
    """Two zero images of the data set's shape: methods size their layers from them."""
    return torch.zeros(2, *dataset[0][0].shape)


@contextlib.contextmanager
def only_trainable(module: torch.nn.Module, trainable):
    """Within the block, `module`'s parameters outside `trainable` take no gradient: DDP
    requires every parameter that asks for a gradient to get one (AB's connectors and FT's
    paraphraser sit out a stage), and backward skips what no optimiser steps."""
    keep = {id(p) for p in trainable}
    frozen = [p for p in module.parameters() if p.requires_grad and id(p) not in keep]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def train_init_stage(distiller, train_set, test_set, settings: engine.LoopSettings, lr: float,
                     weight_decay: float, epochs: int, resume: bool):
    """A two-stage method's initialisation stage: SGD at a constant lr on what the stage
    trains, `epochs` epochs, checkpointed in the run folder's init/ like any stage (a
    finished one resumes to nothing)."""
    if epochs < 0:
        raise ValueError(f"--init-epochs must be >= 0, got {epochs}")
    stage = distiller.init_stage()
    if stage is None or epochs == 0:
        return None
    trainable = stage.trainable_parameters()
    optimizer = torch.optim.SGD(trainable, lr=lr, momentum=0.9, weight_decay=weight_decay)
    stage_settings = dataclasses.replace(
        settings, epochs=epochs,
        out_dir=None if settings.out_dir is None else Path(settings.out_dir) / "init")
    with only_trainable(distiller, trainable):
        return engine.fit(stage, train_set, test_set, optimizer, None, stage_settings, resume)


def train_model(method, student, teacher, train_set, test_set, settings: engine.LoopSettings,
                lr: float, weight_decay: float, make_scheduler, resume: bool = False,
                device: torch.device = torch.device("cpu"), sync_bn: bool = False,
                method_options: Optional[Dict[str, float]] = None,
                init_epochs: int = INIT_STAGE_EPOCHS, init_lr: Optional[float] = None):
    """SGD (momentum 0.9) on the student and the method's own modules; make_scheduler(opt)
    gives the learning-rate schedule; method_options reach the distiller (loss weights).
    Two-stage methods (AB, FT, FSP) first train their initialisation stage for init_epochs
    at init_lr (default: lr)."""
    if sync_bn:
        if device.type != "cuda":
            raise ValueError("--sync-bn needs CUDA devices (torch's SyncBatchNorm has no CPU "
                             "implementation)")
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
    # Read only for the methods that declare they need them: a data set without labels
    # trains the others, and no sample is decoded for methods that size nothing from it.
    def needs(fact):
        return getattr(DISTILLERS.get(method), f"needs_{fact}", False)
    distiller = build_distiller(
        method, student, teacher, num_samples=len(train_set),
        labels=dataset_labels(train_set) if needs("labels") else None,
        example_images=example_batch(train_set) if needs("example_images") else None,
        **(method_options or {})).to(device)
    train_init_stage(distiller, train_set, test_set, settings, lr if init_lr is None else init_lr,
                     weight_decay, init_epochs, resume)
    params = distiller.trainable_parameters()
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    with only_trainable(distiller, params):
        history = engine.fit(distiller, train_set, test_set, optimizer,
                             make_scheduler(optimizer), settings, resume)
    return distiller, history


def run_identity(request: TrainingRequest, teacher, method_options) -> Dict[str, object]:
    """The plan entries of a run that its run folder records and a resume must repeat (the
    engine adds the method and the teacher's weights)."""
    return {"dataset": request.dataset, "student": request.model,
            "teacher": request.teacher if teacher is not None else None,
            "loss_options": dict(sorted((method_options or {}).items()))}


def run_training(request: TrainingRequest, data, teacher=None):
    """One training run (teacher or student) on data = load_data(...) with the recipe of
    request.dataset overridden by request.recipe; returns its History."""
    session = request.session
    device = distributed.init_from_env(session.device)
    # DDP starts every rank from rank 0's weights; the ranks' random streams differ.
    engine.seed_everything(session.seed + distributed.rank(),
                           deterministic=session.deterministic)
    train_set, test_set, classes, channels = data
    student = build_model(request.model, classes, channels)
    if teacher is not None:
        teacher = teacher.to(device)
    plan = recipe(request.dataset, request.recipe, request.model)
    method_options = loss_weight_options(request.loss_weights)
    settings = engine.LoopSettings(epochs=plan.epochs, batch_size=plan.batch_size,
                                seed=session.seed, out_dir=Path(request.out),
                                num_workers=session.workers, precision=session.precision,
                                progress=session.progress, tensorboard=session.tensorboard,
                                trust_checkpoint=session.trust_checkpoint,
                                overwrite=request.overwrite,
                                plan=run_identity(request, teacher, method_options))
    milestones = list(plan.lr_decay_epochs)
    _, history = train_model(
        request.method, student, teacher, train_set, test_set, settings, plan.lr,
        plan.weight_decay,
        lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1),
        resume=request.resume, device=device, sync_bn=session.sync_bn,
        method_options=method_options,
        init_epochs=INIT_STAGE_EPOCHS if request.init_epochs is None else request.init_epochs,
        init_lr=init_stage_lr(request.method, request.model, plan.lr, request.dataset))
    last = history.rows[-1]
    distributed.say(f"{request.method} {request.model}: epoch {last['epoch']}, test top-1 "
                    f"{last['test_acc']:.2f}% (best {history.best_accuracy:.2f}%); "
                    f"checkpoints in {request.out}")
    return history
