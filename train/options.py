"""The typed, frozen values the command line is turned into (train/cli.py alone reads the
argparse Namespace): what every module below the command line receives. Each is filled by
name at the door; a sweep makes its cells with dataclasses.replace."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple


@dataclass(frozen=True)
class Session:
    """How a command runs, whatever it computes."""
    device: str = "auto"  # auto (cuda when available), cpu, cuda
    seed: int = 0
    deterministic: bool = False
    precision: str = "fp32"
    workers: int = 0  # data loader processes
    progress: bool = False
    tensorboard: bool = False
    trust_checkpoint: bool = False  # full unpickling of checkpoints (weights_only=False)
    sync_bn: bool = False


@dataclass(frozen=True)
class DataSource:
    dataset: str
    root: str = "./data"
    download: bool = False


@dataclass(frozen=True)
class RecipeOverrides:
    """The recipe numbers the user gave; None keeps the paper's (an explicit 0 is kept)."""
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    lr_decay_epochs: Optional[Tuple[int, ...]] = None
    weight_decay: Optional[float] = None


@dataclass(frozen=True)
class LossWeights:
    """The loss weights of paper eq. 13 the user gave (None keeps the method's own)."""
    gamma: Optional[float] = None  # cross-entropy on the labels
    kd_weight: Optional[float] = None  # lambda: Hinton's KD
    beta: Optional[float] = None  # the method's own loss
    alpha: Optional[float] = None  # ICD's invariance (KL) term


@dataclass(frozen=True)
class ProbeRecipe:
    """The linear probe's training (train/probe.py)."""
    epochs: int = 40
    batch_size: int = 64
    lr: float = 0.1
    lr_decay_epochs: Sequence[int] = (20, 30, 35)
    weight_decay: float = 0.0
    seed: int = 0
    num_workers: int = 0  # data loader processes for the feature pass


@dataclass(frozen=True)
class TrainingRequest:
    """One training run (train-teacher, distill, and the two stages of `run`)."""
    dataset: str
    model: str  # the trained network: the teacher of train-teacher, else the student
    method: str
    out: Path
    session: Session
    recipe: RecipeOverrides = RecipeOverrides()
    loss_weights: LossWeights = LossWeights()
    init_epochs: Optional[int] = None  # two-stage methods' first stage; None: the benchmark's
    resume: bool = False
    overwrite: bool = False
    teacher: Optional[str] = None  # the teacher's name that the run folder's plan records


@dataclass(frozen=True)
class RunPlan:
    """`run` of one config (and each cell of a sweep)."""
    config: str
    runs: Path
    data_root: str
    download: bool
    session: Session
    recipe: RecipeOverrides = RecipeOverrides()
    loss_weights: LossWeights = LossWeights()
    init_epochs: Optional[int] = None
    overwrite: bool = False
    out: Optional[Path] = None  # the student's run folder; None: named under runs
    teacher_checkpoint: Optional[str] = None
    published_teachers: Optional[str] = None
    teacher_epochs: Optional[int] = None
    teacher_epoch: str = "final"  # which checkpoint of a trained teacher is distilled from
    probe: ProbeRecipe = ProbeRecipe()
    probe_image_size: int = 32
    stl10_data: str = "./data"
    tiny_imagenet_data: str = "./data/tiny-imagenet-200"


@dataclass(frozen=True)
class SweepRequest:
    plan: RunPlan  # every cell's plan, but for the swept weight and the seed
    param: str
    values: Tuple[float, ...]
    seeds: Tuple[int, ...]
    plot_only: bool = False
    figures: Optional[Path] = None
    format: str = "png"


@dataclass(frozen=True)
class DemoOptions:
    teacher: str
    student: str
    image_size: int
    teacher_epochs: int
    epochs: int
    student_fraction: float  # share of the training split the students learn from
    seeds: int
    batch_size: int
    lr: float
    methods: Tuple[str, ...]
    threads: int
    figures: str  # folder of the correlation maps and the table's bar chart
    format: str


@dataclass(frozen=True)
class CorrelationRequest:
    teacher_checkpoint: str  # a checkpoint or a run folder
    students: Tuple[str, ...]  # checkpoints or run folders
    data: DataSource
    session: Session
    teacher: Optional[str] = None
    student_models: Optional[Tuple[str, ...]] = None
    labels: Optional[Tuple[str, ...]] = None
    batch_size: int = 256
    out: str = "./figures"
    format: str = "png"
