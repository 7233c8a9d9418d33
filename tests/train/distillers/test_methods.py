"""The comparison methods as distillers: conformance with the CRD benchmark's recorded values
(tests/fixtures/methods.json), each method lowering its own loss, the loss weights, and the
two-stage methods' initialisation stage (both stages, checkpoints, resume)."""
import copy

import pytest
import torch

from train import engine
from train.cli import main
from train.data.digits import NUM_CLASSES, digits_datasets, stratified_subset
from train.distillers import build_criterion, build_distiller, kd_loss
from train.distillers.criteria import cosine_probabilities
from train.distillers.feature_methods import DEFAULT_BETAS, TWO_STAGE_METHODS, example_features
from train.models import build_model, feature_points
from train.recipes import init_stage_lr
from train.training import train_init_stage, train_model

from helpers import (assert_steps_lower_the_loss, methods, methods_input, printed_table,
                     reference_model, write_cifar100)

FIXTURE = methods()
METHODS = sorted(DEFAULT_BETAS)


@pytest.fixture(scope="module")
def reference_pairs():
    images = methods_input()
    pairs = {}
    for pair in FIXTURE["pairs"]:
        teacher_name, student_name = pair.split(":")
        outputs = []
        for name in (student_name, teacher_name):
            model = reference_model(name)
            with torch.no_grad():
                outputs.append((feature_points(model, images),
                                feature_points(model, images, preact=True)[0]))
        pairs[pair] = outputs
    return pairs


def one_point(features, index):
    """The feature list reduced to the stem, stage `index` and the pooled feature: a
    criterion summed over stages then gives that stage's value alone."""
    return [features[0], features[index], features[-1]]


def consecutive(features, index):
    """Points index and index + 1 (FSP's pair) and the pooled feature."""
    return [features[index], features[index + 1], features[-1]]


def pkt_rounding_scale(pkt, s_features, t_features) -> float:
    """How far two correct computations of PKT may differ (another CPU's matrix products).

    PKT is the mean of N^2 terms p_t log((p_t + eps) / (p_s + eps)) that nearly cancel (for
    vgg13 -> MobileNetV2 the result is 1e-12 where the terms are 1e-1): a relative tolerance
    on the result measures nothing but rounding. Each p comes from dot products of length D,
    so its relative rounding error is up to D units of round-off; the log of a ratio near 1
    then carries that as an absolute error, and a term carries it times p_t (plus its own
    relative error times |term|). The bound is that, averaged: D u (mean p_t + mean |term|).
    """
    (s,), (t,) = pkt.points(s_features), pkt.points(t_features)
    p_s, p_t = cosine_probabilities(s, pkt.eps), cosine_probabilities(t, pkt.eps)
    terms = p_t * torch.log((p_t + pkt.eps) / (p_s + pkt.eps))
    round_off = torch.finfo(s.dtype).eps * max(s.shape[1], t.shape[1])
    return round_off * (p_t.mean() + terms.abs().mean()).item()


@pytest.mark.parametrize("pair", sorted(FIXTURE["pairs"]))
def test_feature_points_and_criteria_match_the_benchmark(pair, reference_pairs):
    recorded = FIXTURE["pairs"][pair]
    ((s_features, s_logits), s_preact), ((t_features, t_logits), t_preact) = \
        reference_pairs[pair]
    assert [list(f.shape) for f in s_features] == recorded["student_features"]
    assert [list(f.shape) for f in t_features] == recorded["teacher_features"]
    assert [f.shape for f in s_preact] == [f.shape for f in s_features]
    values = recorded["criterion_values"]

    def close(value, expected):
        return value.item() == pytest.approx(expected, rel=1e-8, abs=0)

    assert close(kd_loss(s_logits, t_logits, 4.0), values["kd_T4"])
    stages = range(1, len(s_features) - 1)
    for name in ("at", "nst"):
        for stage, expected in zip(stages, values[name], strict=True):
            s, t = one_point(s_features, stage), one_point(t_features, stage)
            assert close(build_criterion(name, s, t)(s, t), expected), (name, stage)
        assert close(build_criterion(name, s_features, t_features)(s_features, t_features),
                     sum(values[name]))
    for name in ("sp", "rkd"):
        expected = values[name][0] if isinstance(values[name], list) else values[name]
        assert close(build_criterion(name, s_features, t_features)(s_features, t_features),
                     expected), name
    pkt = build_criterion("pkt", s_features, t_features)
    assert pkt(s_features, t_features).item() == pytest.approx(
        values["pkt"], rel=1e-8, abs=pkt_rounding_scale(pkt, s_features, t_features)), pair
    if "cc_on_features" in values:
        cc = build_criterion("cc", s_features, t_features, embed_dim=None)
        assert close(cc(s_features, t_features), values["cc_on_features"])
    if isinstance(values["fsp"], list):
        for index, expected in enumerate(values["fsp"]):
            s, t = consecutive(s_features, index), consecutive(t_features, index)
            assert close(build_criterion("fsp", s, t)(s, t), expected), index
    else:
        assert "ValueError" in values["fsp"]
        with pytest.raises(ValueError, match="fsp needs equal channels"):
            build_criterion("fsp", s_features, t_features)


