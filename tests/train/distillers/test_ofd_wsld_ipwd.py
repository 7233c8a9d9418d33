"""OFD, WSLD and IPWD: conformance with their reference implementations' recorded values
(tests/fixtures/methods_ofd_wsld.json), the formulas on hand-made input, IPWD's defining
properties (it has no reference code), each method lowering its own loss, and a step on the
tables' pairs."""
import copy
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from train import engine
from train.configs import TABLES
from train.data.digits import NUM_CLASSES, digits_datasets, stratified_subset
from train.distillers import DISTILLERS, build_distiller, kd_loss
from train.distillers.ofd import margins_from_batch_norm, overhaul_stage_loss, teacher_margin_norms
from train.distillers.reweighted_kd import (inverse_propensity_weights, wsld_sample_weights,
                                            wsld_soft_loss)
from train.models import build_model, feature_points

from helpers import (assert_steps_lower_the_loss, methods_input, methods_ofd_wsld, reference_model,
                     reference_weights)

FIXTURE = methods_ofd_wsld()
PAIRS = sorted(FIXTURE["pairs"])
LABELS = torch.arange(8) % 100
OFD_MODES = {"eval": dict(mode=False, teacher_bn="train"),
             "train": dict(mode=True, teacher_bn="train"),
             "train_teacher_eval": dict(mode=True, teacher_bn="eval")}


def close(value, expected, rel=1e-10):
    return float(value) == pytest.approx(expected, rel=rel, abs=0)


def fresh_pair(pair):
    """Private float64 copies of the fixture's networks (the shared instances stay as built)."""
    teacher_name, student_name = pair.split(":")
    return (copy.deepcopy(reference_model(student_name)),
            copy.deepcopy(reference_model(teacher_name)))


def ofd_record(pair):
    """The reference's values, or for students mdistiller cannot run, the reference code with
    the gaps filled (the extension this implementation makes)."""
    record = FIXTURE["pairs"][pair]
    if record["ofd"].get("supported"):
        return record["ofd"]
    assert "preact_feats" in record["ofd"]["reason"] or "get_stage_channels" in \
        record["ofd"]["reason"]
    return record["ofd_extension_not_reference"]


def reference_ofd(pair, teacher_bn="train"):
    student, teacher = fresh_pair(pair)
    images = methods_input()
    distiller = build_distiller("ofd", student, teacher, example_images=images[:2],
                                teacher_bn=teacher_bn).double()
    recorded = ofd_record(pair)
    # Each entry drawn from its full key, as recorded (mdistiller's connector-module names).
    drawn = reference_weights(list(recorded["connector_state"].items()))
    distiller.criterion.connectors.load_state_dict(
        {k[len("connectors."):]: v for k, v in drawn.items()}, strict=True)
    return distiller, images


@pytest.mark.parametrize("pair", PAIRS)
def test_ofd_points_margins_and_connectors_match_the_reference(pair):
    recorded = ofd_record(pair)
    distiller, images = reference_ofd(pair)
    with torch.no_grad():
        t_points = feature_points(distiller.teacher, images, preact=True)[0][1:-1]
        s_points = feature_points(distiller.student, images, preact=True)[0][1:-1]
    n = len(recorded["stage_factors"])
    assert [list(p.shape) for p in t_points[-n:]] == recorded["teacher_preact_points"]
    assert [list(p.shape) for p in s_points[-n:]] == recorded["student_preact_points"]
    names = {id(m): name for name, m in distiller.teacher.named_modules()}
    assert [names[id(m)] for m in teacher_margin_norms(distiller.teacher)][-n:] == \
        recorded["teacher_margin_bn"]
    margins = distiller.criterion.margins()
    for margin, expected in zip(margins, recorded["margins"], strict=True):
        assert margin.numel() == expected["length"]
        assert margin[:4].tolist() == expected["first4"]  # float32 values, exactly
        assert close(margin.sum(), expected["sum"], rel=1e-13)
    assert distiller.criterion.stage_factors() == recorded["stage_factors"]
    shapes = {f"connectors.{k}": list(v.shape)
              for k, v in distiller.criterion.connectors.state_dict().items()}
    assert shapes == recorded["connector_state"]
    assert sum(p.numel() for p in distiller.criterion.parameters() if p.requires_grad) == \
        recorded["connector_trainable_parameters"]
    outputs = [list(c(p).shape) for c, p in zip(distiller.criterion.connectors, s_points[-n:])]
    assert outputs == recorded["connector_output_points"]


