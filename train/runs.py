"""`run`: one config of the paper's tables, end to end, in its run folder under --runs."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

from . import distributed, run_folder
from .configs import get_config
from .data.catalog import load_data
from .probe import probe_checkpoint
from .teachers import load_teacher, published_teacher_file
from .training import loss_weight_options, run_training


def run_folder_name(config_name: str, seed, method_options=None) -> str:
    """The run folder of a config and seed (seed "*" gives the glob of all its seeds). Every
    loss weight given on the command line (a sweep's values, --beta, ...) is part of the
    name, even one equal to the method's default, so such runs never mix with the config's
    own."""
    weights = "".join(f"__{key}={value:g}" for key, value in sorted((method_options or {}).items()))
    return f"{config_name.replace('/', '__')}{weights}__seed{seed}"


def parse_run_folder_name(name: str) -> Optional[Tuple[str, Dict[str, float], int]]:
    """The inverse of run_folder_name: (config name, loss weights, seed), or None for a folder
    name it did not make (a teacher's, or distill's --out)."""
    parts = name.split("__")
    seed = re.fullmatch(r"seed(\d+)", parts[-1])
    if seed is None or len(parts) < 2:
        return None
    weights = dict(part.split("=", 1) for part in parts[:-1] if "=" in part)
    try:
        options = {key: float(value) for key, value in weights.items()}
    except ValueError:
        return None
    config_name = "/".join(part for part in parts[:-1] if "=" not in part)
    return config_name, options, int(seed.group(1))


def teacher_run_folder(runs: Path, dataset: str, teacher: str) -> Path:
    """Where `run` trains a config's teacher (shared by all configs with that teacher)."""
    return runs / dataset / f"teacher-{teacher}"


# The checkpoint of its own teacher run that `run` distils from (--teacher-epoch). The CRD
# benchmark distils from the teacher's final epoch (its published ckpt_epoch_240.pth);
# picking the epoch of best test accuracy would select the teacher on the test split that the
# tables then report.
TEACHER_CHECKPOINTS = {"final": "last.pt", "best-on-test": "best.pt"}


def teacher_probe_file(runs: Path, dataset: str, teacher: str, transfer_set: str) -> Path:
    """A teacher's linear probe on a transfer set, shared by every transfer config with it."""
    return teacher_run_folder(runs, dataset, teacher) / f"probe-{transfer_set}.json"


def probe_teacher_once(runs: Path, dataset: str, teacher: str, ckpt: Path, transfer_set: str,
                       root, args) -> float:
    """The teacher checkpoint's probe accuracy: read from its probe file when that file
    probed the same checkpoint, otherwise probed now and recorded."""
    probe_file = teacher_probe_file(runs, dataset, teacher, transfer_set)
    checkpoint = str(Path(ckpt).resolve())
    if probe_file.exists():
        recorded = json.loads(probe_file.read_text())
        if recorded.get("checkpoint") == checkpoint:
            return recorded["test_acc"]
    accuracy = probe_checkpoint(teacher, ckpt, transfer_set, root, args)
    if distributed.is_main():
        probe_file.parent.mkdir(parents=True, exist_ok=True)
        probe_file.write_text(json.dumps({"dataset": transfer_set, "test_acc": accuracy,
                                          "checkpoint": checkpoint}))
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
            ckpt = (teacher_run_folder(runs, config.dataset, config.teacher)
                    / TEACHER_CHECKPOINTS[args.teacher_epoch])
            distributed.say(f"teacher {config.teacher}: {ckpt.parent}")
            run_training(args, "vanilla", config.teacher, data, ckpt.parent,
                         epochs=args.teacher_epochs, resume=True, overwrite=False)
        teacher = load_teacher(config.teacher, data, ckpt, teachers,
                               args.trust_checkpoint, args.device)
    options = loss_weight_options(args)
    out = Path(args.out) if args.out else runs / run_folder_name(config.name, args.seed, options)
    run_training(args, config.method, config.student, data, out, teacher, resume=True,
                 method_options=options)
    for transfer_set in config.transfer_sets:
        root = args.stl10_data if transfer_set == "stl10" else args.tiny_imagenet_data
        if teacher is not None:
            teacher_file = ckpt if teachers is None else published_teacher_file(
                teachers, config.teacher)
            probe_teacher_once(runs, config.dataset, config.teacher, teacher_file,
                               transfer_set, root, args)
        accuracy = probe_checkpoint(config.student, out / "best.pt", transfer_set, root, args)
        if distributed.is_main():
            run_folder.write_atomically(out / f"probe-{transfer_set}.json", json.dumps(
                {"dataset": transfer_set, "test_acc": accuracy, "checkpoint": "best.pt"}).encode())
    return 0