@pytest.mark.parametrize("pair", sorted(FIXTURE["pairs"]))
def test_parametric_methods_add_the_benchmarks_parameter_counts(pair, reference_pairs):
    added = FIXTURE["pairs"][pair]["trainable_parameters_added"]
    ((s_features, _), s_preact), ((t_features, _), t_preact) = reference_pairs[pair]

    def count(module):
        return sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert count(build_criterion("fitnet", s_features, t_features)) == \
        added["fitnet_regressor_hint_layer_2"]
    assert count(build_criterion("cc", s_features, t_features)) == added["cc_embeds_feat_dim_128"]
    assert count(build_criterion("vid", s_features, t_features)) == added["vid"]
    assert count(build_criterion("ab", s_preact, t_preact)) == added["ab_connectors"]
    ft = build_criterion("ft", s_features, t_features)
    assert count(ft.paraphraser) == added["ft_paraphraser"]
    assert count(ft.translator) == added["ft_translator"]


def tiny_pair(seed=0, channels=3):
    torch.manual_seed(seed)
    return (build_model("resnet8", 10, in_channels=channels),
            build_model("resnet8", 10, in_channels=channels))


def own_loss_key(method):
    return f"{method}_init" if method in TWO_STAGE_METHODS else method


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_lowers_its_own_loss(method, precision):
    student, teacher = tiny_pair()
    images = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(8) % 10
    distiller = build_distiller(method, student, teacher, example_images=images[:2])
    stage = distiller.init_stage() if method in TWO_STAGE_METHODS else distiller
    assert_steps_lower_the_loss(stage, images, labels, own_loss_key(method), precision)


def test_loss_weights_scale_the_method_and_kd_joins_on_request():
    student, teacher = tiny_pair()
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    for method in sorted(set(METHODS) - {"ab", "fsp"}):
        torch.manual_seed(1)
        default = build_distiller(method, copy.deepcopy(student), teacher,
                                  example_images=images[:2]).eval()
        torch.manual_seed(1)
        weighted = build_distiller(method, copy.deepcopy(student), teacher,
                                   example_images=images[:2], beta=2.0, lam=0.5).eval()
        _, plain = default(images, labels)
        _, both = weighted(images, labels)
        assert set(plain) == {"ce", method} and set(both) == {"ce", method, "kd"}
        assert both[method].item() == pytest.approx(
            plain[method].item() * 2.0 / DEFAULT_BETAS[method], rel=1e-5), method
        assert both["ce"].item() == pytest.approx(plain["ce"].item(), rel=1e-6)
    for method in ("ab", "fsp"):  # the main stage is CE alone: no beta to set
        assert set(build_distiller(method, student, teacher, example_images=images[:2])(
            images, labels)[1]) == {"ce"}
        with pytest.raises(ValueError, match=f"method '{method}' has no option beta"):
            build_distiller(method, student, teacher, example_images=images[:2], beta=1.0)
    with pytest.raises(ValueError, match="sizes its layers from example images"):
        build_distiller("at", student, teacher)