@pytest.mark.parametrize("mode", sorted(OFD_MODES))
@pytest.mark.parametrize("pair", PAIRS)
def test_ofd_feature_losses_match_the_reference(pair, mode):
    recorded = ofd_record(pair)["feat_loss"][mode]
    distiller, images = reference_ofd(pair, OFD_MODES[mode]["teacher_bn"])
    distiller.train(OFD_MODES[mode]["mode"])
    assert distiller.teacher.training == (mode == "train")
    with torch.no_grad():
        stages, _, _ = distiller.stage_losses(images)
    # 1e-13: tight enough to tell the reference's float32 margins from unrounded ones.
    assert not close(recorded["total"], recorded["total_float64_margins"], rel=1e-13)
    for value, expected in zip(stages, recorded["per_stage"], strict=True):
        assert close(value, expected, rel=1e-13), (value, expected)
    # Train-mode batch norms normalise by the batch's statistics, so the running statistics
    # that the pass above moved do not change a second pass.
    with torch.no_grad():
        _, losses = distiller(images, LABELS)
    assert close(losses["ofd"], FIXTURE["ofd_settings"]["feat_weight"] * recorded["total"],
                 rel=1e-13)
    assert set(losses) == {"ce", "ofd"}


def normal_cdf(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_ofd_margin_formula_and_its_fallback():
    norm = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, -0.5, 2.0, 0.1]))
        norm.bias.copy_(torch.tensor([0.0, 0.3, -1.0, 0.5]))  # channel 3: m/s = 5, cdf(-5) tiny
    expected = []
    for s, m in zip(norm.weight.tolist(), norm.bias.tolist()):
        s = abs(s)
        tail = normal_cdf(-m / s)
        if tail > 0.001:
            expected.append(m - s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / tail)
        else:
            expected.append(-3 * s)
    margins = margins_from_batch_norm(norm)
    assert margins.dtype == torch.float32
    assert margins.tolist() == pytest.approx(expected, rel=1e-6)
    assert margins[3].item() == pytest.approx(-0.3, rel=1e-6)
    assert margins[0].item() == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-6)


def test_ofd_partial_l2_on_each_case():
    margin = torch.tensor([-1.0])
    #          t > 0      m<t<=0, x>t   m<t<=0, x<=t   t<=m, x>m   t<=m, x<=m
    target = torch.tensor([2.0, -0.5, -0.5, -3.0, -3.0]).view(1, 1, 1, 5)
    source = torch.tensor([1.0, 0.5, -2.0, 1.0, -2.0]).view(1, 1, 1, 5)
    expected = (1.0 - 2.0) ** 2 + (0.5 + 0.5) ** 2 + 0 + (1.0 + 1.0) ** 2 + 0
    assert overhaul_stage_loss(source, target, margin).item() == pytest.approx(expected)
    # Summed over C, H, W, averaged over the batch.
    doubled = overhaul_stage_loss(source.repeat(2, 3, 1, 1), target.repeat(2, 3, 1, 1), margin)
    assert doubled.item() == pytest.approx(3 * expected)


def test_ofd_teacher_batch_norm_mode_is_the_references_and_can_be_fixed():
    student, teacher = build_model("resnet8", 10), build_model("resnet20", 10)
    images = torch.randn(4, 3, 16, 16)
    distiller = build_distiller("ofd", student, teacher, example_images=images[:2]).train()
    assert teacher.training  # as mdistiller's OFD.train() and the official loop
    before = teacher.layer1[0].bn1.running_mean.clone()
    distiller(images, torch.arange(4))
    assert not torch.equal(before, teacher.layer1[0].bn1.running_mean)
    assert all(p.grad is None for p in teacher.parameters())
    fixed = build_distiller("ofd", build_model("resnet8", 10), teacher,
                            example_images=images[:2], teacher_bn="eval").train()
    assert not fixed.teacher.training
    assert not fixed.eval().teacher.training and not distiller.eval().teacher.training


