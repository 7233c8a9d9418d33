"""The run folder: the files one training run keeps, and the only code that writes them.

    run.json  the plan: what the run was asked to do (method, models, teacher, data set, loss
              options, epochs); resuming checks it before anything in the folder changes
    last.pt   the record of the last finished epoch: weights, optimiser, scheduler, RNG
              states, history, and the best epoch's student (the commit point)
    best.pt   the student of the best epoch so far, as last.pt records it
    log.csv   one row per finished epoch, as last.pt's history records it
    lock      present while a process trains into the folder: its pid and host

An epoch is committed by writing last.pt; best.pt and log.csv are derived from it and
written after it, so neither ever lists an epoch no checkpoint holds. A process stopped
between two writes leaves last.pt ahead of them; resuming rewrites them from it before
training on. Every file is written whole to a new temporary file (created exclusively with a
random name, so never through a planted link), synced, then renamed over the old one: a
reader sees the old file or the new one, never a part. A failed write names the file and
the cause ("No space left on device") and leaves the old file as it was.

Checkpoints are data: they are read with the safe loader (train/checkpoints.py) and carry a
digest of their content (train/checkpoint_digest.py) that reading checks.
"""
from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import math
import os
import re
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from .checkpoint_digest import sealed

PLAN = "run.json"
LAST = "last.pt"
BEST = "best.pt"
LOG = "log.csv"
LOCK = "lock"
RUN_FILES = (PLAN, LAST, BEST, LOG)  # what a run leaves; --overwrite removes them
PROBE_PREFIX = "probe-"  # `run`'s linear probe results, one JSON file per transfer set
PROBE_RESULTS = PROBE_PREFIX + "*.json"
# The model a finished run is reported by (tables, probes, figures): its final epoch, as the
# tables report the final epoch's accuracy. best.pt, chosen on the test split, would select
# the model on the data it is then measured on.
FINAL = LAST
# The checkpoint of its own teacher run that `run` distils from (--teacher-epoch). The CRD
# benchmark distils from the teacher's final epoch (its published ckpt_epoch_240.pth).
TEACHER_CHECKPOINTS = {"final": LAST, "best-on-test": BEST}
TEACHER_PREFIX = "teacher-"  # <runs>/<dataset>/teacher-<model>: the teacher `run` trains
TMP_SUFFIX = ".tmp"
# The plan's entry that may change on resume: more epochs continue a finished run.
RESUMABLE_CHANGES = ("epochs",)
LOG_REQUIRED = ("epoch", "test_acc")  # columns every log this application writes has


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked: in use, holding another run, damaged, or
    not writable (the message names the file and the cause)."""


def _io_error(action: str, path, error: OSError) -> RunFolderError:
    cause = error.strerror or os.strerror(error.errno or 0) or type(error).__name__
    return RunFolderError(f"cannot {action} {path}: {cause}")


# ---------------------------------------------------------------- writing


def _write_bytes(file, data: bytes) -> None:
    file.write(data)


def write_atomically(path, data: bytes) -> None:
    """path's content becomes data, all at once (see the module's docstring)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as error:
        raise _io_error("write", path, error) from None
    try:
        with os.fdopen(fd, "wb") as file:
            _write_bytes(file, data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(error, OSError):
            raise _io_error("write", path, error) from None
        raise
    _sync_directory(path.parent)


def _sync_directory(folder: Path) -> None:
    # The rename itself survives a power cut only once the folder's entry is on disk.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(payload: dict, path) -> None:
    """torch.save of payload with its digest, written atomically."""
    buffer = io.BytesIO()
    torch.save(sealed(payload), buffer)
    write_atomically(path, buffer.getvalue())


def plan_text(plan: dict) -> str:
    return json.dumps(plan, sort_keys=True) + "\n"


def write_plan(folder, plan: dict) -> None:
    write_atomically(Path(folder) / PLAN, plan_text(plan).encode())


def log_text(rows: List[Dict[str, float]]) -> str:
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "epoch", k))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v)
                         for k, v in r.items()})
    return out.getvalue()


def write_log(folder, rows: List[Dict[str, float]]) -> None:
    write_atomically(Path(folder) / LOG, log_text(rows).encode())


def rewrite_if_changed(path, data: bytes) -> bool:
    """Writes data to path unless path already holds exactly it; True when it wrote."""
    path = Path(path)
    try:
        if path.is_file() and path.read_bytes() == data:
            return False
    except OSError:
        pass
    write_atomically(path, data)
    return True


# ---------------------------------------------------------------- reading


