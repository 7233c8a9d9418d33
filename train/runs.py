"""`run`: one config of the paper's tables, end to end, in its run folder under --runs."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from . import distributed, run_folder
from .configs import get_config
from .data.catalog import load_data
from .options import RunPlan, TrainingRequest
from .probe import probe_checkpoint
from .teachers import load_teacher, published_teacher_file
from .training import loss_weight_options, run_training


def probe_teacher_once(runs: Path, dataset: str, teacher: str, ckpt: Path, transfer_set: str,
                       root, plan: RunPlan) -> float:
    """The teacher checkpoint's probe accuracy: read from its probe file when that file
    probed the same checkpoint, otherwise probed now and recorded."""
    folder = run_folder.teacher_run_folder(runs, dataset, teacher)
    checkpoint = str(Path(ckpt).resolve())
    try:
        recorded = run_folder.read_probe_result(folder, transfer_set)
    except run_folder.RunFolderError:  # a damaged record is probed again and replaced
        recorded = None
    if recorded is not None and recorded.get("checkpoint") == checkpoint:
        return recorded["test_acc"]
    accuracy = probe_plan(plan, teacher, ckpt, transfer_set, root)
    if distributed.is_main():
        folder.mkdir(parents=True, exist_ok=True)
        run_folder.write_probe_result(folder, transfer_set, accuracy, checkpoint)
    return accuracy


def probe_plan(plan: RunPlan, model_name: str, ckpt, transfer_set: str, root) -> float:
    # The probe draws from the run's seed: a sweep cell replaces only the session's.
    recipe = dataclasses.replace(plan.probe, seed=plan.session.seed,
                                 num_workers=plan.session.workers)
    return probe_checkpoint(model_name, ckpt, transfer_set, root, plan.probe_image_size,
                            recipe, plan.session, plan.download)


def stage_request(plan: RunPlan, dataset: str, model: str, method: str, out: Path,
                  teacher_stage: bool = False) -> TrainingRequest:
    """A stage of `run`: both resume; the teacher's trains with its own epochs (when given),
    no loss weights, and is never overwritten. The plan records no teacher's name (`run`
    never had a --teacher), as the run folders already written say. Both get init_epochs:
    a bad value is refused before the teacher trains."""
    if teacher_stage:
        recipe = (dataclasses.replace(plan.recipe, epochs=plan.teacher_epochs)
                  if plan.teacher_epochs else plan.recipe)
        return TrainingRequest(dataset=dataset, model=model, method=method, out=out,
                               session=plan.session, recipe=recipe,
                               init_epochs=plan.init_epochs, resume=True)
    return TrainingRequest(dataset=dataset, model=model, method=method, out=out,
                           session=plan.session, recipe=plan.recipe,
                           loss_weights=plan.loss_weights, init_epochs=plan.init_epochs,
                           resume=True, overwrite=plan.overwrite)


def run_config(plan: RunPlan) -> int:
    """Teacher (plan.teacher_checkpoint, the published one of plan.published_teachers, or
    trained first unless its run finished, then its final epoch), student, and for transfer
    configs the linear probes of the student and of the teacher (once per teacher); every
    stage resumes from its last checkpoint."""
    config = get_config(plan.config)
    runs = Path(plan.runs)
    data = load_data(config.dataset, plan.data_root, plan.download)
    teacher = None
    if config.method != "vanilla":
        ckpt, teachers = plan.teacher_checkpoint, plan.published_teachers
        if ckpt is None and teachers is None:  # a finished teacher run resumes to nothing
            ckpt = (run_folder.teacher_run_folder(runs, config.dataset, config.teacher)
                    / run_folder.TEACHER_CHECKPOINTS[plan.teacher_epoch])
            distributed.say(f"teacher {config.teacher}: {ckpt.parent}")
            run_training(stage_request(plan, config.dataset, config.teacher, "vanilla",
                                       ckpt.parent, teacher_stage=True), data)
        teacher = load_teacher(config.teacher, data, ckpt, teachers,
                               plan.session.trust_checkpoint, plan.session.device)
    options = loss_weight_options(plan.loss_weights)
    out = (Path(plan.out) if plan.out
           else runs / run_folder.run_folder_name(config.name, plan.session.seed, options))
    run_training(stage_request(plan, config.dataset, config.student, config.method, out), data,
                 teacher)
    for transfer_set in config.transfer_sets:
        root = plan.stl10_data if transfer_set == "stl10" else plan.tiny_imagenet_data
        if teacher is not None:
            teacher_file = ckpt if teachers is None else published_teacher_file(
                teachers, config.teacher)
            probe_teacher_once(runs, config.dataset, config.teacher, teacher_file,
                               transfer_set, root, plan)
        accuracy = probe_plan(plan, config.student, out / run_folder.FINAL, transfer_set, root)
        if distributed.is_main():
            run_folder.write_probe_result(out, transfer_set, accuracy, run_folder.FINAL)
    return 0
