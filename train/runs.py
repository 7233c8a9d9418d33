"""`run`: one config of the paper's tables, end to end, in its run folder under --runs."""
from __future__ import annotations

from pathlib import Path

from . import distributed, run_folder
from .configs import get_config
from .data.catalog import load_data
from .probe import probe_checkpoint
from .teachers import load_teacher, published_teacher_file
from .training import loss_weight_options, run_training


def probe_teacher_once(runs: Path, dataset: str, teacher: str, ckpt: Path, transfer_set: str,
                       root, args) -> float:
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
    accuracy = probe_checkpoint(teacher, ckpt, transfer_set, root, args)
    if distributed.is_main():
        folder.mkdir(parents=True, exist_ok=True)
        run_folder.write_probe_result(folder, transfer_set, accuracy, checkpoint)
    return accuracy


def run_config(args) -> int:
    """Teacher (--teacher-ckpt, the published one of --teachers, or trained first unless
    its run finished, then its final epoch), student, and for transfer configs the linear
    probes of the student and of the teacher (once per teacher); every stage resumes from
    its last checkpoint."""
    config = get_config(args.config)
    args.dataset = config.dataset
    runs = Path(args.runs)
    data = load_data(config.dataset, args.data, args.download)
    teacher = None
    if config.method != "vanilla":
        ckpt, teachers = args.teacher_ckpt, args.teachers
        if ckpt is None and teachers is None:  # a finished teacher run resumes to nothing
            ckpt = (run_folder.teacher_run_folder(runs, config.dataset, config.teacher)
                    / run_folder.TEACHER_CHECKPOINTS[args.teacher_epoch])
            distributed.say(f"teacher {config.teacher}: {ckpt.parent}")
            run_training(args, "vanilla", config.teacher, data, ckpt.parent,
                         epochs=args.teacher_epochs, resume=True, overwrite=False)
        teacher = load_teacher(config.teacher, data, ckpt, teachers,
                               args.trust_checkpoint, args.device)
    options = loss_weight_options(args)
    out = (Path(args.out) if args.out
           else runs / run_folder.run_folder_name(config.name, args.seed, options))
    run_training(args, config.method, config.student, data, out, teacher, resume=True,
                 method_options=options)
    for transfer_set in config.transfer_sets:
        root = args.stl10_data if transfer_set == "stl10" else args.tiny_imagenet_data
        if teacher is not None:
            teacher_file = ckpt if teachers is None else published_teacher_file(
                teachers, config.teacher)
            probe_teacher_once(runs, config.dataset, config.teacher, teacher_file,
                               transfer_set, root, args)
        accuracy = probe_checkpoint(config.student, out / run_folder.FINAL, transfer_set, root,
                                    args)
        if distributed.is_main():
            run_folder.write_probe_result(out, transfer_set, accuracy, run_folder.FINAL)
    return 0