def read_plan(folder) -> Optional[dict]:
    """The folder's run.json; None when it has none. A run.json that is not a JSON object
    (a damaged one) is an error, so no reader takes the run for finished."""
    path = Path(folder) / PLAN
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise RunFolderError(f"{path} cannot be read: {getattr(error, 'strerror', None) or error}"
                             ) from None
    try:
        plan = json.loads(text)
    except ValueError:
        plan = None
    if not isinstance(plan, dict):
        raise RunFolderError(f"{path} is damaged: not the JSON object this application writes")
    return plan


def read_log(folder) -> List[Dict[str, float]]:
    """The folder's log.csv as rows of floats ([] when there is none or no epoch finished).
    A log this application did not write whole (a half-written row, other columns, values
    that are not numbers, epochs out of order) is an error naming the file."""
    path = Path(folder) / LOG
    try:
        with open(path, newline="") as file:
            table = list(csv.reader(file))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise RunFolderError(f"{path} cannot be read: {getattr(error, 'strerror', None) or error}"
                             ) from None

    def damaged(why: str) -> RunFolderError:
        return RunFolderError(f"{path} is not a whole log.csv of this application: {why}")

    if not table:
        return []
    header = table[0]
    missing = [c for c in LOG_REQUIRED if c not in header]
    if missing:
        raise damaged(f"no column {', '.join(missing)} (columns: {', '.join(header)})")
    rows = []
    for number, cells in enumerate(table[1:], start=2):
        if len(cells) != len(header):
            raise damaged(f"line {number} has {len(cells)} values for {len(header)} columns")
        try:
            row = {c: (float(v) if v != "" else math.nan) for c, v in zip(header, cells)}
        except ValueError:
            raise damaged(f"line {number} holds a value that is not a number") from None
        if row["epoch"] != len(rows):
            raise damaged(f"line {number} is epoch {row['epoch']:g}, expected {len(rows)}")
        rows.append(row)
    return rows


def finished_log(folder) -> Optional[List[Dict[str, float]]]:
    """The folder's log rows once the run has finished all the epochs its run.json asks
    for; None before (interrupted runs are not results). Folders without a run.json (written
    by hand or by older versions) count as finished at their last logged epoch."""
    rows = read_log(folder)
    plan = read_plan(folder)
    if not rows:
        return None
    if plan is not None:
        asked = plan.get("epochs", 0)
        if not isinstance(asked, int):
            raise RunFolderError(f"{Path(folder) / PLAN} is damaged: epochs {asked!r} is not "
                                 f"a whole number")
        if len(rows) < asked:
            return None
    return rows


# ---------------------------------------------------------------- names and places


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


def teacher_run_folder(runs, dataset: str, teacher: str) -> Path:
    """Where `run` trains a config's teacher (shared by all configs with that teacher)."""
    return Path(runs) / dataset / f"{TEACHER_PREFIX}{teacher}"


def teacher_of_folder(folder) -> Optional[str]:
    """The model a teacher run folder trained, or None for any other folder."""
    name = Path(folder).name
    return name[len(TEACHER_PREFIX):] if name.startswith(TEACHER_PREFIX) else None


def probe_result_file(folder, transfer_set: str) -> Path:
    """A run's linear-probe result on a transfer set."""
    return Path(folder) / f"{PROBE_PREFIX}{transfer_set}.json"


def write_probe_result(folder, transfer_set: str, accuracy: float, checkpoint: str) -> None:
    write_atomically(probe_result_file(folder, transfer_set), json.dumps(
        {"dataset": transfer_set, "test_acc": accuracy, "checkpoint": checkpoint}).encode())