def test_ft_trains_the_translator_and_leaves_the_paraphraser_to_its_stage():
    student, teacher = tiny_pair()
    distiller = build_distiller("ft", student, teacher, example_images=torch.zeros(2, 3, 16, 16))
    trained = {id(p) for p in distiller.trainable_parameters()}
    assert all(id(p) in trained for p in distiller.criterion.translator.parameters())
    assert not any(id(p) in trained for p in distiller.criterion.paraphraser.parameters())
    assert not any(id(p) in trained for p in teacher.parameters())
    _, losses = distiller(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
    sum(losses.values()).backward()
    assert all(p.grad is None for p in distiller.criterion.paraphraser.parameters())
    assert any(p.grad is not None for p in distiller.criterion.translator.parameters())


def tiny_digits():
    train, test = digits_datasets(image_size=8)
    return stratified_subset(train, 0.06, 0), stratified_subset(test, 0.1, 0)


def digits_models(student_seed=0):
    torch.manual_seed(0)
    teacher = build_model("resnet8", NUM_CLASSES, in_channels=1)
    torch.manual_seed(student_seed)
    return build_model("resnet8", NUM_CLASSES, in_channels=1), teacher


def fit_two_stage(method, out_dir, init_epochs, seed=0, resume=False):
    train, test = tiny_digits()
    student, teacher = digits_models(seed)
    config = engine.LoopSettings(epochs=1, batch_size=16, seed=3, out_dir=out_dir)
    return train_model(method, student, teacher, train, test, config, 0.05, 5e-4,
                       lambda opt: None, resume=resume, init_epochs=init_epochs)


@pytest.mark.parametrize("method", TWO_STAGE_METHODS)
def test_two_stage_methods_run_both_stages(method, tmp_path):
    train, test = tiny_digits()
    student, teacher = digits_models()
    distiller = build_distiller(method, student, teacher, example_images=torch.zeros(2, 1, 8, 8))
    before = copy.deepcopy(distiller.state_dict())
    config = engine.LoopSettings(epochs=1, batch_size=16, seed=3, out_dir=tmp_path)
    history = train_init_stage(distiller, train, test, config, lr=0.05, weight_decay=5e-4,
                               epochs=1, resume=False)
    assert f"{method}_init" in history.rows[0] and (tmp_path / "init" / "last.pt").exists()
    after = distiller.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    classifier = {k for k in before if k.startswith("student.") and k.split(".")[-2] in
                  ("fc", "linear", "classifier")}
    teacher_keys = {k for k in before if k.startswith("teacher.")}
    assert not changed & (classifier | teacher_keys), changed & (classifier | teacher_keys)
    if method == "ft":  # the paraphraser alone learns in FT's first stage
        assert changed and all(k.startswith("criterion.paraphraser.") for k in changed)
    else:  # the student's feature layers (and AB's connectors)
        assert any(k.startswith("student.") for k in changed)
    _, main_history = fit_two_stage(method, tmp_path / "full", init_epochs=1)
    log = (tmp_path / "full" / "init" / "log.csv").read_text()
    assert f"{method}_init" in log.splitlines()[0]
    assert "ce" in main_history.rows[0] and (tmp_path / "full" / "best.pt").exists()


def test_two_stage_methods_resume_from_inside_the_initialisation_stage(tmp_path):
    torch.use_deterministic_algorithms(True)
    try:
        full, _ = fit_two_stage("ab", tmp_path / "full", init_epochs=2)
        # Interrupted after the first of two initialisation epochs ...
        train, test = tiny_digits()
        student, teacher = digits_models()
        distiller = build_distiller("ab", student, teacher,
                                    example_images=torch.zeros(2, 1, 8, 8))
        config = engine.LoopSettings(epochs=1, batch_size=16, seed=3, out_dir=tmp_path / "split")
        train_init_stage(distiller, train, test, config, 0.05, 5e-4, epochs=1, resume=False)
        assert len((tmp_path / "split" / "init" / "log.csv").read_text().splitlines()) == 2
        # ... then resumed by a process that starts from other weights and RNG state.
        resumed, _ = fit_two_stage("ab", tmp_path / "split", init_epochs=2, seed=7, resume=True)
    finally:
        torch.use_deterministic_algorithms(False)
    assert len((tmp_path / "split" / "init" / "log.csv").read_text().splitlines()) == 3
    for key, value in full.state_dict().items():
        assert torch.allclose(value.float(), resumed.state_dict()[key].float(), atol=1e-6), key


def test_negative_init_epochs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--init-epochs must be >= 0, got -1"):
        fit_two_stage("fsp", tmp_path, init_epochs=-1)


def test_a_two_stage_config_runs_from_one_command_and_reaches_the_table(tmp_path, no_md5, capsys):
    data, runs = tmp_path / "data", tmp_path / "runs"
    write_cifar100(data, n_train=32, n_test=16)
    command = ["run", "cifar100/resnet56-resnet20/fsp", "--data", str(data), "--runs", str(runs),
               "--epochs", "1", "--init-epochs", "1", "--batch-size", "16", "--device", "cpu"]
    assert main(command) == 0
    student_run = runs / "cifar100__resnet56-resnet20__fsp__seed0"
    assert (student_run / "init" / "last.pt").exists() and (student_run / "best.pt").exists()
    stamp = (student_run / "init" / "last.pt").stat().st_mtime_ns
    assert main(command) == 0  # both stages finished: nothing is trained again
    assert (student_run / "init" / "last.pt").stat().st_mtime_ns == stamp
    assert main(["run", "cifar100/resnet56-resnet20/fsp", "--runs", str(runs), "--data",
                 str(data), "--init-epochs", "-1", "--device", "cpu"]) == 2
    assert "--init-epochs must be >= 0" in capsys.readouterr().err
    assert main(["results", "--runs", str(runs)]) == 0
    rows = printed_table(capsys.readouterr().out, "cifar100-same-family")
    cell = rows["fsp"][rows["method"].index("resnet56 -> resnet20")]
    assert cell.endswith(" +- 0.00 (1) / 69.95") and not cell.startswith("not run"), cell


def test_fts_init_stage_lr_is_capped_for_cifar_resnet_and_wrn_students_only():
    # The benchmark's helper/pretrain.py: 0.01 for FT with ResNet/WRN students on CIFAR.
    assert init_stage_lr("ft", "resnet20", 0.05, "cifar100") == 0.01
    assert init_stage_lr("ft", "wrn_16_2", 0.05, "cifar100") == 0.01
    assert init_stage_lr("ft", "resnet8", 0.05, "digits") == 0.05
    assert init_stage_lr("ft", "ShuffleV1", 0.01, "cifar100") == 0.01
    assert init_stage_lr("ab", "resnet20", 0.05, "cifar100") == 0.05


def test_criteria_are_sized_on_the_models_device_whatever_the_example_batch():
    # A teacher already on the GPU meets example images from the data set (CPU); the meta
    # device stands in for the GPU here.
    teacher = build_model("resnet8", NUM_CLASSES, 1).to("meta")
    features = example_features(teacher, torch.zeros(2, 1, 16, 16), preact=False)
    assert [f.device.type for f in features] == ["meta"] * len(features)
    assert features[-1].shape == (2, 64)


def test_ddp_leaves_the_init_stages_frozen_teacher_buffers_out_of_its_broadcasts():
    student, teacher = build_model("resnet8", NUM_CLASSES, 1), build_model("resnet8", NUM_CLASSES, 1)
    distiller = build_distiller("fsp", student, teacher,
                                example_images=torch.zeros(2, 1, 16, 16))
    skipped = engine.buffers_not_broadcast(distiller.init_stage())
    teacher_buffers = [f"distiller.teacher.{n}" for n, _ in teacher.named_buffers()]
    assert teacher_buffers and sorted(skipped) == sorted(teacher_buffers)


# The CRD benchmark's get_feat_modules() per architecture (HobbitLong/RepDistiller,
# models/resnet.py, resnetv2.py, wrn.py, vgg.py, mobilenetv2.py, ShuffleNetv1.py,
# ShuffleNetv2.py): what its AB and FSP initialisation stages train, in train mode, while the
# rest of the student is in eval mode (helper/pretrain.py: model_s.eval(), init_modules.train()).
REFERENCE_FEATURE_MODULES = {
    "resnet20": ("conv1", "bn1", "relu", "layer1", "layer2", "layer3"),
    "resnet8x4": ("conv1", "bn1", "relu", "layer1", "layer2", "layer3"),
    "ResNet50": ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"),
    "wrn_16_2": ("conv1", "block1", "block2", "block3"),
    "vgg8": ("block0", "pool0", "block1", "pool1", "block2", "pool2", "block3", "pool3",
             "block4", "pool4"),
    "MobileNetV2": ("conv1", "blocks"),
    "ShuffleV1": ("conv1", "bn1", "layer1", "layer2", "layer3"),
    "ShuffleV2": ("conv1", "bn1", "layer1", "layer2", "layer3"),
}


def under(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("method", ["ab", "fsp"])
@pytest.mark.parametrize("student_name", sorted(REFERENCE_FEATURE_MODULES))
def test_init_stage_trains_what_the_reference_trains_with_the_rest_in_eval_mode(
        method, student_name):
    torch.manual_seed(0)
    student, teacher = build_model(student_name, 100), build_model(student_name, 100)
    distiller = build_distiller(method, student, teacher, example_images=torch.zeros(2, 3, 32, 32))
    stage = distiller.init_stage()
    stage.train()
    reference = REFERENCE_FEATURE_MODULES[student_name]
    trained = {id(p) for p in stage.trainable_parameters()}
    for name, p in student.named_parameters():
        assert (id(p) in trained) == under(name, reference), name
    for name, module in student.named_modules():  # every module that holds state
        holds_state = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if name and holds_state:
            assert module.training == under(name, reference), name
    assert not any(m.training for m in teacher.modules())
    if method == "ab":  # the connectors train too, in train mode
        assert all(id(p) in trained for p in distiller.criterion.parameters())
        assert all(m.training for m in distiller.criterion.modules())
    assert len(trained) == len(stage.trainable_parameters())
    stage.eval()
    assert not any(m.training for m in distiller.modules())


def test_wrn_students_final_bn_stays_frozen_in_the_ab_init_stage():
    """The issue's case: wrn_40_2 -> wrn_16_2, AB's initialisation stage normalised with and
    trained the student's final bn1, which the reference keeps in eval mode, out of the
    optimiser; one step of the stage leaves it untouched and its loss is the loss of the
    student in eval mode but for the feature modules."""
    torch.manual_seed(0)
    student, teacher = build_model("wrn_16_2", 100), build_model("wrn_40_2", 100)
    distiller = build_distiller("ab", student, teacher, example_images=torch.zeros(2, 3, 32, 32))
    stage = distiller.init_stage()
    images = torch.randn(8, 3, 32, 32)
    bn1 = copy.deepcopy(student.bn1.state_dict())
    block_bn = student.block1.layer[0].bn1.running_mean.clone()

    expected_student = copy.deepcopy(student).eval()
    for name in REFERENCE_FEATURE_MODULES["wrn_16_2"]:
        getattr(expected_student, name).train()
    criterion = copy.deepcopy(distiller.criterion).train()
    with torch.no_grad():
        t_points, _ = feature_points(teacher.eval(), images, preact=True)
        s_points, _ = feature_points(expected_student, images, preact=True)
        expected = criterion(s_points, t_points)

    stage.train()
    optimizer = torch.optim.SGD(stage.trainable_parameters(), lr=0.1, momentum=0.9)
    _, losses = stage(images, torch.zeros(8, dtype=torch.long))
    assert torch.allclose(losses["ab_init"], expected, rtol=1e-5)
    optimizer.zero_grad()
    losses["ab_init"].backward()
    optimizer.step()
    for key, value in student.bn1.state_dict().items():
        assert torch.equal(value, bn1[key]), key
    assert not torch.equal(student.block1.layer[0].bn1.running_mean, block_bn)
    assert all(id(p) not in {id(q) for q in stage.trainable_parameters()}
               for p in student.bn1.parameters())