def test_ofd_bad_input_is_named():
    student, teacher = build_model("resnet8", 10), build_model("resnet20", 10)
    images = torch.zeros(2, 3, 16, 16)
    with pytest.raises(ValueError, match="sizes its connectors from example images"):
        build_distiller("ofd", student, teacher)
    with pytest.raises(ValueError, match="teacher_bn must be one of"):
        build_distiller("ofd", student, teacher, example_images=images, teacher_bn="frozen")
    with pytest.raises(ValueError, match="not known for a MobileNetV2 teacher"):
        build_distiller("ofd", student, build_model("MobileNetV2", 10), example_images=images)


@pytest.fixture(scope="module")
def reference_logits():
    """pair -> (student, teacher) float64 logits of the fixture's images, computed once."""
    cache = {}

    def logits(pair):
        if pair not in cache:
            student, teacher = fresh_pair(pair)
            with torch.no_grad():
                images = methods_input()
                cache[pair] = student(images), teacher(images)
        return cache[pair]
    return logits


@pytest.mark.parametrize("temperature", [2, 4])
@pytest.mark.parametrize("pair", PAIRS)
def test_wsld_matches_the_reference(pair, temperature, reference_logits):
    recorded = FIXTURE["pairs"][pair]["wsld"][f"T{temperature}"]
    s, t = reference_logits(pair)
    weights = wsld_sample_weights(s, t, LABELS)
    assert weights.tolist() == pytest.approx(recorded["sample_weights"], rel=1e-12)
    soft = wsld_soft_loss(s, t, LABELS, float(temperature))
    assert close(soft, recorded["soft_loss"], rel=1e-12)
    assert close(F.cross_entropy(s, LABELS) + FIXTURE["wsld_settings"]["alpha"] * soft,
                 recorded["loss"], rel=1e-12)


def test_wsld_distiller_adds_its_weighted_soft_loss_to_the_cross_entropy():
    pair = "wrn_40_2:wrn_16_2"
    recorded = FIXTURE["pairs"][pair]["wsld"]
    student, teacher = fresh_pair(pair)
    images = methods_input()
    for temperature, options in ((2, {}), (4, {"temperature": 4.0})):
        distiller = build_distiller("wsld", student, teacher, **options).eval()
        with torch.no_grad():
            _, losses = distiller(images, LABELS)
        assert set(losses) == {"ce", "wsld"}
        assert close(losses["ce"], recorded[f"T{temperature}"]["hard_loss"], rel=1e-12)
        assert close(losses["wsld"], FIXTURE["wsld_settings"]["alpha"] *
                     recorded[f"T{temperature}"]["soft_loss"], rel=1e-12)


def test_wsld_soft_term_is_the_weighted_cross_entropy_written_out():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(5, 7, generator=g, dtype=torch.float64), \
        torch.randn(5, 7, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 6, 2, 2])
    T = 2.0
    total = 0.0
    for i in range(5):
        p_t = [math.exp(v / T) for v in t[i].tolist()]
        p_t = [v / sum(p_t) for v in p_t]
        log_z = math.log(sum(math.exp(v / T) for v in s[i].tolist()))
        h = -sum(p * (v / T - log_z) for p, v in zip(p_t, s[i].tolist()))
        ce_s = -s[i, labels[i]].item() + math.log(sum(math.exp(v) for v in s[i].tolist()))
        ce_t = -t[i, labels[i]].item() + math.log(sum(math.exp(v) for v in t[i].tolist()))
        w = 1 - math.exp(-max(ce_s / (ce_t + 1e-7), 0))
        total += w * h
    assert wsld_soft_loss(s, t, labels, T).item() == pytest.approx(T ** 2 * total / 5, rel=1e-12)
    # The weight is a constant: the gradient is that of the weighted cross-entropy alone.
    s.requires_grad_(True)
    wsld_soft_loss(s, t, labels, T).backward()
    weights = wsld_sample_weights(s, t, labels)
    expected = T * weights[:, None] * (F.softmax(s.detach() / T, 1) - F.softmax(t / T, 1)) / 5
    assert torch.allclose(s.grad, expected, rtol=1e-10, atol=1e-14)