def read_probe_result(folder, transfer_set: str) -> Optional[dict]:
    """The probe record ({"dataset", "test_acc", "checkpoint"}), or None where there is none;
    a file that is not such a record is an error naming it."""
    path = probe_result_file(folder, transfer_set)
    try:
        record = json.loads(path.read_text())
        record["test_acc"] = float(record["test_acc"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        raise RunFolderError(f"{path} is not the probe result `run` writes") from None
    return record


# ---------------------------------------------------------------- the folder as a whole


def remove_run(folder) -> None:
    """Removes the run's files (--overwrite), its probe results too (they are of its
    best.pt); other files and subfolders stay."""
    for path in [*(Path(folder) / name for name in RUN_FILES),
                 *Path(folder).glob(PROBE_RESULTS)]:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as error:
            raise _io_error("remove", path, error) from None


def remove_orphaned_temporaries(folder) -> List[Path]:
    """Removes the temporary files a stopped process left (its own and those of older
    versions, which used fixed names like log.csv.tmp); only while the folder is locked."""
    removed = []
    for name in RUN_FILES:
        for path in [*Path(folder).glob(f".{name}.*{TMP_SUFFIX}"),
                     *Path(folder).glob(f"{name}*{TMP_SUFFIX}")]:
            if path.is_symlink() or path.is_file():
                try:
                    path.unlink()
                    removed.append(path)
                except OSError as error:
                    raise _io_error("remove", path, error) from None
    return removed


def create(folder) -> bool:
    """Creates the run folder (and its parents); True when it did not exist."""
    folder = Path(folder)
    if folder.is_dir():
        return False
    if folder.exists():
        raise RunFolderError(f"run folder {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True)
    except FileExistsError:
        if not folder.is_dir():
            raise RunFolderError(f"run folder {folder} is a file, not a folder") from None
        return False
    except OSError as error:
        raise _io_error("create the run folder", folder, error) from None
    return True


def remove_if_empty(folder) -> None:
    try:
        Path(folder).rmdir()
    except OSError:
        pass


# ---------------------------------------------------------------- the lock

def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"process {info['pid']} on {info['host']} (since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (which has not written its pid yet)"


def _acquire(folder: Path) -> int:
    path = folder / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise RunFolderError(f"{path} is a symbolic link; remove it") from None
            raise _io_error("lock", path, error) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunFolderError(f"run folder {folder} is in use by {holder}; wait for it to "
                                 f"end or give another --out") from None
        except OSError as error:
            os.close(fd)
            raise _io_error("lock", path, error) from None
        # The holder we waited on may have removed the file between our open and our lock:
        # then we hold a lock on a file no one else will see, and start again.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    # The kernel released the lock of a process that died: its file is taken over.
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.time()}).encode())
    return fd


@contextmanager
def locked(folder) -> Iterator[None]:
    """Holds the folder's lock within the block (a second holder, in this process or
    another, gets RunFolderError naming the first)."""
    folder = Path(folder)
    fd = _acquire(folder)
    try:
        yield
    finally:
        try:
            os.unlink(folder / LOCK)  # while still locked: the next holder makes a new one
        except OSError:
            pass
        os.close(fd)


# ---------------------------------------------------------------- starting a run


def _normalised(plan: dict) -> dict:
    return json.loads(json.dumps(plan, sort_keys=True))  # as run.json gives it back


def plan_differences(recorded: dict, plan: dict) -> List[str]:
    """What a run asked for that the folder's recorded plan does not hold (the entries both
    have, except those a resume may change)."""
    plan = _normalised(plan)
    return [f"{key} {recorded[key]!r} (asked now: {plan[key]!r})"
            for key in sorted(set(recorded) & set(plan))
            if key not in RESUMABLE_CHANGES and recorded[key] != plan[key]]


def holds_a_run(folder) -> bool:
    """Whether the folder holds a finished epoch's files (a run.json alone is a run that
    stopped before its first epoch ended: nothing to lose)."""
    return any((Path(folder) / name).exists() for name in (LAST, BEST, LOG))


def _described(folder: Path) -> str:
    try:
        rows, plan = read_log(folder), read_plan(folder)
    except RunFolderError:
        return "a run"
    asked = (plan or {}).get("epochs")
    if isinstance(asked, int) and len(rows) < asked:
        return f"a run interrupted after {len(rows)} of {asked} epochs"
    return f"a finished run of {len(rows)} epochs" if rows else "a run"


def check_can_train(folder, plan: dict, resume: bool, overwrite: bool) -> None:
    """Raises unless training may go on in folder: it holds no run, or --overwrite replaces
    it (removed here), or --resume continues a run of the same plan. Changes nothing else."""
    folder = Path(folder)
    if not holds_a_run(folder):
        return
    if overwrite:
        remove_run(folder)
        return
    if not resume:
        raise RunFolderError(f"run folder {folder} already holds {_described(folder)}; pass "
                             f"--resume to continue it or --overwrite to replace it")
    recorded = read_plan(folder)
    differences = plan_differences(recorded, plan) if recorded is not None else []
    if differences:
        raise RunFolderError(f"cannot resume the run in {folder}: it was started with "
                             f"{'; '.join(differences)}; resume with the same options, or "
                             f"pass --overwrite to replace it")


@contextmanager
def training_into(folder, plan: dict, resume: bool, overwrite: bool) -> Iterator[None]:
    """The block trains into folder: created when missing, locked, its orphaned temporary
    files removed, and checked (check_can_train). When the block fails with an error before
    the folder holds a finished epoch, the folder it created is removed again."""
    folder = Path(folder)
    created = create(folder)
    try:
        with locked(folder):
            remove_orphaned_temporaries(folder)
            check_can_train(folder, plan, resume, overwrite)
            try:
                yield
            except Exception:  # an error, not an interruption: nothing of it is kept
                if created and not holds_a_run(folder):
                    remove_run(folder)
                raise
    except Exception:
        if created:
            remove_if_empty(folder)
        raise
