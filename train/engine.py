"""Training loop: epochs of distillation steps, evaluation, atomic checkpoints, resume,
mixed precision, DDP, progress bars, TensorBoard and a CSV row per epoch.

Every finished epoch whose weights are all finite is committed to the run folder (`last.pt`,
then `best.pt` when test accuracy improves, then `log.csv`; train/run_folder.py says how the
folder stays consistent), so an interruption never loses a finished epoch and a NaN model is
never saved. A run folder is locked while a process trains into it; a run already in it is
continued only when asked (resume, with the same plan) and replaced only when asked
(overwrite). A resumed run restores model, optimiser,
scheduler, gradient scaler, epoch and every rank's RNG states, and each epoch's batches come
from a permutation seeded by (seed, epoch), so it follows the same trajectory as an
uninterrupted run.

Under torchrun the batch size is the global one: each of the W ranks takes a contiguous
W-th of every global batch (`GlobalBatchSampler`), so a step sees the same samples whatever
the number of processes, and rank 0 alone writes checkpoints, the CSV and TensorBoard.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from . import distributed, run_folder
from .checkpoint_digest import content_digest
from .checkpoints import read_checkpoint

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    """A training loss, or the weights after a step, became NaN or infinite; the last good
    checkpoint is kept."""


# What resuming needs from last.pt (a file without them was not written by fit).
LAST_KEYS = ("distiller", "optimizer", "epoch", "history", "rng")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible products.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


class GlobalBatchSampler(Sampler[List[int]]):
    """One epoch's batches: a permutation seeded by (seed, epoch) cut into global batches of
    `batch_size` (a last partial batch is dropped); rank r of W takes rows
    [r B/W, (r+1) B/W) of each, so the ranks' local batches, in rank order, are exactly the
    one-process batch."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, epoch: int,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be a positive multiple of the "
                             f"number of processes ({world_size}); it is the global batch")
        if num_samples < batch_size:
            raise ValueError(f"batch size {batch_size} is larger than the training set "
                             f"({num_samples} samples): no full batch to train on")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size

    def __len__(self) -> int:
        return self.num_samples // self.batch_size

    def __iter__(self) -> Iterator[List[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        local = self.batch_size // self.world_size
        for b in range(len(self)):
            start = b * self.batch_size + self.rank * local
            yield order[start:start + local]


@dataclass
class LoopSettings:
    """How fit trains: epochs, batch, seed, the run folder and the loop's switches (the
    configs of the paper's tables are train.configs' RunConfig; these are the loop's)."""

    epochs: int
    batch_size: int  # global: split over the ranks under torchrun
    seed: int = 0
    out_dir: Optional[Path] = None
    num_workers: int = 0
    precision: str = "fp32"  # or "bf16" / "fp16" (autocast; fp16 with a gradient scaler)
    progress: bool = False  # a progress bar per epoch (rank 0)
    tensorboard: bool = False  # scalars per epoch under out_dir/tensorboard (rank 0)
    trust_checkpoint: bool = False  # resume from a last.pt that a safe load refuses
    overwrite: bool = False  # replace a run already in out_dir (else only resume continues it)
    # What the run is, for its run.json (models, data set, loss options...): a resume must
    # ask for the same. fit adds the method, the teacher's weights and the epochs.
    plan: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, "
                             f"got {self.precision!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")


@dataclass
class History:
    rows: List[Dict[str, float]] = field(default_factory=list)

    @property
    def best_accuracy(self) -> float:
        return max((r["test_acc"] for r in self.rows), default=0.0)


def _autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def evaluate(model: torch.nn.Module, dataset: Dataset, batch_size: int = 256,
             precision: str = "fp32", num_workers: int = 0) -> float:
    """Top-1 accuracy in percent; under DDP each rank scores a share of the set."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if distributed.is_distributed():
        dataset = Subset(dataset, range(distributed.rank(), len(dataset),
                                        distributed.world_size()))
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad(), _autocast(device, precision):
        for images, labels in DataLoader(dataset, batch_size=batch_size,
                                         num_workers=num_workers):
            pred = model(images.to(device)).argmax(1)
            counts[0] += (pred == labels.to(device)).sum()
            counts[1] += labels.numel()
    model.train(was_training)
    correct, total = distributed.all_reduce_sum(counts).tolist()
    return 100.0 * correct / max(total, 1)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ValueError("progress bars need tqdm: pip install tqdm (or pass --no-progress)"
                         ) from error
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


def _tensorboard(out_dir: Optional[Path], purge_step: int):
    if out_dir is None:
        raise ValueError("TensorBoard logging needs an output folder")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ValueError("TensorBoard logging needs the tensorboard package: "
                         "pip install tensorboard") from error
    return SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge_step)


def buffers_not_broadcast(distiller) -> List[str]:
    """The frozen teacher's buffers and the method's replicated ones (CRD's memory banks:
    tens of MB) stay equal on every rank without a broadcast at each step."""
    teacher = getattr(distiller, "teacher", None)
    frozen = {id(b) for b in teacher.buffers()} if teacher is not None else set()
    return [name for name, buffer in distiller.named_buffers()
            if id(buffer) in frozen or name in getattr(distiller, "replicated_buffers", ())]


def run_plan(distiller, settings: LoopSettings) -> dict:
    """What the run is, as its run.json records it."""
    teacher = getattr(distiller, "teacher", None)
    return {**settings.plan, "method": getattr(distiller, "method", None),
            "teacher_weights": content_digest(teacher.state_dict()) if teacher is not None
            else None,
            "epochs": settings.epochs}


def _on_every_rank(failure: Optional[str]) -> None:
    """Raises on every rank when one rank failed (the others would wait for it forever)."""
    failures = [f for f in distributed.all_gather_objects(failure) if f is not None]
    if failures:
        raise run_folder.RunFolderError(failures[0])


def _kept(last: Optional[Path]) -> str:
    return (f"the last good checkpoint is {last}" if last is not None and last.exists()
            else "no checkpoint was written")


def non_finite_tensors(module: torch.nn.Module) -> List[str]:
    named = [(name, t) for name, t in itertools.chain(module.named_parameters(),
                                                      module.named_buffers())
             if t.is_floating_point()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


def _resume_state(distiller, optimizer, scheduler, scaler, last: Path, settings, device):
    """Loads last.pt into the run's objects; returns its content. Every error is raised
    before anything in the run folder changes."""
    state = read_checkpoint(last, settings.trust_checkpoint, map_location=device)
    missing = [key for key in LAST_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise run_folder.RunFolderError(
            f"checkpoint {last} lacks {', '.join(missing)}: not a {run_folder.LAST} this "
            f"application wrote, or a damaged one")
    try:
        distiller.load_state_dict(state["distiller"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise run_folder.RunFolderError(
            f"checkpoint {last} does not fit this run (another model, method or optimiser): "
            f"{type(error).__name__}: {first_line}") from None
    return state


def _best_file_payload(distiller, epoch: int, accuracy: float) -> dict:
    # A copy: the student trains on while last.pt carries this epoch's weights forward.
    return {"student": {k: v.detach().cpu().clone()
                        for k, v in distiller.student.state_dict().items()},
            "epoch": epoch, "test_acc": accuracy}


def _repair_derived_files(folder: Path, best: Optional[dict], rows) -> None:
    """best.pt and log.csv as last.pt records them (a stop between the writes of an epoch
    leaves them behind it)."""
    if best is not None:
        try:
            current = read_checkpoint(folder / run_folder.BEST)
            stale = content_digest(current) != content_digest(best)
        except (FileNotFoundError, ValueError):
            stale = True
        if stale:
            run_folder.save_checkpoint(best, folder / run_folder.BEST)
    run_folder.rewrite_if_changed(folder / run_folder.LOG, run_folder.log_text(rows).encode())


def fit(distiller, train_set: Dataset, test_set: Dataset, optimizer, scheduler,
        settings: LoopSettings, resume: bool = False) -> History:
    """Trains distiller.student (and the method's own modules) for settings.epochs epochs.

    Under torchrun (a process group of W > 1 ranks) the distiller is wrapped in DDP and every
    rank must call fit with the same arguments; it returns the same History on every rank.
    """
    device = next(distiller.student.parameters()).device
    rank, world = distributed.rank(), distributed.world_size()
    # Checked before the run folder is made: a run that cannot start leaves nothing.
    GlobalBatchSampler(len(train_set), settings.batch_size, settings.seed, 0, rank, world)
    model = wrap_for_ddp(distiller, device)
    folder = Path(settings.out_dir) if settings.out_dir is not None else None
    with contextlib.ExitStack() as stack:
        plan = None
        if folder is not None:
            failure = None
            if rank == 0:  # rank 0 alone holds the folder: its lock, its files
                plan = run_plan(distiller, settings)
                try:
                    stack.enter_context(run_folder.training_into(
                        folder, plan, resume, settings.overwrite))
                except run_folder.RunFolderError as error:
                    failure = str(error)
            _on_every_rank(failure)
        return _train_epochs(distiller, model, train_set, test_set, optimizer, scheduler,
                             settings, resume, device, folder, plan)


def wrap_for_ddp(distiller, device: torch.device):
    """The module the steps call: the distiller itself, or under W > 1 ranks its DDP wrapper
    (rank 0's weights broadcast to every rank, but for the buffers DDP must not overwrite)."""
    if distributed.world_size() == 1:
        return distiller
    skip = buffers_not_broadcast(distiller)
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        distiller, skip)
    buffers = dict(distiller.named_buffers())
    for name in skip:  # DDP leaves them out of its start-up broadcast too
        distributed.broadcast_(buffers[name])
    return torch.nn.parallel.DistributedDataParallel(
        distiller, device_ids=[device.index] if device.type == "cuda" else None)


@dataclass
class _Resumed:
    history: History
    start_epoch: int
    best: Optional[dict]  # the best student's payload that last.pt carries


def resume_from_last(distiller, optimizer, scheduler, scaler, last: Optional[Path],
                     settings: LoopSettings, device: torch.device, wanted: bool) -> _Resumed:
    """Where the run starts: from last.pt (model, optimiser, scheduler, scaler, history and
    this rank's RNG states) when resuming and it exists, else from epoch 0."""
    if not (wanted and last is not None and last.exists()):
        return _Resumed(History(), 0, None)
    state = _resume_state(distiller, optimizer, scheduler, scaler, last, settings, device)
    rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
    if len(rng) == distributed.world_size():  # with another process count the RNG streams
        _set_rng_state(rng[distributed.rank()], device)  # start afresh
    return _Resumed(History(rows=state["history"]), state["epoch"] + 1, state.get("best"))


def _train_epochs(distiller, model, train_set, test_set, optimizer, scheduler, settings,
                  resume: bool, device, folder: Optional[Path], plan: Optional[dict]) -> History:
    """Resume, then per epoch: its steps, the scheduler, the test accuracy, the commit."""
    main = distributed.rank() == 0
    scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")
    last = folder / run_folder.LAST if folder is not None else None
    start = resume_from_last(distiller, optimizer, scheduler, scaler, last, settings, device,
                             resume)
    history, best = start.history, start.best
    if folder is not None and main:
        run_folder.rewrite_if_changed(folder / run_folder.PLAN,
                                      run_folder.plan_text(plan).encode())
        if history.rows:
            _repair_derived_files(folder, best, history.rows)
    board = (_tensorboard(folder, start.start_epoch)
             if settings.tensorboard and main and start.start_epoch < settings.epochs else None)

    for epoch in range(start.start_epoch, settings.epochs):
        started = time.time()
        names, means = train_epoch(distiller, model, train_set, optimizer, scaler, settings,
                                   epoch, device, last)
        if scheduler is not None:
            scheduler.step()
        row = {"epoch": epoch, **dict(zip(names, means)),
               "test_acc": evaluate(distiller.student, test_set, precision=settings.precision,
                                    num_workers=settings.num_workers),
               "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - started}
        history.rows.append(row)
        if folder is not None:
            rng = distributed.all_gather_objects(_rng_state(device))
            improved = row["test_acc"] >= history.best_accuracy
            if improved and main:
                best = _best_file_payload(distiller, epoch, row["test_acc"])
            if main:
                _save_epoch(distiller, optimizer, scheduler, scaler, epoch, history, rng,
                            best if improved else None, best, folder)
            distributed.barrier()  # no rank runs ahead of a checkpoint it may resume from
        if board is not None:
            for key, value in row.items():
                if key != "epoch":
                    board.add_scalar(key, value, epoch)
            board.flush()
    if board is not None:
        board.close()
    return history


def train_epoch(distiller, model, train_set, optimizer, scaler, settings: LoopSettings,
                epoch: int, device: torch.device, last: Optional[Path]):
    """One epoch of steps over this rank's share of the (seed, epoch) permutation; returns
    the loss terms' names and their means over the epoch (global means under DDP)."""
    rank, world = distributed.rank(), distributed.world_size()
    distiller.train()
    batches = GlobalBatchSampler(len(train_set), settings.batch_size, settings.seed, epoch,
                                 rank, world)
    loader = DataLoader(IndexedDataset(train_set), batch_sampler=batches,
                        num_workers=settings.num_workers, pin_memory=device.type == "cuda")
    sums: Optional[torch.Tensor] = None
    names: List[str] = []
    steps = 0
    bar = _progress(loader, settings.progress and rank == 0,
                    f"epoch {epoch + 1}/{settings.epochs}")
    for batch in bar:
        names, values = train_step(model, batch, optimizer, scaler, settings.precision, device,
                                   epoch, last)
        sums = values if sums is None else sums + values
        steps += 1
        if bar is not loader and steps % 10 == 0:
            bar.set_postfix(loss=f"{sums[0].item() / steps:.4f}")
    # The epoch's last step is checked here, before anything of it is saved.
    bad = non_finite_tensors(distiller)
    if distributed.all_reduce_sum(torch.tensor([float(len(bad))], device=device)).item():
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteLoss(f"epoch {epoch}: weights are not finite after the epoch's "
                            f"last step ({shown or 'on another rank'}); {_kept(last)}")
    return names, (sums / steps).tolist() if steps else []


def train_step(model, batch, optimizer, scaler, precision: str, device: torch.device,
               epoch: int, last: Optional[Path]):
    """One optimiser step on a batch (images, labels, indices); returns the loss terms'
    names and their values averaged over the ranks (float64)."""
    images, labels, indices = batch
    images = images.to(device, non_blocking=True)
    labels, indices = labels.to(device), indices.to(device)
    with _autocast(device, precision):
        _, losses = model(images, labels, indices)
        loss = sum(losses.values())
    # One all-reduce gives every rank the global mean of each term, so all ranks agree on
    # stopping at a non-finite loss (one rank stopping alone would hang).
    names = ["loss", *losses]
    values = torch.stack([loss.detach(), *(v.detach() for v in losses.values())])
    values = distributed.all_reduce_sum(values.double()) / distributed.world_size()
    if not bool(torch.isfinite(values).all()):
        terms = dict(zip(names, values.tolist()))
        raise NonFiniteLoss(f"epoch {epoch}: loss is not finite ({terms}); {_kept(last)}")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return names, values


def _save_epoch(distiller, optimizer, scheduler, scaler, epoch, history, rng,
                new_best: Optional[dict], best: Optional[dict], folder: Path) -> None:
    """Commits the epoch: last.pt first (it records everything, the best student
    included), then what is derived from it, best.pt and log.csv."""
    state = {"distiller": distiller.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "scaler": scaler.state_dict() if scaler.is_enabled() else None,
             "epoch": epoch, "history": history.rows, "rng": rng,
             "method": getattr(distiller, "method", None), "best": best}
    run_folder.save_checkpoint(state, folder / run_folder.LAST)
    if new_best is not None:
        run_folder.save_checkpoint(new_best, folder / run_folder.BEST)
    run_folder.write_log(folder, history.rows)
