"""The tests' shared helpers, in one module: the operator's inputs and float64 oracles and
the norm-wise comparison; small files in the data sets' own on-disk formats; the CRD
benchmark's CIFAR zoo as recorded in fixtures/ (see fixtures/README.md) and the
deterministic weights those records were computed with."""

from __future__ import annotations

import json
import math
import os
import pickle
import shlex
import zlib
from functools import lru_cache

import numpy as np
import torch

import icd_fast


def make_inputs(n, d, dtype=torch.float32, log_scale=1.0, seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    z_s = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    z_t = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    theta = torch.tensor(float(log_scale),
                         dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    for x in (z_s, z_t, theta):
        x.requires_grad_(requires_grad)
    return z_s, z_t, theta


def loss_and_grads(fn, z_s, z_t, theta, **kwargs):
    """Runs fn (an icd_loss-like callable) forward and backward on fresh leaves."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (z_s, z_t, theta)]
    parts = fn(*leaves, return_parts=True, **kwargs)
    grads = torch.autograd.grad(parts[0], leaves)
    return [p.detach() for p in parts], list(grads)


def oracle(z_s, z_t, theta, **kwargs):
    """The official formulation in float64 on the same input values."""
    return loss_and_grads(icd_fast.icd_loss_reference, z_s.double(), z_t.double(),
                          theta.double(), **kwargs)


def assert_rel_close(actual, expected, rtol, what="", floor=1e-8):
    """max|actual - expected| <= rtol * max(max|expected|, floor), compared in float64."""
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(expected.abs().max().item(), floor)
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:.1e} * {scale:.3e}"


def assert_grads_match(grads, want_grads, n, d, rtol, what=""):
    """Feature and log-scale gradients against the oracle's, norm-wise relative. Where the
    exact gradient is 0 — everything at N = 1 (the loss is 0 for any input), the features'
    at D = 1 (a 1-D row normalises to +-1 whatever its value) — both sides hold only
    rounding noise, which is checked in absolute terms instead."""
    for got, want, name in zip(grads, want_grads, ["z_s", "z_t", "log_scale"]):
        if n == 1 or (d == 1 and name != "log_scale"):
            noise = 1e3 * torch.finfo(got.dtype).eps
            assert got.abs().max().item() <= noise, f"{what} grad {name}: should be ~0"
            continue
        assert_rel_close(got, want, rtol, f"{what} grad {name}", floor=1e-12)


def printed_table(text: str, name: str) -> dict:
    """The Markdown table titled `name` in the printout of `results`: first cell -> the
    row's cells (the header row under "method")."""
    rows, inside = {}, False
    for line in text.splitlines():
        if line and not line.startswith("|"):
            inside = line.startswith(name + " ")
        elif inside and line.startswith("| "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def row_terms_oracle(z_s, z_t, theta, max_scale=10.0):
    """The per-row terms of the loss in float64, straight from the N x N logits: r_i, c_i,
    k_i and CE_i = r_i - L_ii (the loss is mean(CE) + alpha mean(k)). Differentiable."""
    s = torch.nn.functional.normalize(z_s.double(), dim=1)
    t = torch.nn.functional.normalize(z_t.double(), dim=1)
    kappa = torch.clamp(theta.double().exp(), 0, max_scale)
    logits = kappa * s @ t.T
    log_p = torch.log_softmax(logits, dim=1)    # log P_ij
    log_q = torch.log_softmax(logits.T, dim=1)  # log Q_ij = log softmax_j(L_ji)
    r = torch.logsumexp(logits, dim=1)
    c = torch.logsumexp(logits, dim=0)
    k = (log_q.exp() * (log_q - log_p)).sum(dim=1)
    ce = -torch.diagonal(log_p)
    return r, c, k, ce


def weighted_rows_oracle(z_s, z_t, theta, weight_ce, weight_kl, max_scale=10.0):
    """float64 gradients of sum_i (weight_ce_i CE_i + weight_kl_i k_i) w.r.t. z_s, z_t, theta."""
    leaves = [x.detach().double().requires_grad_() for x in (z_s, z_t, theta)]
    _, _, k, ce = row_terms_oracle(*leaves, max_scale=max_scale)
    total = (weight_ce.double() * ce).sum() + (weight_kl.double() * k).sum()
    return torch.autograd.grad(total, leaves)


# ---------------------------------------------------------------- data files


def write_cifar100(root, n_train=6, n_test=4):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "fine_labels": [i % 100 for i in range(n)], "coarse_labels": [0] * n,
                 "filenames": [f"{i}.png" for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "meta").write_bytes(pickle.dumps(
        {"fine_label_names": [f"class{i}" for i in range(100)],
         "coarse_label_names": [f"super{i}" for i in range(20)]}))
    return batch


def write_image_folder(root, classes=("cat", "dog"), per_class=2, size=40):
    from PIL import Image

    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.JPEG")


def write_stl10(root, n_train=5, n_test=3):
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("test", n_test)):
        rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8).tofile(folder / f"{split}_X.bin")
        (np.arange(n, dtype=np.uint8) % 10 + 1).tofile(folder / f"{split}_y.bin")  # 1-based
    (folder / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)))
    (folder / "fold_indices.txt").write_text("0 1 2\n" * 10)


# ---------------------------------------------------------------- the recorded zoo


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@lru_cache(maxsize=None)
def cifar_zoo() -> dict:
    with open(os.path.join(FIXTURES, "cifar_zoo.json")) as f:
        return json.load(f)