def test_ipwd_weights_are_the_normalised_inverse_propensity():
    weights = inverse_propensity_weights(torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))
    # 1/q = (2, 4, 4), mean 10/3.
    assert weights.tolist() == pytest.approx([0.6, 1.2, 1.2], rel=1e-12)
    assert inverse_propensity_weights(torch.full((5,), 0.2)).tolist() == pytest.approx([1.0] * 5)


def tiny_pair(seed=0, classes=10):
    torch.manual_seed(seed)
    return build_model("resnet8", classes), build_model("resnet8", classes)


def test_ipwd_reduces_to_kd_where_the_propensity_is_uniform():
    student, teacher = tiny_pair()
    images, labels = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 5])
    ipwd = build_distiller("ipwd", copy.deepcopy(student), teacher).eval()
    kd = build_distiller("kd", copy.deepcopy(student), teacher).eval()
    _, ipwd_losses = ipwd(images, labels)  # no training step yet: uniform propensity
    _, kd_losses = kd(images, labels)
    assert ipwd_losses["ce"].item() == pytest.approx(kd_losses["ce"].item(), rel=1e-6)
    assert ipwd_losses["ipwd"].item() == pytest.approx(kd_losses["kd"].item(), rel=1e-6)
    # A teacher whose average prediction is uniform over the classes: KD again.
    ipwd.teacher_probability_sum.fill_(3.0)
    ipwd.samples_seen.fill_(30.0)
    assert ipwd(images, labels)[1]["ipwd"].item() == pytest.approx(kd_losses["kd"].item(),
                                                                  rel=1e-6)


def test_ipwd_weighs_each_sample_by_its_class_inverse_propensity():
    student, teacher = tiny_pair(classes=3)
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 2])
    distiller = build_distiller("ipwd", student, teacher).eval()
    distiller.teacher_probability_sum.copy_(torch.tensor([5.0, 2.5, 2.5], dtype=torch.float64))
    distiller.samples_seen.fill_(10.0)
    _, losses = distiller(images, labels)
    with torch.no_grad():
        s, t = student(images), teacher(images)
    per_sample = [kd_loss(s[i:i + 1], t[i:i + 1], 4.0).item() for i in range(4)]
    weights = [0.6, 1.2, 1.2, 1.2]  # q = (0.5, 0.25, 0.25)
    expected = 0.9 * sum(w * v for w, v in zip(weights, per_sample)) / 4
    assert losses["ipwd"].item() == pytest.approx(expected, rel=1e-5)


def test_ipwd_propensity_is_the_teachers_average_prediction_over_the_training_samples():
    student, teacher = tiny_pair()
    distiller = build_distiller("ipwd", student, teacher)
    batches = [torch.randn(5, 3, 16, 16), torch.randn(3, 3, 16, 16)]
    distiller.train()
    for images in batches:
        distiller(images, torch.zeros(images.shape[0], dtype=torch.long))
    with torch.no_grad():
        t = torch.cat([teacher(b) for b in batches]).double()
    expected = F.softmax(t / 4.0, dim=1).mean(0)
    assert torch.allclose(distiller.class_propensity(), expected, rtol=1e-6)
    distiller.eval()(batches[0], torch.zeros(5, dtype=torch.long))  # evaluation: no update
    assert torch.allclose(distiller.class_propensity(), expected, rtol=1e-6)
    state = distiller.state_dict()
    assert state["samples_seen"].item() == 8.0 and "teacher_probability_sum" in state


NEW_METHODS = ("ofd", "wsld", "ipwd")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", NEW_METHODS)
def test_each_new_method_lowers_its_own_loss(method, precision):
    student, teacher = tiny_pair()
    images = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(8) % 10
    options = {"example_images": images[:2]} if method == "ofd" else {}
    distiller = build_distiller(method, student, teacher, **options)
    assert_steps_lower_the_loss(distiller, images, labels, method, precision)


