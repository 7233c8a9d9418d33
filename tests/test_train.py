"""The training application: zoo, digits data, distillers, loop, checkpoints, resume, demo."""
import copy
import math

import pytest
import torch

import icd_fast
from train import engine
from train.cli import main as cli_main
from train.data.digits import NUM_CLASSES, digits_datasets, stratified_subset
from train.data.labels import dataset_labels
from train.distillers import DISTILLERS, build_distiller
from train.distillers.crd import CRD
from train.distillers.feature_methods import DEFAULT_BETAS
from train.models import FeatureTap, build_model, model_names
from train.run_folder import read_plan


@pytest.mark.parametrize("name", model_names())
def test_every_zoo_model_feeds_icd_loss(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7)
    tap = FeatureTap(model)
    logits = model(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 7)
    assert tap.features.shape == (3, tap.dim)
    criterion = icd_fast.ICDLoss(tap.dim, 24, feat_dim=16)
    loss = criterion(tap.features, torch.randn(3, 24))
    loss.backward()
    assert torch.isfinite(loss)
    # The loss reaches the model's own weights through the tapped features.
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet9'.*resnet8"):
        build_model("resnet9", 10)


def test_digits_split_is_stratified_and_disjoint():
    train, test = digits_datasets(image_size=12)
    assert train.tensors[0].shape[1:] == (1, 12, 12)
    assert len(train) + len(test) == 1797
    for part in (train, test):
        counts = torch.bincount(part.tensors[1], minlength=NUM_CLASSES)
        assert counts.min() > 0.8 * counts.float().mean()
    flat_train = {tuple(x.flatten().tolist()) for x in train.tensors[0][:200]}
    assert not any(tuple(x.flatten().tolist()) in flat_train for x in test.tensors[0][:200])
    small = stratified_subset(train, 0.1)
    assert torch.bincount(small.tensors[1], minlength=NUM_CLASSES).min() >= 1


def tiny_problem(seed=0):
    train, test = digits_datasets(image_size=8)
    return stratified_subset(train, 0.15, seed), stratified_subset(test, 0.3, seed)


# CRD's benchmark K (16384) would make these short runs slow; tests/test_crd.py covers it.
FEW_NEGATIVES = {"num_negatives": 128}


def make_distiller(method, seed=0, teacher=None):
    torch.manual_seed(seed)
    if teacher is None:
        teacher = build_model("resnet8", NUM_CLASSES, in_channels=1)
    student = build_model("resnet8", NUM_CLASSES, in_channels=1)
    train = tiny_problem()[0]
    options = FEW_NEGATIVES if issubclass(DISTILLERS[method], CRD) else {}
    return build_distiller(method, student, None if method == "vanilla" else teacher,
                           num_samples=len(train), labels=dataset_labels(train),
                           example_images=train.tensors[0][:2], **options)


@pytest.fixture(scope="module")
def trained_teacher():
    train, test = tiny_problem()
    torch.manual_seed(0)
    teacher = build_model("resnet8", NUM_CLASSES, in_channels=1)
    run(build_distiller("vanilla", teacher), train, test, epochs=4)
    return teacher


