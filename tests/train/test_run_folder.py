"""Run folders: nothing lost, nothing silent (issue 18).

Faults are injected at every write of a run (a full disk while the file is written, a kill
just after it is renamed into place); after each the folder must be the previous consistent
state or the new one, and resuming it must end exactly where the uninterrupted run ends.
"""
import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import engine, run_folder
from train.checkpoints import read_checkpoint
from train.cli import main
from train.distillers import build_distiller
from train.models import build_model
from train.results import final_accuracy
from train.run_folder import BEST, LAST, LOCK, LOG, PLAN, RunFolderError

from helpers import tiny_problem

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ["--dataset", "digits", "--device", "cpu"]
EPOCHS = 3


def small_student(seed=0):
    # A few thousand weights: the fault tests train dozens of runs.
    torch.manual_seed(seed)
    return build_distiller("vanilla", torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10)))


def train_into(folder, epochs=EPOCHS, resume=False, overwrite=False, distiller=None,
               lr=0.05):
    train, test = tiny_problem()
    distiller = distiller if distiller is not None else small_student()
    opt = torch.optim.SGD(distiller.trainable_parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    config = engine.LoopSettings(epochs=epochs, batch_size=32, seed=1, out_dir=folder,
                                overwrite=overwrite, plan={"student": "resnet8"})
    return engine.fit(distiller, train, test, opt, sched, config, resume=resume)


def without_time(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def snapshot(folder: Path):
    """Every file of a folder with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


class Killed(BaseException):
    """The process stopped (SIGKILL, power cut) right after a write."""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted") / "run"
    calls = []
    real = run_folder.write_atomically

    def counting(path, data):
        calls.append(Path(path).name)
        real(path, data)

    run_folder.write_atomically = counting
    try:
        history = train_into(folder)
    finally:
        run_folder.write_atomically = real
    return folder, history, calls


def test_an_uninterrupted_run_commits_last_pt_before_best_pt_and_log_csv(uninterrupted):
    folder, history, writes = uninterrupted
    # The plan, then per epoch the record first and what is derived from it after.
    assert writes[0] == PLAN
    epochs = "".join({LAST: "|L", BEST: "B", LOG: "G"}[w] for w in writes[1:]).split("|")[1:]
    assert len(epochs) == EPOCHS and set(epochs) <= {"LBG", "LG"}, writes
    assert epochs[0] == "LBG"  # the first epoch is the best so far
    assert sorted(p.name for p in folder.iterdir()) == [BEST, LAST, LOG, PLAN]  # lock gone
    last = read_checkpoint(folder / LAST)
    best = read_checkpoint(folder / BEST)
    best_row = max(history.rows, key=lambda r: r["test_acc"])
    assert last["best"]["epoch"] == best["epoch"]
    assert best["test_acc"] == best_row["test_acc"]


def consistent(folder: Path) -> int:
    """Checks what a reader may rely on at any instant; returns the epochs last.pt holds."""
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert not (folder / LOCK).exists()
    plan = run_folder.read_plan(folder)  # whole, or absent
    if not (folder / LAST).exists():
        assert not (folder / BEST).exists() and not (folder / LOG).exists()
        return 0
    assert plan is not None
    last = read_checkpoint(folder / LAST)  # whole: its digest holds
    committed = last["epoch"] + 1
    rows = run_folder.read_log(folder)
    # The log never lists an epoch no checkpoint holds; it lags by at most the epoch in
    # the middle of its writes.
    assert committed - 1 <= len(rows) <= committed
    assert rows == [{k: float(f"{v:.6g}") for k, v in r.items()}
                    for r in last["history"][:len(rows)]]
    if (folder / BEST).exists():
        assert read_checkpoint(folder / BEST)["epoch"] <= last["epoch"]
    return committed


@pytest.mark.parametrize("fault", ["no space", "permission", "killed"])
def test_a_fault_at_any_write_leaves_a_consistent_folder_that_resumes_exactly(
        fault, uninterrupted, tmp_path):
    reference_folder, reference, writes = uninterrupted
    torch.use_deterministic_algorithms(True)
    try:
        # Every write fails (disk full) or is the last (killed); a refused write once.
        ks = [writes.index(LAST) + 1] if fault == "permission" else range(1, len(writes) + 1)
        for k in ks:
            folder = tmp_path / f"run{k}"
            count = [0]
            real_write, real_bytes = run_folder.write_atomically, run_folder._write_bytes

            def write_bytes(file, data):  # the disk fills up half way through write k
                count[0] += 1
                if count[0] == k and fault != "killed":
                    file.write(data[:len(data) // 2])
                    code = errno.ENOSPC if fault == "no space" else errno.EACCES
                    raise OSError(code, os.strerror(code))
                real_bytes(file, data)

            def write_then_die(path, data):
                real_write(path, data)
                if count[0] == k and fault == "killed":
                    raise Killed()

            run_folder._write_bytes = write_bytes
            run_folder.write_atomically = write_then_die
            try:
                if fault == "killed":
                    with pytest.raises(Killed):
                        train_into(folder)
                else:
                    with pytest.raises(RunFolderError) as failure:
                        train_into(folder)
                    cause = "No space left on device" if fault == "no space" else \
                        "Permission denied"
                    assert str(failure.value) == (
                        f"cannot write {folder / writes[k - 1]}: {cause}")
            finally:
                run_folder._write_bytes, run_folder.write_atomically = real_bytes, real_write
            if folder.exists():
                consistent(folder)
            else:
                completed = writes[:k] if fault == "killed" else writes[:k - 1]
                assert LAST not in completed  # failed before it held an epoch
            resumed = train_into(folder, resume=True)
            assert without_time(resumed.rows) == without_time(reference.rows), k
            assert consistent(folder) == EPOCHS
            assert without_time(run_folder.read_log(folder)) == \
                without_time(run_folder.read_log(reference_folder)), k
            for name, weights in ((BEST, "student"), (LAST, "distiller")):
                got = read_checkpoint(folder / name)
                want = read_checkpoint(reference_folder / name)
                assert got["epoch"] == want["epoch"], (k, name)
                for key, value in want[weights].items():
                    assert torch.equal(got[weights][key], value), (k, name, key)
    finally:
        torch.use_deterministic_algorithms(False)


def test_a_stale_best_pt_is_rewritten_from_last_pt_on_resume(tmp_path):
    folder = tmp_path / "run"
    history = train_into(folder)
    best_row = max(history.rows, key=lambda r: r["test_acc"])
    early = read_checkpoint(folder / BEST)
    # As if killed after last.pt of the best epoch but before best.pt: an older best.pt.
    older = {**early, "epoch": -1, "test_acc": 1.0}
    run_folder.save_checkpoint(older, folder / BEST)
    (folder / LOG).write_text(run_folder.log_text(history.rows[:-1]))
    resumed = train_into(folder, resume=True)
    assert without_time(resumed.rows) == without_time(history.rows)
    best = read_checkpoint(folder / BEST)
    assert (best["epoch"], best["test_acc"]) == (best_row["epoch"], best_row["test_acc"])
    assert len(run_folder.read_log(folder)) == EPOCHS


def test_a_nan_model_is_never_saved_and_the_run_fails_in_one_line(tmp_path, capsys):
    # One step per epoch: the weights after the epoch's last step are what would be saved.
    out = tmp_path / "run"
    assert main(["train-teacher", "--model", "resnet8", *DIGITS, "--epochs", "1",
                 "--batch-size", "1347", "--lr", "nan", "--out", str(out)]) == 2
    err = one_line_error(capsys)
    assert "weights are not finite after the epoch's last step" in err
    assert "no checkpoint was written" in err
    assert not out.exists()  # nothing finished: the folder it made is gone


def test_nan_weights_after_a_good_epoch_keep_the_good_checkpoint(tmp_path):
    folder = tmp_path / "run"
    train_into(folder, epochs=1)
    good = (folder / LAST).read_bytes()
    distiller = small_student()
    train, test = tiny_problem()
    opt = torch.optim.SGD(distiller.trainable_parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    config = engine.LoopSettings(epochs=2, batch_size=len(train), seed=1, out_dir=folder,
                                plan={"student": "resnet8"})
    # One step per epoch at lr NaN: that step's weights are the epoch's last.
    original_load = opt.load_state_dict

    def load_then_poison(state):
        original_load(state)
        for group in opt.param_groups:
            group["lr"] = float("nan")
    opt.load_state_dict = load_then_poison
    with pytest.raises(engine.NonFiniteLoss, match=f"last good checkpoint is {folder / LAST}"):
        engine.fit(distiller, train, test, opt, sched, config, resume=True)
    assert (folder / LAST).read_bytes() == good


def test_resume_checks_the_plan_before_changing_anything(tmp_path, capsys):
    common = [*DIGITS, "--epochs", "1", "--batch-size", "256"]
    assert main(["train-teacher", "--model", "resnet8", "--out", str(tmp_path / "t"),
                 *common]) == 0
    other_teacher = tmp_path / "other-teacher.pt"
    torch.save(build_model("resnet8", 10, in_channels=1).state_dict(), other_teacher)
    out = tmp_path / "s"

    def distill(*more, method="kd", student="resnet8", teacher=tmp_path / "t" / BEST):
        return main(["distill", "--teacher", "resnet8", "--teacher-ckpt", str(teacher),
                     "--student", student, "--method", method, "--out", str(out), *common,
                     *more])
    assert distill() == 0
    capsys.readouterr()
    before = snapshot(out)
    for change, named in (({"method": "at"}, "method 'kd' (asked now: 'at')"),
                          ({"student": "resnet20"}, "student 'resnet8' (asked now: 'resnet20')"),
                          ({"teacher": other_teacher}, "teacher_weights"),
                          ({}, "loss_options {} (asked now: {'lam': 0.5})")):
        more = ["--kd-weight", "0.5"] if not change else []
        assert distill(*more, "--resume", "--epochs", "2", **change) == 2, change
        err = one_line_error(capsys)
        assert f"cannot resume the run in {out}" in err and "--overwrite" in err
        assert named in err, err
        assert snapshot(out) == before, change
    # The same plan resumes (with more epochs).
    assert distill("--resume", "--epochs", "2") == 0
    assert len(run_folder.read_log(out)) == 2


def test_a_last_pt_of_another_model_is_refused_before_anything_changes(tmp_path):
    folder = tmp_path / "run"
    train_into(folder, epochs=1)
    before = snapshot(folder)
    other = build_distiller("vanilla", build_model("resnet8", 10, in_channels=1))
    with pytest.raises(RunFolderError, match="does not fit this run"):
        train_into(folder, epochs=2, resume=True, distiller=other)
    assert snapshot(folder) == before


def test_a_finished_run_is_replaced_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train-teacher", "--model", "resnet8", *DIGITS, "--epochs", "1",
            "--batch-size", "256", "--out", str(out)]
    assert main(argv) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert "already holds a finished run of 1 epochs" in err and "--overwrite" in err
    assert snapshot(out) == before
    (out / "probe-stl10.json").write_text('{"test_acc": 70.0}')  # of the replaced best.pt
    assert main([*argv, "--lr", "0.2", "--overwrite"]) == 0
    assert (out / LAST).read_bytes() != before[Path(LAST)]
    assert read_checkpoint(out / LAST)["epoch"] == 0
    assert sorted(p.name for p in out.iterdir()) == [BEST, LAST, LOG, PLAN]


def test_temporary_files_never_follow_planted_links_and_orphans_are_removed(tmp_path):
    folder, outside = tmp_path / "run", tmp_path / "outside"
    folder.mkdir(), outside.mkdir()
    targets = []
    for name in ("log.csv.tmp", "run.json.tmp", "last.pt.tmp", f".{LAST}.planted.tmp"):
        target = outside / f"target-{name}"
        target.write_text("keep me")
        (folder / name).symlink_to(target)
        targets.append(target)
    orphan = folder / f".{BEST}.abc123.tmp"  # left by a killed process
    orphan.write_bytes(b"half a checkpoint")
    train_into(folder, epochs=1)
    assert all(t.read_text() == "keep me" for t in targets)
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert sorted(p.name for p in folder.iterdir()) == [BEST, LAST, LOG, PLAN]


HOLDER = """
import sys
from train.run_folder import locked
with locked(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_locked_run_folder_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline() == "held\n"
        argv = ["train-teacher", "--model", "resnet8", *DIGITS, "--epochs", "1",
                "--batch-size", "256", "--out", str(out)]
        assert main(argv) == 2
        err = one_line_error(capsys)
        assert f"run folder {out} is in use by process {holder.pid} on " \
               f"{socket.gethostname()}" in err
        assert not (out / LAST).exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert main(argv) == 0  # released when its holder ended


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK).write_text(f'{{"pid": {int(dead.stdout)}, "host": "{socket.gethostname()}",'
                               f' "since": 0}}')
    train_into(folder, epochs=1)
    assert read_checkpoint(folder / LAST)["epoch"] == 0
    assert not (folder / LOCK).exists()


def test_checkpoints_carry_a_digest_and_flipped_bytes_never_load_silently(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet8", 10)
    payload = {"student": model.state_dict(), "epoch": 3, "test_acc": 61.5}
    path = tmp_path / BEST
    run_folder.save_checkpoint(payload, path)
    original = path.read_bytes()
    loaded = read_checkpoint(path)
    assert loaded.keys() == payload.keys()
    generator = torch.Generator().manual_seed(0)
    positions = torch.randint(0, len(original), (60,), generator=generator).tolist()
    refused = 0
    for position in positions:
        damaged = bytearray(original)
        damaged[position] ^= 0x10
        path.write_bytes(bytes(damaged))
        try:
            content = read_checkpoint(path)
        except ValueError as error:
            assert str(path) in str(error) and "\n" not in str(error)
            refused += 1
            continue
        # A flip the load did not notice may only be one that changes nothing loaded.
        assert content["epoch"] == 3 and content["test_acc"] == 61.5, position
        for key, value in payload["student"].items():
            assert torch.equal(content["student"][key], value), (position, key)
    assert refused >= 50  # the tensors' bytes are nearly all of the file
    # A changed value in the content is named as damage.
    run_folder.write_atomically(path, original)
    state = torch.load(path, weights_only=True)
    state["epoch"] = 4
    torch.save(state, path)
    with pytest.raises(ValueError, match="is damaged: its content does not match the digest"):
        read_checkpoint(path)


@pytest.mark.parametrize("length", [0, 10, 100, 1000, -100])
def test_a_truncated_checkpoint_is_one_line(tmp_path, capsys, length):
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    torch.save(build_model("resnet8", 10, in_channels=1).state_dict(), path)
    path.write_bytes(path.read_bytes()[:length])
    assert main(["evaluate", *DIGITS, "--model", "resnet8", "--ckpt", str(path)]) == 2
    assert f"checkpoint {path} cannot be read" in one_line_error(capsys)


def test_text_files_folders_and_keyless_last_pt_are_one_line_errors(tmp_path, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("this is not a checkpoint\n" * 20)
    assert main(["evaluate", *DIGITS, "--model", "resnet8", "--ckpt", str(text)]) == 2
    assert f"checkpoint {text} cannot be read" in one_line_error(capsys)
    assert main(["evaluate", *DIGITS, "--model", "resnet8", "--ckpt", str(tmp_path)]) == 2
    assert f"checkpoint {tmp_path} is a folder" in one_line_error(capsys)
    out = tmp_path / "run"
    out.mkdir()
    run_folder.save_checkpoint({"epoch": 0}, out / LAST)
    assert main(["train-teacher", "--model", "resnet8", *DIGITS, "--epochs", "1",
                 "--batch-size", "256", "--out", str(out), "--resume"]) == 2
    assert "lacks distiller, optimizer, history, rng" in one_line_error(capsys)


def test_output_paths_that_cannot_be_written_are_one_line(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    teacher = ["train-teacher", "--model", "resnet8", *DIGITS, "--epochs", "1",
               "--batch-size", "256"]
    assert main([*teacher, "--out", str(a_file)]) == 2
    assert f"run folder {a_file} is a file" in one_line_error(capsys)
    assert main([*teacher, "--out", str(a_file / "run")]) == 2
    assert f"cannot create the run folder {a_file / 'run'}: Not a directory" in \
        one_line_error(capsys)
    runs = tmp_path / "runs"
    runs.mkdir()
    assert main(["results", "--runs", str(runs), "--out", str(a_file / "tables")]) == 2
    one_line_error(capsys)
    (runs / LOG).write_text("epoch,test_acc,lr\n0,50,0.05\n")
    assert main(["plot", str(runs), "--out", str(a_file / "figures")]) == 2
    one_line_error(capsys)

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(args[0]))
    monkeypatch.setattr(os, "mkdir", refused)  # as a non-root user in a read-only place
    assert main([*teacher, "--out", str(tmp_path / "new")]) == 2
    err = one_line_error(capsys)
    assert f"cannot create the run folder {tmp_path / 'new'}: Permission denied" in err


@pytest.mark.parametrize("argv,message", [
    (["demo", "--threads", "-1"], "--threads must be >= 0"),
    (["demo", "--seeds", "0"], "--seeds must be >= 1"),
    (["demo", "--methods", "icd", "bogus"], "unknown method 'bogus'"),
    (["train-teacher", "--model", "resnet8", "--dataset", "digits", "--device", "tpu",
      "--out", "never-made"], "--device 'tpu' is not one of"),
])
def test_command_line_mistakes_are_one_line_before_any_training(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing started (the demo prints as it trains)
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert message in captured.err
    assert not Path("never-made").exists()


def test_a_failed_check_leaves_no_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train-teacher", "--model", "resnet8", *DIGITS, "--epochs", "1",
                 "--batch-size", "100000", "--out", str(out)]) == 2
    assert "larger than the training set" in one_line_error(capsys)
    assert not out.exists()


def test_damaged_logs_and_plans_are_reported_and_skipped_by_results(tmp_path, capsys):
    good = tmp_path / "cifar100__resnet56-resnet20__kd__seed0"
    good.mkdir()
    (good / LOG).write_text("epoch,test_acc,lr\n0,60.5,0.05\n")
    damaged = {
        "cifar100__resnet56-resnet20__kd__seed1": "epoch,test_acc,lr\n0,61,0.05\n1,6",
        "cifar100__resnet56-resnet20__kd__seed2": "step,accuracy\n0,61\n",
        "cifar100__resnet56-resnet20__kd__seed3": "epoch,test_acc,lr\n0,abc,0.05\n",
    }
    for name, log in damaged.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / LOG).write_text(log)
    not_json = tmp_path / "cifar100__resnet56-resnet20__kd__seed4"
    not_json.mkdir()
    (not_json / LOG).write_text("epoch,test_acc,lr\n0,99,0.05\n")
    (not_json / PLAN).write_text('{"method": "kd", "epo')
    with pytest.raises(RunFolderError, match="run.json is damaged"):
        final_accuracy(not_json)  # never counted as finished
    transfer = tmp_path / "transfer__wrn_40_2-wrn_16_2__at__seed0"
    transfer.mkdir()
    (transfer / LOG).write_text("epoch,test_acc,lr\n0,74,0.05\n")
    (transfer / "probe-stl10.json").write_text('{"test_acc": 7')
    assert main(["results", "--runs", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    warnings = captured.err.splitlines()
    assert len(warnings) == 5 and all(w.startswith("warning: skipped ") for w in warnings)
    assert all(name in captured.err for name in [*damaged, not_json.name, "probe-stl10.json"])
    assert "60.50 +- 0.00 (1) / " in captured.out  # the good folder is still counted
    assert "74.00 +- 0.00 (1) / " in captured.out
