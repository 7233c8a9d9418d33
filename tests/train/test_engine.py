"""The training loop (train/engine.py): exact resume, a non-finite loss, mixed precision,
TensorBoard."""
import copy

import pytest
import torch

from train import engine
from train.run_folder import read_plan

from helpers import fit_briefly, make_distiller, tiny_problem


def test_resumed_run_follows_the_uninterrupted_trajectory(tmp_path):
    train, test = tiny_problem()
    torch.use_deterministic_algorithms(True)
    try:
        full = fit_briefly(make_distiller("icd"), train, test, epochs=4, out_dir=tmp_path / "full")
        torch.manual_seed(123)  # the resumed process starts from other RNG state
        fit_briefly(make_distiller("icd"), train, test, epochs=2, out_dir=tmp_path / "split")
        # The same teacher (resume checks it is), a student initialised otherwise.
        resumed = fit_briefly(make_distiller("icd", seed=99, teacher=make_distiller("icd").teacher),
                      train, test, epochs=4, out_dir=tmp_path / "split", resume=True)
    finally:
        torch.use_deterministic_algorithms(False)
    assert [r["epoch"] for r in resumed.rows] == [0, 1, 2, 3]
    for a, b in zip(full.rows, resumed.rows):
        a.pop("seconds"), b.pop("seconds")  # wall time, the one thing allowed to differ
        assert a == b
    assert (tmp_path / "split" / "best.pt").exists()
    plan = read_plan(tmp_path / "split")
    assert (plan["method"], plan["epochs"]) == ("icd", 4)
    assert not list((tmp_path / "split").glob("*.tmp"))
    header = (tmp_path / "split" / "log.csv").read_text().splitlines()[0]
    assert header.startswith("epoch,")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    train, test = tiny_problem()
    distiller = make_distiller("vanilla")
    fit_briefly(distiller, train, test, epochs=1, out_dir=tmp_path)
    good = torch.load(tmp_path / "last.pt", weights_only=False)

    def poison(module, inputs):  # after the resume has loaded the good weights
        with torch.no_grad():
            module.fc.weight.fill_(float("nan"))
    distiller.student.register_forward_pre_hook(poison)
    with pytest.raises(engine.NonFiniteLoss, match="last good checkpoint"):
        fit_briefly(distiller, train, test, epochs=3, out_dir=tmp_path, resume=True)
    kept = torch.load(tmp_path / "last.pt", weights_only=False)
    assert kept["epoch"] == good["epoch"] == 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_distillation_lowers_the_loss_and_resumes(precision, trained_teacher,
                                                                  tmp_path):
    train, test = tiny_problem()
    distiller = make_distiller("icd_kd", teacher=copy.deepcopy(trained_teacher))
    params = [p for p in distiller.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)

    def fit(epochs, resume=False):
        config = engine.LoopSettings(epochs=epochs, batch_size=32, seed=1, out_dir=tmp_path,
                                    precision=precision)
        return engine.fit(distiller, train, test, opt, None, config, resume=resume)

    rows = fit(6).rows
    assert rows[-1]["loss"] < 0.85 * rows[0]["loss"], rows
    # The weights stay float32 (autocast only lowers the products' precision).
    assert all(p.dtype == torch.float32 for p in distiller.parameters())
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert (state["scaler"] is not None) == (precision == "fp16")  # fp16 scales its gradients
    assert len(fit(7, resume=True).rows) == 7


def test_unknown_precision_is_named():
    with pytest.raises(ValueError, match="precision must be one of.*'fp8'"):
        engine.LoopSettings(epochs=1, batch_size=8, precision="fp8")


def test_tensorboard_gets_a_scalar_per_epoch(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train, test = tiny_problem()
    distiller = make_distiller("icd")
    opt = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.05)
    config = engine.LoopSettings(epochs=2, batch_size=32, out_dir=tmp_path, tensorboard=True,
                                progress=True)
    history = engine.fit(distiller, train, test, opt, None, config)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"loss", "icd", "ce", "test_acc", "lr"} <= set(events.Tags()["scalars"])
    accuracy = [e.value for e in events.Scalars("test_acc")]
    assert accuracy == pytest.approx([r["test_acc"] for r in history.rows])