def run(distiller, train, test, epochs, out_dir=None, resume=False, lr=0.05):
    params = [p for p in distiller.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    config = engine.TrainConfig(epochs=epochs, batch_size=32, seed=1, out_dir=out_dir)
    return engine.fit(distiller, train, test, opt, sched, config, resume=resume)


# The comparison methods (feature points) have their own, shorter check in test_methods.py.
@pytest.mark.parametrize("method", sorted(set(DISTILLERS) - set(DEFAULT_BETAS)))
def test_short_distillation_lowers_the_loss(method, trained_teacher):
    # (CRD's term first rises while its memory bank, initialised at random, catches up with
    # the embeddings; over eight epochs every method's loss ends well below where it began.)
    train, test = tiny_problem()
    history = run(make_distiller(method, teacher=copy.deepcopy(trained_teacher)), train, test,
                  epochs=8)
    losses = [r["loss"] for r in history.rows]
    assert losses[-1] < 0.85 * losses[0], losses
    assert all(math.isfinite(v) for v in losses)


def test_icd_trains_theta_and_keeps_the_teacher_frozen():
    train, test = tiny_problem()
    distiller = make_distiller("icd_kd")
    theta0 = distiller.criterion.log_scale.item()
    teacher0 = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    history = run(distiller, train, test, epochs=2)
    assert distiller.criterion.log_scale.item() != theta0
    for k, v in distiller.teacher.state_dict().items():
        assert torch.equal(v, teacher0[k]), k  # weights and batch-norm statistics
    assert {"ce", "kd", "icd", "loss"} <= set(history.rows[-1])


def test_a_method_that_needs_a_teacher_says_so():
    with pytest.raises(ValueError, match="needs a teacher"):
        build_distiller("icd", build_model("resnet8", 10), None)
    with pytest.raises(ValueError, match="unknown method 'crd2'"):
        build_distiller("crd2", build_model("resnet8", 10), None)


def test_resumed_run_follows_the_uninterrupted_trajectory(tmp_path):
    train, test = tiny_problem()
    torch.use_deterministic_algorithms(True)
    try:
        full = run(make_distiller("icd"), train, test, epochs=4, out_dir=tmp_path / "full")
        torch.manual_seed(123)  # the resumed process starts from other RNG state
        run(make_distiller("icd"), train, test, epochs=2, out_dir=tmp_path / "split")
        # The same teacher (resume checks it is), a student initialised otherwise.
        resumed = run(make_distiller("icd", seed=99, teacher=make_distiller("icd").teacher),
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
    run(distiller, train, test, epochs=1, out_dir=tmp_path)
    good = torch.load(tmp_path / "last.pt", weights_only=False)

    def poison(module, inputs):  # after the resume has loaded the good weights
        with torch.no_grad():
            module.fc.weight.fill_(float("nan"))
    distiller.student.register_forward_pre_hook(poison)
    with pytest.raises(engine.NonFiniteLoss, match="last good checkpoint"):
        run(distiller, train, test, epochs=3, out_dir=tmp_path, resume=True)
    kept = torch.load(tmp_path / "last.pt", weights_only=False)
    assert kept["epoch"] == good["epoch"] == 0


def test_demo_prints_the_table(capsys, tmp_path):
    assert cli_main(["demo", "--teacher-epochs", "1", "--epochs", "1", "--seeds", "2",
                     "--image-size", "8", "--methods", "vanilla", "icd",
                     "--figures", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| vanilla |" in out and "| icd |" in out and "+-" in out


def test_teacher_distill_evaluate_commands_end_to_end(tmp_path, capsys):
    common = ["--dataset", "digits", "--epochs", "2", "--batch-size", "64"]
    assert cli_main(["train-teacher", "--model", "resnet8", "--out", str(tmp_path / "t"),
                     *common]) == 0
    teacher_ckpt = tmp_path / "t" / "best.pt"
    assert cli_main(["distill", "--teacher", "resnet8", "--teacher-ckpt", str(teacher_ckpt),
                     "--student", "resnet8", "--method", "icd_kd", "--out", str(tmp_path / "s"),
                     *common]) == 0
    assert cli_main(["evaluate", "--dataset", "digits", "--model", "resnet8",
                     "--ckpt", str(tmp_path / "s" / "best.pt")]) == 0
    out = capsys.readouterr().out
    assert "icd_kd resnet8: epoch 1" in out and "test top-1" in out
    # Resuming a finished run trains nothing more and keeps its history.
    assert cli_main(["distill", "--teacher", "resnet8", "--teacher-ckpt", str(teacher_ckpt),
                     "--student", "resnet8", "--out", str(tmp_path / "s"), "--resume",
                     *common]) == 0
    assert cli_main(["evaluate", "--dataset", "digits", "--model", "resnet20",
                     "--ckpt", str(teacher_ckpt)]) == 2
    assert "does not hold a resnet20" in capsys.readouterr().err


def test_missing_data_set_is_one_clear_line(tmp_path, capsys):
    assert cli_main(["train-teacher", "--model", "resnet8", "--dataset", "cifar100",
                     "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: CIFAR-100 not found") and "--download" in err


def test_recipes_follow_the_paper():
    from train.options import RecipeOverrides
    from train.recipes import recipe

    none = RecipeOverrides()
    assert recipe("cifar100", none, "resnet8x4") == (240, 64, 0.05, (150, 180, 210), 5e-4)
    assert recipe("cifar100", none, "MobileNetV2")[2] == 0.01
    assert recipe("imagenet", none, "tv_resnet18") == (100, 256, 0.1, (30, 60, 90), 1e-4)


def test_crd_memory_banks_follow_the_embeddings(trained_teacher):
    train, test = tiny_problem()
    distiller = make_distiller("crd", teacher=copy.deepcopy(trained_teacher))
    bank0 = distiller.memory_t.clone()
    history = run(distiller, train, test, epochs=2)
    assert "crd" in history.rows[-1]
    changed = (distiller.memory_t - bank0).abs().sum(dim=1) > 0
    assert changed.float().mean() > 0.8  # drop_last leaves a few samples unseen
    norms = distiller.memory_t[changed].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    with pytest.raises(ValueError, match="num_samples"):
        build_distiller("crd", build_model("resnet8", 10), build_model("resnet8", 10))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_distillation_lowers_the_loss_and_resumes(precision, trained_teacher,
                                                                  tmp_path):
    train, test = tiny_problem()
    distiller = make_distiller("icd_kd", teacher=copy.deepcopy(trained_teacher))
    params = [p for p in distiller.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)

    def fit(epochs, resume=False):
        config = engine.TrainConfig(epochs=epochs, batch_size=32, seed=1, out_dir=tmp_path,
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
        engine.TrainConfig(epochs=1, batch_size=8, precision="fp8")


def test_tensorboard_gets_a_scalar_per_epoch(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train, test = tiny_problem()
    distiller = make_distiller("icd")
    opt = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.05)
    config = engine.TrainConfig(epochs=2, batch_size=32, out_dir=tmp_path, tensorboard=True,
                                progress=True)
    history = engine.fit(distiller, train, test, opt, None, config)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"loss", "icd", "ce", "test_acc", "lr"} <= set(events.Tags()["scalars"])
    accuracy = [e.value for e in events.Scalars("test_acc")]
    assert accuracy == pytest.approx([r["test_acc"] for r in history.rows])


def test_explicit_recipe_overrides_are_honoured_even_when_zero():
    from train.options import RecipeOverrides
    from train.recipes import recipe

    given = RecipeOverrides(epochs=3, batch_size=16, lr=0.0, lr_decay_epochs=(),
                            weight_decay=0.0)
    plan = recipe("cifar100", given, "resnet8x4")
    assert plan.lr == 0.0 and plan.weight_decay == 0.0 and plan.epochs == 3
    assert plan.batch_size == 16 and plan.lr_decay_epochs == ()


def test_loss_weights_reach_the_distiller_and_unknown_ones_are_refused():
    from train.options import LossWeights
    from train.training import loss_weight_options

    options = loss_weight_options(LossWeights(kd_weight=0.0, beta=2.5))
    assert options == {"lam": 0.0, "beta": 2.5}
    student = build_model("resnet8", NUM_CLASSES, 1)
    teacher = build_model("resnet8", NUM_CLASSES, 1)
    distiller = build_distiller("icd", student, teacher, **options)
    assert distiller.beta == 2.5 and distiller.lam == 0.0
    with pytest.raises(ValueError, match="'vanilla' has no option beta"):
        build_distiller("vanilla", build_model("resnet8", NUM_CLASSES, 1), beta=1.0)


def test_run_folders_of_other_loss_weights_stay_apart():
    from train.run_folder import run_folder_name

    name = "cifar100/wrn_40_2-wrn_16_2/icd"
    assert run_folder_name(name, 0) == "cifar100__wrn_40_2-wrn_16_2__icd__seed0"
    assert run_folder_name(name, 1, {"beta": 2.0, "alpha": 0.1}) == (
        "cifar100__wrn_40_2-wrn_16_2__icd__alpha=0.1__beta=2__seed1")
    # the results' glob of a config's own runs does not pick up a sweep's
    import fnmatch
    assert not fnmatch.fnmatch(run_folder_name(name, 1, {"beta": 2.0}),
                               run_folder_name(name, "*"))
