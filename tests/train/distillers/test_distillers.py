"""The methods' registry and distillers: each lowers its loss on a small problem, ICD trains
theta with a frozen teacher, CRD's banks, the loss weights, and every table pair's and ImageNet
config's step."""
import copy
import math

import pytest
import torch

from train.configs import CONFIGS, get_config
from train.data.digits import NUM_CLASSES
from train.distillers import DISTILLERS, build_distiller
from train.distillers.crd import CRD
from train.distillers.feature_methods import DEFAULT_BETAS
from train.models import build_model

from helpers import fit_briefly, make_distiller, tiny_problem


@pytest.mark.parametrize("method", sorted(set(DISTILLERS) - set(DEFAULT_BETAS)))
def test_short_distillation_lowers_the_loss(method, trained_teacher):
    # (CRD's term first rises while its memory bank, initialised at random, catches up with
    # the embeddings; over eight epochs every method's loss ends well below where it began.)
    train, test = tiny_problem()
    history = fit_briefly(make_distiller(method, teacher=copy.deepcopy(trained_teacher)), train, test,
                  epochs=8)
    losses = [r["loss"] for r in history.rows]
    assert losses[-1] < 0.85 * losses[0], losses
    assert all(math.isfinite(v) for v in losses)


def test_icd_trains_theta_and_keeps_the_teacher_frozen():
    train, test = tiny_problem()
    distiller = make_distiller("icd_kd")
    theta0 = distiller.criterion.log_scale.item()
    teacher0 = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    history = fit_briefly(distiller, train, test, epochs=2)
    assert distiller.criterion.log_scale.item() != theta0
    for k, v in distiller.teacher.state_dict().items():
        assert torch.equal(v, teacher0[k]), k  # weights and batch-norm statistics
    assert {"ce", "kd", "icd", "loss"} <= set(history.rows[-1])


def test_a_method_that_needs_a_teacher_says_so():
    with pytest.raises(ValueError, match="needs a teacher"):
        build_distiller("icd", build_model("resnet8", 10), None)
    with pytest.raises(ValueError, match="unknown method 'crd2'"):
        build_distiller("crd2", build_model("resnet8", 10), None)


def test_crd_memory_banks_follow_the_embeddings(trained_teacher):
    train, test = tiny_problem()
    distiller = make_distiller("crd", teacher=copy.deepcopy(trained_teacher))
    bank0 = distiller.memory_t.clone()
    history = fit_briefly(distiller, train, test, epochs=2)
    assert "crd" in history.rows[-1]
    changed = (distiller.memory_t - bank0).abs().sum(dim=1) > 0
    assert changed.float().mean() > 0.8  # drop_last leaves a few samples unseen
    norms = distiller.memory_t[changed].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    with pytest.raises(ValueError, match="num_samples"):
        build_distiller("crd", build_model("resnet8", 10), build_model("resnet8", 10))


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


IMAGENET_CONFIGS = sorted(name for name, c in CONFIGS.items()
                          if c.table == "imagenet" and c.method in DISTILLERS)


@pytest.fixture(scope="module")
def imagenet_models():
    """One set of weights per ImageNet architecture (built once: the ResNet-50 is large),
    copied for each config."""
    torch.manual_seed(0)
    names = {n for c in CONFIGS.values() if c.table == "imagenet" for n in (c.teacher, c.student)}
    return {name: build_model(name, 10) for name in names}


@pytest.mark.parametrize("pair", sorted({(c.teacher, c.student, c.dataset)
                                         for c in CONFIGS.values()}), ids=str)
def test_every_table_pair_takes_an_icd_kd_step(pair):
    from train.distillers import build_distiller

    teacher_name, student_name, dataset = pair
    classes, size = (100, 32) if dataset == "cifar100" else (1000, 64)
    torch.manual_seed(0)
    distiller = build_distiller("icd_kd", build_model(student_name, classes),
                                build_model(teacher_name, classes))
    distiller.train()
    logits, losses = distiller(torch.randn(4, 3, size, size), torch.randint(0, classes, (4,)))
    assert logits.shape == (4, classes) and set(losses) == {"ce", "kd", "icd"}
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert distiller.criterion.log_scale.grad is not None
    assert all(p.grad is None for p in distiller.teacher.parameters())


@pytest.mark.parametrize("name", IMAGENET_CONFIGS)
def test_every_imagenet_config_builds_its_distiller_and_takes_a_step(name, imagenet_models):
    """Table 3's methods on torchvision's ResNets and MobileNet V1 (feature points: the stem,
    the four stages, the pooled feature), on small inputs: both stages of the two-stage
    methods, and the student learns from each."""
    import copy

    from train.distillers import build_distiller

    config = get_config(name)
    student = copy.deepcopy(imagenet_models[config.student])
    teacher = copy.deepcopy(imagenet_models[config.teacher])
    samples = 16
    labels = torch.arange(samples) % 10
    distiller = build_distiller(config.method, student,
                                None if config.method == "vanilla" else teacher,
                                num_samples=samples, labels=labels,
                                example_images=torch.zeros(2, 3, 64, 64))
    torch.manual_seed(1)
    images, indices = torch.randn(4, 3, 64, 64), torch.tensor([0, 5, 10, 15])
    stages = [distiller.init_stage(), distiller]
    for stage in [s for s in stages if s is not None]:
        stage.train()
        params = (stage.trainable_parameters() if hasattr(stage, "trainable_parameters")
                  else [p for p in stage.parameters() if p.requires_grad])
        before = [p.detach().clone() for p in params]
        optimizer = torch.optim.SGD(params, lr=0.01)
        logits, losses = stage(images, labels[indices], indices)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        assert any(not torch.equal(b, p) for b, p in zip(before, params)), name
        if logits is not None:
            assert logits.shape == (4, 10)
    assert all(p.grad is None for p in teacher.parameters())
