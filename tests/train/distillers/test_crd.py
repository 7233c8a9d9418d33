"""CRD as the CRD benchmark (HobbitLong/RepDistiller) trains it: class-aware negatives
(CIFAR100InstanceSample), K = 16384, modes "exact"/"relax", the NCE criterion, crd_kd, the
labels read without decoding images, and draws that survive a resume."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from train import engine
from train.data.digits import NUM_CLASSES, digits_datasets, stratified_subset
from train.data.labels import dataset_labels
from train.distillers import build_distiller
from train.distillers.class_negatives import ClassAwareNegatives
from train.distillers.crd import CRD
from train.training import train_model

# The benchmark's nce_k (RepDistiller train_student.py, --nce_k default).
BENCHMARK_NCE_K = 16384
# Upper 0.1% points of the chi-square distribution (statistical tables; e.g. scipy's
# chi2.ppf(0.999, df)), by degrees of freedom.
CHI2_999 = {4: 18.467, 19: 43.820, 39: 72.055, 51: 87.968}

CLASS_SIZES = (4, 6, 8, 10, 12, 20)  # 60 samples; the last class's pool is 40 samples
BIG_CLASS = 5


def tiny_labels():
    labels = torch.repeat_interleave(torch.arange(len(CLASS_SIZES)), torch.tensor(CLASS_SIZES))
    # Shuffled, so that the classes are not stored in blocks.
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(7))]


def pearson(observed: torch.Tensor, expected: torch.Tensor) -> float:
    observed, expected = observed.double(), expected.double()
    return float(((observed - expected) ** 2 / expected).sum())


def small_net(width, inputs=64):
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, width), nn.ReLU(),
                         nn.Linear(width, NUM_CLASSES))


def test_negatives_are_distinct_valid_samples_of_other_classes():
    labels = tiny_labels()
    sampler = ClassAwareNegatives(labels, num_negatives=20)  # <= every pool (>= 40)
    torch.manual_seed(0)
    anchors = torch.arange(len(labels))
    rows = sampler(anchors)
    assert rows.shape == (60, 21) and rows.dtype == torch.long
    assert torch.equal(rows[:, 0], anchors)  # mode "exact": the positive is the sample
    negatives = rows[:, 1:]
    assert bool(((negatives >= 0) & (negatives < 60)).all())
    assert not bool((labels[negatives] == labels[anchors].unsqueeze(1)).any())
    ordered = negatives.sort(dim=1).values
    assert bool((ordered[:, 1:] != ordered[:, :-1]).all())  # without replacement


def test_k_beyond_a_pool_draws_with_replacement_as_the_benchmark_does():
    labels = tiny_labels()
    # Pools: 60 minus the class size = 56, 54, 52, 50, 48 and 40: K = 53 exceeds those of
    # classes 2 to 5 (drawn with replacement), not those of classes 0 and 1.
    sampler = ClassAwareNegatives(labels, num_negatives=53)
    torch.manual_seed(1)
    anchors = torch.arange(60).repeat(20)
    rows = sampler(anchors)
    negatives = rows[:, 1:]
    assert bool(((negatives >= 0) & (negatives < 60)).all())
    assert not bool((labels[negatives] == labels[anchors].unsqueeze(1)).any())
    ordered = negatives.sort(dim=1).values
    repeats = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
    beyond = labels[anchors] >= 2
    assert bool(repeats[beyond].all())  # 53 draws from at most 52 samples repeat one
    assert not bool(repeats[~beyond].any())
    for c in range(len(CLASS_SIZES)):  # drawn from the whole pool: every sample shows up
        pool = (labels != c).nonzero().flatten()
        drawn = negatives[labels[anchors] == c].flatten()
        assert set(drawn.tolist()) == set(pool.tolist()), c


# (anchor class, K, anchors per sample of that class): K = 10 is drawn without replacement,
# K = 60 exceeds the pools of 40 (class 5) and 52 (class 2) and is drawn with replacement.
UNIFORMITY_CASES = [(5, 10, 100), (5, 60, 25), (2, 60, 60)]


@pytest.mark.parametrize("anchor_class, num_negatives, anchors_per_sample", UNIFORMITY_CASES)
def test_negatives_are_uniform_over_the_other_classes(anchor_class, num_negatives,
                                                      anchors_per_sample):
    # Per sample of the pool and per class, Pearson's statistic stays below the 0.1% point
    # of its chi-square distribution (conservative without replacement, whose counts vary
    # less than multinomial ones).
    labels = tiny_labels()
    sampler = ClassAwareNegatives(labels, num_negatives=num_negatives)
    torch.manual_seed(2)
    anchors = (labels == anchor_class).nonzero().flatten().repeat(anchors_per_sample)
    draws = anchors.numel() * num_negatives
    counts = torch.bincount(sampler(anchors)[:, 1:].flatten(), minlength=60)
    pool = labels != anchor_class
    pool_size = 60 - CLASS_SIZES[anchor_class]
    assert int(counts[~pool].sum()) == 0
    per_sample = torch.full((pool_size,), draws / pool_size)
    assert pearson(counts[pool], per_sample) < CHI2_999[pool_size - 1]
    others = [c for c in range(len(CLASS_SIZES)) if c != anchor_class]
    per_class = torch.stack([counts[labels == c].sum() for c in others])
    expected = torch.tensor([CLASS_SIZES[c] for c in others], dtype=torch.float64)
    assert pearson(per_class, expected * draws / pool_size) < CHI2_999[len(others) - 1]


def test_relax_mode_draws_the_positive_uniformly_from_the_anchors_class():
    labels = tiny_labels()
    sampler = ClassAwareNegatives(labels, num_negatives=8, mode="relax")
    torch.manual_seed(3)
    anchors = torch.arange(60).repeat(50)
    rows = sampler(anchors)
    assert torch.equal(labels[rows[:, 0]], labels[anchors])
    assert not bool((labels[rows[:, 1:]] == labels[anchors].unsqueeze(1)).any())
    big = labels[anchors] == BIG_CLASS  # 1000 anchors of a class of 20 samples
    counts = torch.bincount(rows[big, 0], minlength=60)[labels == BIG_CLASS]
    assert pearson(counts, torch.full((20,), 1000 / 20)) < CHI2_999[19]


def test_k_defaults_to_the_benchmarks_16384():
    labels = tiny_labels()
    torch.manual_seed(4)
    distiller = build_distiller("crd", small_net(8), small_net(16), num_samples=60,
                                labels=labels)
    assert distiller.num_negatives == BENCHMARK_NCE_K
    assert distiller.negatives.mode == "exact"
    rows = distiller.negatives(torch.tensor([0, 17, 59]))
    # Every pool here is smaller than K: drawn with replacement, K of them all the same.
    assert rows.shape == (3, BENCHMARK_NCE_K + 1)
    assert not bool((labels[rows[:, 1:]] == labels[rows[:, :1]]).any())


class Unlabelled(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.zeros(64), 0


class TargetsOnly(Dataset):
    """Labels in `targets`, images that must not be decoded to read them."""

    def __init__(self, targets):
        self.targets = targets

    def __len__(self):
        return 5

    def __getitem__(self, i):
        raise AssertionError("the labels were read by decoding a sample")


def test_labels_are_read_without_decoding_the_samples():
    assert dataset_labels(TargetsOnly([3, 1, 4, 1, 5])).tolist() == [3, 1, 4, 1, 5]
    tensors = TensorDataset(torch.zeros(6, 2), torch.tensor([9, 8, 7, 6, 5, 4]))
    assert dataset_labels(Subset(tensors, [5, 0, 2])).tolist() == [4, 9, 7]
    both = ConcatDataset([Subset(TargetsOnly([3, 1, 4, 1, 5]), [4, 1]), tensors])
    assert dataset_labels(both).tolist() == [5, 1, 9, 8, 7, 6, 5, 4]
    assert dataset_labels(both).dtype == torch.long


def test_missing_or_bad_labels_get_clear_errors():
    with pytest.raises(ValueError, match="cannot read the labels of a Unlabelled"):
        dataset_labels(Unlabelled())
    with pytest.raises(ValueError, match="5 samples but 3 labels"):
        dataset_labels(TargetsOnly([1, 2, 3]))
    with pytest.raises(ValueError, match="sample 2 .* label -1"):  # STL-10's unlabelled split
        dataset_labels(TargetsOnly([1, 2, -1, 0, 0]))
    with pytest.raises(ValueError, match="integers"):
        dataset_labels(TargetsOnly([0.5, 1.0, 2.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="at least two classes"):
        ClassAwareNegatives(torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="mode must be one of"):
        ClassAwareNegatives(tiny_labels(), mode="fuzzy")
    with pytest.raises(ValueError, match="positive integer"):
        ClassAwareNegatives(tiny_labels(), num_negatives=0)
    sampler = ClassAwareNegatives(tiny_labels(), num_negatives=4)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 60\)"):
        sampler(torch.tensor([3, 60]))
    with pytest.raises(ValueError, match="labels differ"):
        sampler(torch.tensor([0, 1]), labels=tiny_labels()[:2] + 1)
    with pytest.raises(ValueError, match="crd needs the training set's labels"):
        build_distiller("crd", small_net(8), small_net(16), num_samples=60)
    with pytest.raises(ValueError, match="3 labels for a training set of 60"):
        build_distiller("crd", small_net(8), small_net(16), num_samples=60,
                        labels=torch.tensor([0, 1, 2]))


def test_training_crd_on_a_data_set_without_labels_says_so():
    config = engine.LoopSettings(epochs=1, batch_size=2)
    with pytest.raises(ValueError, match="cannot read the labels of a Unlabelled"):
        train_model("crd", small_net(8), small_net(16), Unlabelled(), Unlabelled(), config,
                    0.1, 0.0, lambda opt: None)


def reference_nce(memory, anchor, rows, num_samples):
    """The benchmark's ContrastMemory scores and ContrastLoss (Eq. 18), written out: Z from
    this batch (the first), P_n = 1 / n_data, m = K."""
    scores = torch.exp(torch.einsum("bkd,bd->bk", memory[rows], anchor) / 0.07)
    scores = scores / (scores.mean() * num_samples)
    noise = (rows.shape[1] - 1) / num_samples
    positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + 1e-7))
    negative = torch.log(noise / (scores[:, 1:] + noise + 1e-7))
    return -(positive.sum() + negative.sum()) / rows.shape[0]


def test_crd_kd_is_ce_plus_kd_plus_0_8_crd():
    labels = tiny_labels()
    torch.manual_seed(5)
    teacher = small_net(16)
    images, batch = torch.randn(12, 1, 8, 8), torch.arange(0, 60, 5)
    losses = {}
    for method in ("crd", "crd_kd"):
        torch.manual_seed(6)
        distiller = build_distiller(method, small_net(8), copy.deepcopy(teacher),
                                    num_samples=60, labels=labels, num_negatives=30)
        memory_s, memory_t = distiller.memory_s.clone(), distiller.memory_t.clone()
        drawn = []
        distiller.negatives.register_forward_hook(lambda m, i, out: drawn.append(out))
        logits, losses[method] = distiller(images, labels[batch], batch)
    with torch.no_grad():
        v_s = F.normalize(distiller.embed_s(distiller.student_tap.features), dim=1)
        v_t = F.normalize(distiller.embed_t(teacher[:-1](images)), dim=1)
        t_logits = teacher(images)
    rows = drawn[0]
    crd = reference_nce(memory_s, v_t, rows, 60) + reference_nce(memory_t, v_s, rows, 60)
    kd = (F.softmax(t_logits / 4, 1) * (F.log_softmax(t_logits / 4, 1)
                                         - F.log_softmax(logits / 4, 1))).sum(1).mean() * 16
    assert set(losses["crd"]) == {"ce", "crd"}
    assert set(losses["crd_kd"]) == {"ce", "kd", "crd"}
    assert losses["crd_kd"]["crd"].item() == pytest.approx(0.8 * crd.item(), rel=1e-5)
    assert losses["crd"]["crd"].item() == pytest.approx(0.8 * crd.item(), rel=1e-5)
    assert losses["crd_kd"]["kd"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert losses["crd_kd"]["ce"].item() == pytest.approx(
        F.cross_entropy(logits, labels[batch]).item(), rel=1e-6)


@pytest.mark.parametrize("rows_per_draw", [2, 200])  # the full product, the gathered rows
def test_both_ways_to_the_scores_give_the_drawn_dot_products(rows_per_draw):
    torch.manual_seed(8)
    draws = 5
    memory = torch.randn(draws * rows_per_draw, 16)
    indices = torch.randint(0, memory.shape[0], (6, draws))
    anchor = torch.randn(6, 16, requires_grad=True)
    products = CRD._dot_products(memory, anchor, indices)
    expected = (memory[indices] * anchor.detach().unsqueeze(1)).sum(2)
    assert torch.allclose(products, expected, atol=1e-5)
    weights = torch.randn(6, draws)
    (products * weights).sum().backward()
    assert torch.allclose(anchor.grad, (weights.unsqueeze(2) * memory[indices]).sum(1),
                          atol=1e-5)


def crd_run(train, test, epochs, out_dir, resume, seed):
    torch.manual_seed(0)
    teacher = small_net(16)  # the same teacher in every process (a resume checks it is)
    torch.manual_seed(seed)
    distiller = build_distiller("crd", small_net(8), teacher, num_samples=len(train),
                                labels=dataset_labels(train), num_negatives=64)
    drawn = []
    distiller.negatives.register_forward_hook(lambda m, i, out: drawn.append(out.clone()))
    params = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    config = engine.LoopSettings(epochs=epochs, batch_size=32, seed=3, out_dir=out_dir)
    engine.fit(distiller, train, test, optimizer, None, config, resume=resume)
    return distiller, drawn


def test_a_resumed_run_draws_the_negatives_of_an_uninterrupted_one(tmp_path):
    train, test = digits_datasets(image_size=8)
    train, test = stratified_subset(train, 0.15, 0), stratified_subset(test, 0.1, 0)
    steps = len(train) // 32
    full, full_drawn = crd_run(train, test, 4, tmp_path / "full", False, seed=0)
    crd_run(train, test, 2, tmp_path / "split", False, seed=0)
    # The resumed process starts from other weights and another RNG state: the checkpoint
    # restores both.
    resumed, resumed_drawn = crd_run(train, test, 4, tmp_path / "split", True, seed=99)
    assert len(full_drawn) == 4 * steps and len(resumed_drawn) == 2 * steps
    assert not torch.equal(full_drawn[0], full_drawn[steps])  # each step draws afresh
    for step, (a, b) in enumerate(zip(full_drawn[2 * steps:], resumed_drawn)):
        assert torch.equal(a, b), f"step {step} of the resumed epochs drew other negatives"
    labels = dataset_labels(train)
    for rows in full_drawn:
        assert not bool((labels[rows[:, 1:]] == labels[rows[:, :1]]).any())
    assert torch.equal(full.memory_s, resumed.memory_s)
    assert torch.equal(full.memory_t, resumed.memory_t)
