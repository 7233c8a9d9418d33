"""The CIFAR zoo against the CRD benchmark's definitions (fixtures/cifar_zoo.json,
methods.json), feature points of every model, MobileNet V1, penultimate features before
dropout."""
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from train.models import CIFAR_MODELS, FeatureTap, build_model, classifier_layer, feature_points

from helpers import cifar_zoo, logits_input, methods, methods_input, reference_model

ZOO = sorted(cifar_zoo())


@lru_cache(maxsize=None)
def reference_points(name: str, preact: bool = False, batch: str = "logits"):
    """feature_points of the fixture model on the fixture's input (computed once: the
    machine is small)."""
    images = logits_input() if batch == "logits" else methods_input()
    with torch.no_grad():
        return feature_points(reference_model(name), images, preact=preact)


def test_fixture_and_zoo_name_the_same_22_models():
    assert len(ZOO) == 22 and set(ZOO) == set(CIFAR_MODELS)


@pytest.mark.parametrize("name", ZOO)
def test_state_dict_keys_shapes_and_parameter_count_are_the_references(name):
    record = cifar_zoo()[name]
    state = build_model(name, 100).state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == dict(
        (k, shape) for k, shape in record["state_dict"])
    model = build_model(name, 100)
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]


@pytest.mark.parametrize("name", ZOO)
def test_logits_of_the_reference_weights(name):
    model = reference_model(name)  # loads with strict=True
    with torch.no_grad():
        logits = model(logits_input())
    expected = torch.tensor(cifar_zoo()[name]["logits"], dtype=torch.float64)
    assert logits.shape == expected.shape
    error = ((logits - expected).abs().max() / expected.abs().max()).item()
    assert error <= 1e-10, f"{name}: max relative logit error {error:.2e}"


@pytest.mark.parametrize("name", ZOO + ["mobilenet_v1"])
def test_other_input_sizes_and_one_channel_run(name):
    # The digits demo: 1 channel, 16x16 (the reference networks pool 32x32 with fixed windows).
    model = build_model(name, 10, in_channels=1).eval()
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        features, logits = feature_points(model, images)
    assert logits.shape == (2, 10)
    assert features[-1].shape == (2, classifier_layer(model).in_features)


def _shapes(stem, stages, pooled, batch=2):
    return [(batch, *stem)] + [(batch, *s) for s in stages] + [(batch, pooled)]


def _resnet(w):
    return _shapes((w[0], 32, 32), [(w[1], 32, 32), (w[2], 16, 16), (w[3], 8, 8)], w[3])


def _wrn(k):
    return _shapes((16, 32, 32), [(16 * k, 32, 32), (32 * k, 16, 16), (64 * k, 8, 8)], 64 * k)