def test_reference_weights_are_the_signature_defaults():
    def defaults(method):
        return {k: p.default for k, p in
                inspect.signature(DISTILLERS[method].__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert defaults("ofd")["gamma"] == FIXTURE["ofd_settings"]["ce_weight"]
    assert defaults("ofd")["beta"] == FIXTURE["ofd_settings"]["feat_weight"]
    assert defaults("wsld")["beta"] == FIXTURE["wsld_settings"]["alpha"]
    assert defaults("wsld")["temperature"] == FIXTURE["wsld_settings"]["T_default"]
    assert {k: defaults("ipwd")[k] for k in ("gamma", "lam", "temperature")} == \
        {k: defaults("kd")[k] for k in ("gamma", "lam", "temperature")}
    student, teacher = tiny_pair()
    with pytest.raises(ValueError, match="method 'wsld' has no option alpha"):
        build_distiller("wsld", student, teacher, alpha=2.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        build_distiller("ipwd", student, teacher, temperature=0)


def table_pairs(*tables):
    return sorted({(t, s, TABLES[table][0]) for table in tables for t, s in TABLES[table][1]})


def take_a_step(method, teacher_name, student_name, dataset):
    classes, size = (100, 32) if dataset == "cifar100" else (1000, 64)
    torch.manual_seed(0)
    images = torch.randn(2, 3, size, size)
    options = {"example_images": images} if method == "ofd" else {}
    distiller = build_distiller(method, build_model(student_name, classes),
                                build_model(teacher_name, classes), **options).train()
    logits, losses = distiller(images, torch.randint(0, classes, (2,)))
    assert logits.shape == (2, classes) and set(losses) == {"ce", method}
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is None for p in distiller.teacher.parameters())
    assert all(p.grad is not None for p in distiller.trainable_parameters()
               if p.requires_grad)
    return distiller


@pytest.mark.parametrize("pair", table_pairs("cifar100-same-family", "cifar100-other-family",
                                             "imagenet"), ids=str)
def test_ofd_builds_and_steps_on_every_table_pair(pair):
    """Including the MobileNetV2 and ShuffleNet students the reference cannot run, and the
    ImageNet pairs (torchvision ResNet teachers, MobileNet V1 and ResNet-18 students)."""
    distiller = take_a_step("ofd", *pair)
    assert distiller.criterion.num_stages >= 3


@pytest.mark.parametrize("method", ["wsld", "ipwd"])
@pytest.mark.parametrize("pair", [p.replace(":", "-") for p in PAIRS])
def test_logit_methods_build_and_step_on_the_fixture_pairs(method, pair):
    teacher_name, student_name = pair.split("-")
    take_a_step(method, teacher_name, student_name, "cifar100")


def digits_distiller(method, student_seed):
    # One teacher for every process (resume checks that it continues with the same teacher);
    # the student of a resumed process starts elsewhere and must be restored.
    torch.manual_seed(0)
    teacher = build_model("resnet8", NUM_CLASSES, in_channels=1)
    torch.manual_seed(student_seed)
    student = build_model("resnet8", NUM_CLASSES, in_channels=1)
    return build_distiller(method, student, teacher, example_images=torch.zeros(2, 1, 8, 8))


def fit_digits(distiller, out_dir, epochs, resume=False):
    train, test = digits_datasets(image_size=8)
    train, test = stratified_subset(train, 0.06, 0), stratified_subset(test, 0.1, 0)
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.05, momentum=0.9)
    config = engine.LoopSettings(epochs=epochs, batch_size=16, seed=1, out_dir=out_dir)
    return engine.fit(distiller, train, test, optimizer, None, config, resume=resume)


@pytest.mark.parametrize("method", ["ofd", "ipwd"])
def test_stateful_methods_resume_on_their_trajectory(method, tmp_path):
    """OFD's teacher running statistics (train-mode teacher) and IPWD's propensity estimate
    change during training: both are checkpointed, so a resumed run retraces the full one."""
    torch.use_deterministic_algorithms(True)
    try:
        full_distiller = digits_distiller(method, 0)
        full = fit_digits(full_distiller, tmp_path / "full", epochs=2)
        fit_digits(digits_distiller(method, 0), tmp_path / "split", epochs=1)
        resumed_distiller = digits_distiller(method, 99)
        resumed = fit_digits(resumed_distiller, tmp_path / "split", epochs=2, resume=True)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(full.rows, resumed.rows, strict=True):
        a.pop("seconds"), b.pop("seconds")
        assert a == b
    for key, value in full_distiller.state_dict().items():
        assert torch.equal(value, resumed_distiller.state_dict()[key]), key
