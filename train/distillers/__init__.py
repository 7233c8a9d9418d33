"""Distillation methods, each a Distiller with one training-step interface:

    logits, losses = distiller(images, labels, indices)   # {"ce": ..., "kd": ..., "icd": ...}
    sum(losses.values()).backward()

Methods come from a registry (`DISTILLERS`, `build_distiller`). Teacher and student
penultimate features are taken by forward hooks on their classifiers (train.models.FeatureTap),
so any model of the zoo, or any torchvision model, can play either part.

The CRD benchmark's comparison methods (FitNet, AT, SP, CC, VID, RKD, PKT, AB, FT, FSP, NST)
are in feature_methods.py, their criteria in criteria.py (`build_criterion`).
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import icd_fast

from .. import distributed
from ..models import FeatureTap

DISTILLERS: Dict[str, Callable[..., "Distiller"]] = {}


def register(name: str):
    def add(cls):
        DISTILLERS[name] = cls
        cls.method = name
        return cls
    return add


def build_distiller(method: str, student: nn.Module, teacher: Optional[nn.Module] = None,
                    num_samples: Optional[int] = None,
                    example_images: Optional[torch.Tensor] = None, **options) -> "Distiller":
    """num_samples (the training set's size) reaches the methods that keep per-sample state,
    example_images (a batch of the data's shape) those that size layers from feature maps."""
    if method not in DISTILLERS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(sorted(DISTILLERS))}")
    cls = DISTILLERS[method]
    accepted = inspect.signature(cls.__init__).parameters
    unknown = sorted(k for k in options if k not in accepted)
    if unknown:
        takes = [k for k in accepted if k not in ("self", "student", "teacher", "num_samples",
                                                  "example_images")]
        raise ValueError(f"method {method!r} has no option {', '.join(unknown)}; its options: "
                         f"{', '.join(takes) or 'none'}")
    if getattr(cls, "needs_num_samples", False):
        options["num_samples"] = num_samples
    if getattr(cls, "needs_example_images", False):
        options["example_images"] = example_images
    return cls(student, teacher, **options)


def kd_loss(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """Hinton's KD: KL(softmax(t / T) || softmax(s / T)) * T^2."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean") * temperature ** 2


class Distiller(nn.Module):
    """Student (trained), optional frozen teacher, and the method's own modules."""

    needs_teacher = True
    # Buffers that every rank keeps identical by itself (updated from all ranks' samples), so
    # that DDP need not broadcast them from rank 0 at every step.
    replicated_buffers: Tuple[str, ...] = ()

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module] = None):
        super().__init__()
        if self.needs_teacher and teacher is None:
            raise ValueError(f"method {self.method!r} needs a teacher model")
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self.student_tap = FeatureTap(student)
        self.teacher_tap = FeatureTap(teacher) if teacher is not None else None

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher's batch-norm statistics stay fixed
        return self

    def trainable_parameters(self):
        """What the optimiser of the (main) stage trains."""
        return [p for p in self.parameters() if p.requires_grad]

    def init_stage(self):
        """Two-stage methods: the module of their initialisation stage (None: one stage)."""
        return None

    def teacher_outputs(self, images) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            logits = self.teacher(images)
        return logits, self.teacher_tap.features

    def forward(self, images, labels, indices=None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """indices: each sample's position in the training set (used by memory banks)."""
        raise NotImplementedError


@register("vanilla")
class Vanilla(Distiller):
    """Cross-entropy on the labels only (no teacher)."""

    needs_teacher = False

    def forward(self, images, labels, indices=None):
        logits = self.student(images)
        return logits, {"ce": F.cross_entropy(logits, labels)}


@register("kd")
class KD(Distiller):
    """Hinton et al.: gamma CE + lambda KD_T (gamma 0.1, lambda 0.9, T 4 by default, the
    setting of the CRD benchmark)."""

    def __init__(self, student, teacher, gamma=0.1, lam=0.9, temperature=4.0):
        super().__init__(student, teacher)
        self.gamma, self.lam, self.temperature = gamma, lam, temperature

    def forward(self, images, labels, indices=None):
        t_logits, _ = self.teacher_outputs(images)
        logits = self.student(images)
        return logits, {"ce": self.gamma * F.cross_entropy(logits, labels),
                        "kd": self.lam * kd_loss(logits, t_logits, self.temperature)}


@register("icd")
class ICD(Distiller):
    """gamma CE + lambda KD_T + beta ICD (paper eq. 13): "icd" has lambda = 0, "icd_kd" 1.
    The ICD criterion's heads, theta and b are trained with the student. Under DDP the loss
    contrasts the global batch (all ranks' features), as one process would."""

    default_lambda = 0.0

    def __init__(self, student, teacher, gamma=1.0, lam=None, beta=1.0, temperature=4.0,
                 feat_dim=128, alpha=0.5, backend="auto"):
        super().__init__(student, teacher)
        self.gamma, self.beta, self.temperature = gamma, beta, temperature
        self.lam = self.default_lambda if lam is None else lam
        self.criterion = icd_fast.ICDLoss(self.student_tap.dim, self.teacher_tap.dim,
                                          feat_dim=feat_dim, alpha=alpha, backend=backend)

    def forward(self, images, labels, indices=None):
        t_logits, t_features = self.teacher_outputs(images)
        logits = self.student(images)
        f_s = distributed.gather_with_grad(self.student_tap.features)
        f_t = distributed.gather(t_features)
        losses = {"ce": self.gamma * F.cross_entropy(logits, labels),
                  "icd": self.beta * self.criterion(f_s, f_t)}
        if self.lam:
            losses["kd"] = self.lam * kd_loss(logits, t_logits, self.temperature)
        return logits, losses


@register("icd_kd")
class ICDKD(ICD):
    default_lambda = 1.0


@register("crd")
class CRD(Distiller):
    """Contrastive Representation Distillation (Tian et al., 2020), the original memory-bank
    form: students and teachers are embedded (linear + L2 norm), each anchor is contrasted
    with its own sample and `num_negatives` random others drawn from memory banks of all
    training samples' embeddings, with the NCE loss; the banks follow the embeddings with
    momentum. gamma CE + lambda KD + beta CRD, defaults 1 / 0 / 0.8 as in the CRD benchmark.
    """

    needs_num_samples = True
    replicated_buffers = ("memory_s", "memory_t")

    def __init__(self, student, teacher, num_samples: Optional[int] = None, gamma=1.0,
                 lam=0.0, beta=0.8, temperature=4.0, feat_dim=128, num_negatives=4096,
                 nce_temperature=0.07, momentum=0.5):
        super().__init__(student, teacher)
        if not num_samples:
            raise ValueError("crd needs num_samples, the size of the training set (its "
                             "memory banks hold one embedding per sample)")
        self.gamma, self.lam, self.beta, self.temperature = gamma, lam, beta, temperature
        self.num_negatives = min(num_negatives, num_samples - 1)
        self.nce_temperature, self.momentum = nce_temperature, momentum
        self.embed_s = nn.Linear(self.student_tap.dim, feat_dim)
        self.embed_t = nn.Linear(self.teacher_tap.dim, feat_dim)
        bound = 1.0 / (feat_dim / 3) ** 0.5
        self.register_buffer("memory_s", torch.rand(num_samples, feat_dim) * 2 * bound - bound)
        self.register_buffer("memory_t", torch.rand(num_samples, feat_dim) * 2 * bound - bound)
        self.register_buffer("normalizer", torch.zeros(2))  # Z of each side, set on first use

    def _scores(self, memory, anchor, sample_idx, side):
        # exp(<memory_k, anchor> / T) / Z for the positive (k = 0) and the negatives.
        weights = memory[sample_idx]  # (B, K + 1, D)
        scores = torch.exp(torch.bmm(weights, anchor.unsqueeze(2)).squeeze(2)
                           / self.nce_temperature)
        if self.normalizer[side] == 0:  # estimated once, from the first batch
            self.normalizer[side] = scores.mean().detach() * memory.shape[0]
        # A copy: setting the other side's Z in place must not touch this graph's input.
        return scores / self.normalizer[side].clone()

    def _nce_loss(self, scores):
        noise = self.num_negatives / self.memory_s.shape[0]  # K P_n
        eps = 1e-7
        positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
        negative = torch.log(noise / (scores[:, 1:] + noise + eps))
        return -(positive.sum() + negative.sum()) / scores.shape[0]

    def forward(self, images, labels, indices=None):
        if indices is None:
            raise ValueError("crd needs the training samples' indices")
        t_logits, t_features = self.teacher_outputs(images)
        logits = self.student(images)
        v_s = F.normalize(self.embed_s(self.student_tap.features), dim=1)
        v_t = F.normalize(self.embed_t(t_features), dim=1)
        negatives = torch.randint(0, self.memory_s.shape[0],
                                  (indices.shape[0], self.num_negatives), device=indices.device)
        sample_idx = torch.cat([indices.unsqueeze(1), negatives], dim=1)
        crd = (self._nce_loss(self._scores(self.memory_s, v_t, sample_idx, 0)) +
               self._nce_loss(self._scores(self.memory_t, v_s, sample_idx, 1)))
        with torch.no_grad():  # the banks follow the embeddings (every rank's samples)
            rows = distributed.gather(indices)
            for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                memory[rows] = F.normalize(
                    memory[rows] * self.momentum + distributed.gather(v.detach())
                    * (1 - self.momentum), dim=1)
        losses = {"ce": self.gamma * F.cross_entropy(logits, labels), "crd": self.beta * crd}
        if self.lam:
            losses["kd"] = self.lam * kd_loss(logits, t_logits, self.temperature)
        return logits, losses


# The comparison methods register themselves on import.
from . import feature_methods  # noqa: E402,F401
from .criteria import CRITERIA, build_criterion  # noqa: E402

__all__ = ["CRITERIA", "DISTILLERS", "Distiller", "build_criterion", "build_distiller",
           "feature_methods", "kd_loss", "register"]