VGG_POINTS = _shapes((64, 32, 32), [(128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)], 512)
# Feature points at 32x32 as the reference networks produce them, written from the
# architectures (stride of each stage, channels), not from the code under test.
EXPECTED_POINTS = {
    **{f"resnet{d}": _resnet((16, 16, 32, 64)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _resnet((32, 64, 128, 256)), "resnet32x4": _resnet((32, 64, 128, 256)),
    "ResNet50": _shapes((64, 32, 32), [(256, 32, 32), (512, 16, 16), (1024, 8, 8),
                                       (2048, 4, 4)], 2048),
    "wrn_16_1": _wrn(1), "wrn_40_1": _wrn(1), "wrn_16_2": _wrn(2), "wrn_40_2": _wrn(2),
    **{f"vgg{d}": VGG_POINTS for d in (8, 11, 13, 16, 19)},
    "MobileNetV2": _shapes((16, 16, 16), [(12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)],
                           1280),
    "ShuffleV1": _shapes((24, 32, 32), [(240, 16, 16), (480, 8, 8), (960, 4, 4)], 960),
    "ShuffleV2": _shapes((24, 32, 32), [(116, 16, 16), (232, 8, 8), (464, 4, 4)], 1024),
}


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("preact", [False, True])
def test_feature_points_of_every_cifar_model(name, preact):
    model = reference_model(name)
    features, logits = reference_points(name, preact)
    assert [tuple(f.shape) for f in features] == EXPECTED_POINTS[name]
    # The hooks change nothing: the fixture's logits.
    expected = torch.tensor(cifar_zoo()[name]["logits"], dtype=torch.float64)
    assert ((logits - expected).abs().max() / expected.abs().max()).item() <= 1e-10
    # The last point is the classifier's input.
    torch.testing.assert_close(classifier_layer(model)(features[-1]), logits, rtol=0, atol=1e-12)
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("pair", sorted(methods()["pairs"]))
def test_feature_shapes_of_the_methods_fixture_pairs(pair):
    teacher_name, student_name = pair.split(":")
    record = methods()["pairs"][pair]
    for name, key in ((teacher_name, "teacher_features"), (student_name, "student_features")):
        features, _ = reference_points(name, batch="methods")
        assert [list(f.shape) for f in features] == record[key], name


def _attention(f):
    return F.normalize(f.pow(2).mean(1).flatten(1))


@pytest.mark.parametrize("pair", sorted(methods()["pairs"]))
def test_feature_values_give_the_fixture_attention_transfer_values(pair):
    """The points' values, not only their shapes, are the reference's: attention transfer
    (p = 2, written out here) on them reproduces the recorded values."""
    teacher_name, student_name = pair.split(":")
    teacher, _ = reference_points(teacher_name, batch="methods")
    student, _ = reference_points(student_name, batch="methods")
    values = []
    for s, t in zip(student[1:-1], teacher[1:-1]):
        size = min(s.shape[2], t.shape[2])
        s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
        values.append((_attention(s) - _attention(t)).pow(2).mean().item())
    assert values == pytest.approx(methods()["pairs"][pair]["criterion_values"]["at"], rel=1e-8)


CHANNEL_SHUFFLE_2 = staticmethod(lambda x: x.view(x.shape[0], 2, x.shape[1] // 2,
                                                  *x.shape[2:]).transpose(1, 2).flatten(1, 2))


@pytest.mark.parametrize("name", ["resnet8", "resnet8x4", "ResNet50", "vgg8", "ShuffleV1",
                                  "ShuffleV2", "MobileNetV2", "wrn_16_2"])
def test_preact_points_are_the_stage_outputs_before_their_relu(name):
    model = reference_model(name)
    plain, _ = reference_points(name)
    preact, _ = reference_points(name, preact=True)
    assert torch.equal(plain[0], preact[0]) and torch.equal(plain[-1], preact[-1])
    for stage, (p, q) in enumerate(zip(plain[1:-1], preact[1:-1])):
        if name == "MobileNetV2":  # linear bottlenecks: no ReLU ends a stage
            assert torch.equal(p, q)
        elif name == "ShuffleV2":  # the reference's pre-activation is taken before the shuffle
            assert (q < 0).any()
            assert torch.equal(CHANNEL_SHUFFLE_2(F.relu(q)), p)
        elif name == "wrn_16_2":
            # Pre-activation network: the point is the stage's sum after the batch norm that
            # the next stage (or the head) applies before its ReLU.
            norm = ([model.block2.layer[0].bn1, model.block3.layer[0].bn1, model.bn1])[stage]
            expected = F.batch_norm(p, norm.running_mean, norm.running_var, norm.weight,
                                    norm.bias, False, 0.0, norm.eps)
            torch.testing.assert_close(q, expected, rtol=0, atol=1e-12)
        else:
            assert (q < 0).any(), "a pre-activation has negative values"
            assert torch.equal(F.relu(q), p)
    if name == "wrn_16_2":  # the head pools the last pre-activation after its ReLU
        torch.testing.assert_close(F.relu(preact[-2]).mean((2, 3)), plain[-1], rtol=0,
                                   atol=1e-12)


# One model per kind of tap: module outputs, classifier inputs, a transform (VGG), a final
# ReLU's input, the ShuffleV2 pre-activation join, torchvision's cloned in-place ReLU input.
@pytest.mark.parametrize("name", ["resnet8", "wrn_16_2", "vgg8", "ShuffleV2", "tv_resnet18",
                                  "mobilenet_v1"])
@pytest.mark.parametrize("preact", [False, True])
def test_gradients_flow_through_every_feature_point(name, preact):
    torch.manual_seed(0)
    model = build_model(name, 10).train()
    first_conv = next(p for p in model.parameters() if p.dim() == 4)
    features, logits = feature_points(model, torch.randn(2, 3, 16, 16), preact=preact)
    for index, feature in enumerate(features):
        (grad,) = torch.autograd.grad(feature.square().sum(), [first_conv], retain_graph=True)
        assert grad.abs().sum() > 0, index


TORCHVISION_POINTS = {
    # name, input size: stem (after its ReLU, before max pooling), stages, pooled
    ("tv_resnet18", 64): _shapes((64, 32, 32), [(64, 16, 16), (128, 8, 8), (256, 4, 4),
                                                (512, 2, 2)], 512),
    ("tv_resnet50", 64): _shapes((64, 32, 32), [(256, 16, 16), (512, 8, 8), (1024, 4, 4),
                                                (2048, 2, 2)], 2048),
    ("tv_mobilenet_v2", 64): _shapes((32, 32, 32), [(24, 16, 16), (32, 8, 8), (96, 4, 4),
                                                    (320, 2, 2)], 1280),
    ("mobilenet_v1", 224): _shapes((32, 112, 112), [(128, 56, 56), (256, 28, 28),
                                                    (512, 14, 14), (1024, 7, 7)], 1024, 1),
}


@pytest.mark.parametrize("name,size", sorted(TORCHVISION_POINTS))
def test_imagenet_models_have_stem_stage_and_pooled_points(name, size):
    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    expected = TORCHVISION_POINTS[(name, size)]
    images = torch.randn(expected[0][0], 3, size, size)
    with torch.no_grad():
        plain, logits = feature_points(model, images)
        preact, _ = feature_points(model, images, preact=True)
    assert [tuple(f.shape) for f in plain] == expected
    assert [tuple(f.shape) for f in preact] == expected
    torch.testing.assert_close(classifier_layer(model)(plain[-1]), logits)
    for p, q in zip(plain[1:-1], preact[1:-1]):
        if name == "tv_mobilenet_v2":  # linear bottlenecks
            assert torch.equal(p, q)
        else:
            assert (q < 0).any() and torch.equal(F.relu(q), p)


def test_mobilenet_v1_is_the_literatures_4_2m_parameter_network():
    # Stem 3x3x3x32 + BN; 13 depthwise-separable blocks (3x3 depthwise + BN, 1x1 + BN);
    # a 1024 -> 1000 classifier: 4,231,976 parameters.
    model = build_model("mobilenet_v1", 1000)
    assert sum(p.numel() for p in model.parameters()) == 4_231_976
    keys = list(model.state_dict())
    assert keys[0] == "model.0.0.weight" and keys[-2:] == ["fc.weight", "fc.bias"]


def test_feature_points_refuses_a_model_without_known_points_and_bad_images():
    with pytest.raises(ValueError, match="no feature points are known for Sequential"):
        feature_points(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\), got \(3, 32, 32\)"):
        feature_points(build_model("resnet8", 10), torch.randn(3, 32, 32))


def _train_mode_without_batch_statistics(model):
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()  # only dropout stays random
    return model


def test_penultimate_feature_of_tv_mobilenet_v2_is_taken_before_dropout():
    torch.manual_seed(0)
    model = _train_mode_without_batch_statistics(build_model("tv_mobilenet_v2", 10))
    images = torch.randn(4, 3, 32, 32)
    tap = FeatureTap(model)
    model(images)
    first = tap.features
    model(images)
    with torch.no_grad():
        pooled = F.adaptive_avg_pool2d(model.features(images), 1).flatten(1)
    assert torch.equal(first, tap.features)
    torch.testing.assert_close(first, pooled)
    assert tap.dim == 1280
    tap.remove()


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0"])
def test_penultimate_feature_of_other_torchvision_classifiers_is_taken_before_dropout(name):
    # Dropout sits inside their classifiers (MobileNetV3: Linear, Hardswish, Dropout, Linear;
    # EfficientNet: Dropout, Linear); stochastic depth off so that only dropout is random.
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    model = _train_mode_without_batch_statistics(model)
    for m in model.modules():
        if isinstance(m, torchvision.ops.StochasticDepth):
            m.p = 0.0
    images = torch.randn(2, 3, 32, 32)
    tap = FeatureTap(model)
    model(images)
    first = tap.features
    model(images)
    # Equal up to the convolutions' run-to-run rounding (the features are small at
    # initialisation, hence the relative scale); dropout would zero a fifth of the entries
    # (these classifiers' dropout is in place, so the tap must keep its own copy).
    assert (first != 0).all() and (tap.features != 0).all()
    scale = first.abs().max()
    torch.testing.assert_close(first / scale, tap.features / scale)
    tap.remove()


def test_penultimate_feature_skips_the_dropout_run_before_any_final_linear():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Dropout(0.5),
                         nn.Linear(8, 3))
    model = nn.Sequential(nn.Flatten(), head).train()
    tap = FeatureTap(model)
    x = torch.randn(5, 6)
    model(x)
    torch.testing.assert_close(tap.features, F.relu(head[0](x)))
    assert tap.dim == 8


def test_vgg_pools_a_fourth_time_from_64x64_inputs_as_the_reference_does():
    # The reference runs block 4 at block 3's resolution for 32x32 (4x4, EXPECTED_POINTS)
    # and at half of it for 64x64 (Tiny-ImageNet): 8x8 then 4x4.
    model = build_model("vgg8", 10).eval()
    with torch.no_grad():
        features, _ = feature_points(model, torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in features[1:-1]] == [(128, 32, 32), (256, 16, 16),
                                                             (512, 8, 8), (512, 4, 4)]


def test_feature_points_look_through_a_data_parallel_wrapper():
    torch.manual_seed(0)
    model = build_model("resnet8", 10).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        wrapped, wrapped_logits = feature_points(nn.DataParallel(model), images)
        plain, logits = feature_points(model, images)
    assert torch.equal(wrapped_logits, logits)
    assert all(torch.equal(a, b) for a, b in zip(wrapped, plain))
