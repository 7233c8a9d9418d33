"""Training loop: epochs of distillation steps, evaluation, atomic checkpoints, resume.

Every finished epoch is checkpointed (`last.pt`, and `best.pt` when test accuracy improves)
by writing a temporary file and renaming it, so an interruption never leaves a half-written
checkpoint and never loses a finished epoch. A resumed run restores model, optimiser,
scheduler, epoch and RNG states, and shuffles each epoch with a generator seeded by
(seed, epoch), so it follows the same trajectory as an uninterrupted run.
"""
from __future__ import annotations

import csv
import math
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.utils.data import DataLoader, Dataset


class IndexedDataset(Dataset):
    """Yields (image, label, index): memory-bank methods (CRD) need each sample's index."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return image, label, i


class NonFiniteLoss(RuntimeError):
    """A training loss became NaN or infinite; the last good checkpoint is kept."""


def atomic_save(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class TrainConfig:
    epochs: int
    batch_size: int
    seed: int = 0
    out_dir: Optional[Path] = None
    num_workers: int = 0


@dataclass
class History:
    rows: List[Dict[str, float]] = field(default_factory=list)

    @property
    def best_accuracy(self) -> float:
        return max((r["test_acc"] for r in self.rows), default=0.0)


def evaluate(model: torch.nn.Module, dataset: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent."""
    was_training = model.training
    model.eval()
    correct = total = 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for images, labels in DataLoader(dataset, batch_size=batch_size):
            pred = model(images.to(device)).argmax(1)
            correct += (pred == labels.to(device)).sum().item()
            total += labels.numel()
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


def fit(distiller, train_set: Dataset, test_set: Dataset, optimizer, scheduler,
        config: TrainConfig, resume: bool = False) -> History:
    """Trains distiller.student (and the method's own modules) for config.epochs epochs."""
    device = next(distiller.student.parameters()).device
    history, start_epoch = History(), 0
    last = None
    if config.out_dir is not None:
        config.out_dir.mkdir(parents=True, exist_ok=True)
        last = config.out_dir / "last.pt"
    if resume and last is not None and last.exists():
        state = torch.load(last, map_location=device, weights_only=False)
        distiller.load_state_dict(state["distiller"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        history.rows = state["history"]
        start_epoch = state["epoch"] + 1

    for epoch in range(start_epoch, config.epochs):
        distiller.train()
        order = torch.Generator().manual_seed(config.seed * 100003 + epoch)
        loader = DataLoader(IndexedDataset(train_set), batch_size=config.batch_size,
                            shuffle=True, generator=order, num_workers=config.num_workers,
                            drop_last=True)
        sums: Dict[str, float] = {}
        steps = 0
        for images, labels, indices in loader:
            images, labels = images.to(device), labels.to(device)
            _, losses = distiller(images, labels, indices.to(device))
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise NonFiniteLoss(
                    f"epoch {epoch}: loss is {loss.item()} ({ {k: v.item() for k, v in losses.items()} }); "
                    f"the last good checkpoint is {last}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            sums["loss"] = sums.get("loss", 0.0) + loss.item()
            steps += 1
        if scheduler is not None:
            scheduler.step()
        row = {"epoch": epoch, **{k: v / max(steps, 1) for k, v in sums.items()},
               "test_acc": evaluate(distiller.student, test_set),
               "lr": optimizer.param_groups[0]["lr"]}
        history.rows.append(row)
        if config.out_dir is not None:
            _write_csv(config.out_dir / "log.csv", history.rows)
            state = {"distiller": distiller.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict() if scheduler is not None else None,
                     "epoch": epoch, "history": history.rows,
                     "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                     "method": getattr(distiller, "method", None)}
            atomic_save(state, last)
            if row["test_acc"] >= history.best_accuracy:
                atomic_save({"student": distiller.student.state_dict(), "epoch": epoch,
                             "test_acc": row["test_acc"]}, config.out_dir / "best.pt")
    return history


def _write_csv(path: Path, rows: List[Dict[str, float]]) -> None:
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "epoch", k))
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v)
                             for k, v in r.items()})
    os.replace(tmp, path)