@lru_cache(maxsize=None)
def methods() -> dict:
    with open(os.path.join(FIXTURES, "methods.json")) as f:
        return json.load(f)


@lru_cache(maxsize=None)
def methods_ofd_wsld() -> dict:
    with open(os.path.join(FIXTURES, "methods_ofd_wsld.json")) as f:
        return json.load(f)


def reference_weights(keys_and_shapes) -> dict:
    """Every state-dict entry drawn, in float64, from a generator seeded by its own key."""
    state = {}
    for key, shape in keys_and_shapes:
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        draw = dict(generator=g, dtype=torch.float64)
        if key.endswith("num_batches_tracked"):
            value = torch.tensor(0)
        elif key.endswith("running_var"):
            value = 1 + 0.5 * torch.rand(shape, **draw)
        elif key.endswith("running_mean"):
            value = 0.1 * torch.randn(shape, **draw)
        elif len(shape) == 1 and key.endswith("bias"):
            value = 0.1 * torch.randn(shape, **draw)
        elif len(shape) == 1:
            value = 1 + 0.1 * torch.randn(shape, **draw)
        else:
            value = torch.randn(shape, **draw) / math.sqrt(torch.Size(shape[1:]).numel())
        state[key] = value
    return state


@lru_cache(maxsize=None)
def reference_model(name: str, num_classes: int = 100):
    """build_model(name) in float64 and eval mode, carrying the fixture's weights (one
    shared instance per name: callers must leave it unchanged)."""
    from train.models import build_model

    model = build_model(name, num_classes).double().eval()
    model.load_state_dict(reference_weights(cifar_zoo()[name]["state_dict"]), strict=True)
    return model


def logits_input() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64)


def methods_input() -> torch.Tensor:
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)


# ---------------------------------------------------------------- short training runs
def tiny_problem(seed=0):
    """A few digits: train and test subsets of the embedded data set."""
    from train.data.digits import digits_datasets, stratified_subset

    train, test = digits_datasets(image_size=8)
    return stratified_subset(train, 0.15, seed), stratified_subset(test, 0.3, seed)


FEW_NEGATIVES = {"num_negatives": 128}


def make_distiller(method, seed=0, teacher=None):
    """A resnet8 student (and teacher) for `method` on the digits, CRD with few negatives."""
    from train.data.digits import NUM_CLASSES
    from train.data.labels import dataset_labels
    from train.distillers import DISTILLERS, build_distiller
    from train.distillers.crd import CRD
    from train.models import build_model

    torch.manual_seed(seed)
    if teacher is None:
        teacher = build_model("resnet8", NUM_CLASSES, in_channels=1)
    student = build_model("resnet8", NUM_CLASSES, in_channels=1)
    train = tiny_problem()[0]
    options = FEW_NEGATIVES if issubclass(DISTILLERS[method], CRD) else {}
    return build_distiller(method, student, None if method == "vanilla" else teacher,
                           num_samples=len(train), labels=dataset_labels(train),
                           example_images=train.tensors[0][:2], **options)


def fit_briefly(distiller, train, test, epochs, out_dir=None, resume=False, lr=0.05):
    """engine.fit with a small SGD recipe: the training tests' loop."""
    from train import engine

    params = [p for p in distiller.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    config = engine.LoopSettings(epochs=epochs, batch_size=32, seed=1, out_dir=out_dir)
    return engine.fit(distiller, train, test, opt, sched, config, resume=resume)


# ---------------------------------------------------------------- the paper's tables
COMPARISON = ("fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst")
# The transcription's table names -> the application's.
TRANSCRIBED = {"table1_cifar100_same_family": "cifar100-same-family",
               "table2_cifar100_other_family": "cifar100-other-family",
               "table3_imagenet": "imagenet"}


@lru_cache(maxsize=None)
def paper_tables() -> dict:
    """The paper's printed tables as transcribed (fixtures/paper_tables.json)."""
    with open(os.path.join(FIXTURES, "paper_tables.json")) as f:
        return json.load(f)


def transcribed_pair(table: str, pair: str) -> str:
    """The application's name of a transcribed pair (ImageNet: torchvision's ResNets)."""
    if table != "imagenet":
        return pair
    return "-".join(m if m == "mobilenet_v1" else f"tv_{m}" for m in pair.split("-"))


# ---------------------------------------------------------------- checkpoint files
def trained_looking(name="resnet8", classes=10, channels=3, seed=1):
    """A model whose every parameter and buffer differs from a freshly built one's."""
    from train.models import build_model

    torch.manual_seed(seed)
    model = build_model(name, classes, channels)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                value.add_(torch.rand_like(value))
            else:  # batch counters
                value.fill_(7)
    return model


class RunsACommand:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def malicious_checkpoint(tmp_path, name="evil.pth", legacy=False):
    marker = tmp_path / "the_command_ran"
    path = tmp_path / name
    torch.save({"model": trained_looking().state_dict(), "opt": RunsACommand(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    return path, marker


def assert_steps_lower_the_loss(module, images, labels, key, precision, steps=4):
    """`steps` Adam steps of `module` (a distiller or its initialisation stage) on one batch
    lower its loss term `key` every step, by at least 0.3 % in all, under fp32 or bf16
    autocast. Adam: steps of one size whatever the method's weight."""
    optimizer = torch.optim.Adam(module.trainable_parameters(), lr=3e-3)
    values = []
    module.train()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            _, losses = module(images, labels)
        values.append(losses[key].item())
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert all(math.isfinite(v) for v in values)
    assert all(b < a for a, b in zip(values, values[1:])), values
    assert values[-1] < 0.997 * values[0], values

