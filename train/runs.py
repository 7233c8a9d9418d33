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
from .teachers import load_teacher
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


def run_config(args) -> int:
    """Teacher (--teacher-ckpt, the published one of --teachers, or trained first unless
    its run finished), student, and for transfer configs the linear probes; every stage
    resumes from its last checkpoint."""
    config = get_config(args.config)
    args.dataset = config.dataset
    runs = Path(args.runs)
    data = load_data(config.dataset, args.data, args.download)
    teacher = None
    if config.method != "vanilla":
        ckpt, teachers = args.teacher_ckpt, args.teachers
        if ckpt is None and teachers is None:  # a finished teacher run resumes to nothing
            ckpt = teacher_run_folder(runs, config.dataset, config.teacher) / "best.pt"
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
        accuracy = probe_checkpoint(config.student, out / "best.pt", transfer_set, root, args)
        if distributed.is_main():
            run_folder.write_atomically(out / f"probe-{transfer_set}.json", json.dumps(
                {"dataset": transfer_set, "test_acc": accuracy, "checkpoint": "best.pt"}).encode())
    return 0
