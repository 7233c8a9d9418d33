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

from ..models import FeatureTap
from ..registry import registrar

DISTILLERS: Dict[str, Callable[..., "Distiller"]] = {}


register = registrar(DISTILLERS, "method")


def build_distiller(method: str, student: nn.Module, teacher: Optional[nn.Module] = None,
                    num_samples: Optional[int] = None, labels: Optional[torch.Tensor] = None,
                    example_images: Optional[torch.Tensor] = None,
                    **options) -> "Distiller":
    """Facts about the training set reach only the methods that declare they need them:
    num_samples (its size: per-sample state), labels (every sample's class: drawing by class),
    example_images (a batch of its shape: layers sized from feature maps)."""
    if method not in DISTILLERS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(sorted(DISTILLERS))}")
    cls = DISTILLERS[method]
    facts = {"num_samples": num_samples, "labels": labels, "example_images": example_images}
    accepted = inspect.signature(cls.__init__).parameters
    unknown = sorted(k for k in options if k not in accepted or k in facts)
    if unknown:
        takes = [k for k in accepted if k not in ("self", "student", "teacher", *facts)]
        raise ValueError(f"method {method!r} has no option {', '.join(unknown)}; its options: "
                         f"{', '.join(takes) or 'none'}")
    for fact, value in facts.items():
        if getattr(cls, f"needs_{fact}", False):
            options[fact] = value
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
    The ICD criterion's heads, theta and b are trained with the student. Under DDP each rank
    projects only its own rows and the sharded loss contrasts them with the global batch
    (icd_fast.icd_loss_sharded): exactly the one-process loss and gradients, each rank
    computing its own rows' share."""

    default_lambda = 0.0

    def __init__(self, student, teacher, gamma=1.0, lam=None, beta=1.0, temperature=4.0,
                 feat_dim=128, alpha=0.5, backend="auto"):
        super().__init__(student, teacher)
        self.gamma, self.beta, self.temperature = gamma, beta, temperature
        self.lam = self.default_lambda if lam is None else lam
        self.criterion = icd_fast.ICDLoss(self.student_tap.dim, self.teacher_tap.dim,
                                          feat_dim=feat_dim, alpha=alpha, backend=backend,
                                          sharded=True)

    def forward(self, images, labels, indices=None):
        t_logits, t_features = self.teacher_outputs(images)
        logits = self.student(images)
        losses = {"ce": self.gamma * F.cross_entropy(logits, labels),
                  "icd": self.beta * self.criterion(self.student_tap.features, t_features)}
        if self.lam:
            losses["kd"] = self.lam * kd_loss(logits, t_logits, self.temperature)
        return logits, losses


@register("icd_kd")
class ICDKD(ICD):
    default_lambda = 1.0


# Methods in modules of their own register themselves when imported.
from . import crd, feature_methods, ofd, reweighted_kd  # noqa: E402
from .criteria import CRITERIA, build_criterion  # noqa: E402

__all__ = ["CRITERIA", "DISTILLERS", "Distiller", "build_criterion", "build_distiller",
           "crd", "feature_methods", "kd_loss", "register"]
