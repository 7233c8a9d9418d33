"""The teachers a distillation run starts from: a checkpoint file, or the published CIFAR-100
teachers of the CRD benchmark in the folder layout it ships them in.

The benchmark (HobbitLong/RepDistiller, `scripts/fetch_pretrained_teachers.sh`; mdistiller
ships the same files as `cifar_teachers.tar`) publishes one teacher per architecture as
`<teacher>_vanilla/ckpt_epoch_240.pth`. `--teachers DIR` takes DIR/<teacher>_vanilla/
ckpt_epoch_240.pth as the teacher instead of training one; the file is evaluated on load,
so the accuracy printed next to the published one shows at once whether a download is
right.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

from . import distributed, engine
from .checkpoints import load_model

# Test top-1 (%) on CIFAR-100 of the published teachers, as the benchmark reports them.
PUBLISHED_TEACHERS: Dict[str, float] = {
    "resnet56": 72.34, "resnet110": 74.31, "resnet32x4": 79.42, "wrn_40_2": 75.61,
    "vgg13": 74.64, "ResNet50": 79.34,
}

PUBLISHED_LAYOUT = "{teacher}_vanilla/ckpt_epoch_240.pth"


def published_teacher_file(folder, teacher: str) -> Path:
    """Where the benchmark's layout puts `teacher` under folder; an error names the path
    expected when the file is not there."""
    path = Path(folder) / PUBLISHED_LAYOUT.format(teacher=teacher)
    if not path.is_file():
        known = (f"the CRD benchmark publishes it as {PUBLISHED_LAYOUT.format(teacher=teacher)}"
                 if teacher in PUBLISHED_TEACHERS else
                 f"the CRD benchmark publishes no {teacher} teacher (it publishes "
                 f"{', '.join(PUBLISHED_TEACHERS)}); pass --teacher-ckpt instead")
        raise FileNotFoundError(f"--teachers {folder}: teacher {teacher} expected at {path}, "
                                f"which does not exist; {known}")
    return path


def load_published_teacher(folder, teacher: str, data, trust: bool = False,
                           device: str = "auto"):
    """The teacher of folder's benchmark layout, built for data = load_data(...), after
    printing its test accuracy (and the published one, when the benchmark publishes it)."""
    path = published_teacher_file(folder, teacher)
    _, test_set, classes, channels = data
    model = load_model(teacher, path, classes, channels, trust)
    accuracy = engine.evaluate(model.to(distributed.init_from_env(device)), test_set)
    published = PUBLISHED_TEACHERS.get(teacher)
    reference = f" (published: {published:.2f}%)" if published is not None else ""
    distributed.say(f"teacher {teacher} from {path}: test top-1 {accuracy:.2f}%{reference}")
    return model


def load_teacher(teacher: str, data, ckpt=None, teachers=None, trust: bool = False,
                 device: str = "auto"):
    """The teacher of a distillation: checkpoint file ckpt, or the published teacher of
    folder `teachers` (exactly one of them)."""
    if (ckpt is None) == (teachers is None):
        raise ValueError("give the teacher as exactly one of --teacher-ckpt FILE and "
                         "--teachers DIR")
    if teachers is not None:
        return load_published_teacher(teachers, teacher, data, trust, device)
    return load_model(teacher, ckpt, data.num_classes, data.in_channels, trust)

