"""What a run folder holds, for the figures' labels: the method (from the config its name
encodes, or from the run.json the engine writes), the loss weights a sweep gave it, its seed, and the
trained model's architecture."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from ..configs import CONFIGS
from ..run_folder import RunFolderError, parse_run_folder_name, read_plan, teacher_of_folder


@dataclass
class RunDescription:
    folder: Path
    method: str  # the method, or the folder's name where nothing says
    model: Optional[str] = None  # architecture of the trained model, where the name says it
    teacher: Optional[str] = None
    options: Dict[str, float] = field(default_factory=dict)  # loss weights of a sweep
    seed: Optional[int] = None

    @property
    def label(self) -> str:
        weights = ", ".join(f"{k}={v:g}" for k, v in sorted(self.options.items()))
        return f"{self.method} ({weights})" if weights else self.method


def _recorded_method(folder: Path) -> Optional[str]:
    """The method the engine recorded in the folder's run.json (None for foreign folders)."""
    try:
        plan = read_plan(folder)
    except RunFolderError:  # a damaged run.json says nothing
        return None
    method = plan.get("method") if plan is not None else None
    return method if isinstance(method, str) else None


def describe_run(folder) -> RunDescription:
    folder = Path(folder)
    parsed = parse_run_folder_name(folder.name)
    if parsed is not None and parsed[0] in CONFIGS:
        config = CONFIGS[parsed[0]]
        return RunDescription(folder, config.method, config.student, config.teacher,
                              options=parsed[1], seed=parsed[2])
    model = teacher_of_folder(folder)
    if model is not None:
        return RunDescription(folder, f"teacher {model}", model=model)
    return RunDescription(folder, _recorded_method(folder) or folder.name)


def run_labels(descriptions: List[RunDescription]) -> List[str]:
    """One label per run; the seed (or the folder) is added where labels would repeat."""
    labels = [d.label for d in descriptions]
    repeated = {label for label, count in Counter(labels).items() if count > 1}
    out = []
    for d, label in zip(descriptions, labels):
        if label in repeated:
            label += f" seed {d.seed}" if d.seed is not None else f" [{d.folder.name}]"
        out.append(label)
    if len(set(out)) < len(out):  # same method and seed in different --runs folders
        out = [f"{label} [{d.folder.parent.name}/{d.folder.name}]"
               for d, label in zip(descriptions, out)]
    return out
