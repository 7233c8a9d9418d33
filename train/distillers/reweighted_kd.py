"""Soft-label distillation with per-sample weights: WSLD and IPWD.

WSLD (Zhou et al., ICLR 2021, "Rethinking Soft Labels for Knowledge Distillation: A
Bias-Variance Tradeoff Perspective") follows the authors' code
(bellymonster/Weighted-Soft-Label-Distillation, knowledge_distiller.py) and its CIFAR port
(giakoumoglou/distillers, cifar/distillers/WSLD.py): CE + alpha T^2 mean_i(w_i H_i), with H_i
the cross-entropy of the student's softened prediction against the teacher's (not a KL: the
teacher's entropy is kept, which moves the value, not the gradient) and
w_i = 1 - exp(-max(CE_s,i / (CE_t,i + 1e-7), 0)) from the two networks' per-sample
cross-entropies at T = 1, held constant. The references' setting: T = 2, alpha = 2.5, CE
weight 1.

IPWD (Niu et al., NeurIPS 2022, "Respecting Transfer Gap in Knowledge Distillation") has no
public code; this is written from the paper's text, of which only the abstract, the
introduction and its Figure 1 / Table 1 could be read here (not the method section's
equations). The paper: the teacher's softened predictions (the "machine domain") are
imbalanced over the classes of a balanced training set (Figure 1: each class's average
teacher probability differs from 1/C; Table 1: KD helps the teacher's over-predicted classes
most), and IPWD weighs each sample's distillation by the inverse of its propensity of
belonging to the machine domain. Here that propensity is estimated per class: q_c, the
teacher's average probability (at the KD temperature) for class c over every training sample
seen so far, and w_i = (1 / q_{y_i}) / mean_c(1 / q_c), normalised so that the weights average
1 over the classes. A uniform propensity (q_c = 1/C) gives w = 1: plain KD. Losses and
weights are the CRD benchmark's KD setting (gamma 0.1, lambda 0.9, T 4), so IPWD differs from
the project's KD only by the weights. The estimator is this implementation's reading, not
checked against the paper's equations or code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import distributed
from ..models import classifier_layer
from . import Distiller, register

WSLD_EPS = 1e-7


def wsld_sample_weights(student_logits, teacher_logits, labels) -> torch.Tensor:
    """w_i = 1 - exp(-max(CE_s,i / (CE_t,i + eps), 0)), without gradient."""
    with torch.no_grad():
        ce_s = F.cross_entropy(student_logits.detach(), labels, reduction="none")
        ce_t = F.cross_entropy(teacher_logits.detach(), labels, reduction="none")
        return 1 - torch.exp(-torch.clamp(ce_s / (ce_t + WSLD_EPS), min=0))


def wsld_soft_loss(student_logits, teacher_logits, labels, temperature: float) -> torch.Tensor:
    """T^2 mean_i(w_i H_i), H_i = -sum_c softmax(t_i / T)_c log_softmax(s_i / T)_c."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s, t = student_logits.to(dtype), teacher_logits.to(dtype)
    soft_targets = F.softmax(t / temperature, dim=1)
    cross_entropy = -(soft_targets * F.log_softmax(s / temperature, dim=1)).sum(1)
    weights = wsld_sample_weights(s, t, labels)
    return temperature ** 2 * (weights * cross_entropy).mean()


@register("wsld")
class WSLD(Distiller):
    """gamma CE + beta WSLD_T with the references' gamma 1, beta (their alpha) 2.5, T 2."""

    def __init__(self, student, teacher, gamma=1.0, beta=2.5, temperature=2.0):
        super().__init__(student, teacher)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.gamma, self.beta, self.temperature = gamma, beta, temperature

    def forward(self, images, labels, indices=None):
        t_logits, _ = self.teacher_outputs(images)
        logits = self.student(images)
        return logits, {"ce": self.gamma * F.cross_entropy(logits, labels),
                        "wsld": self.beta * wsld_soft_loss(logits, t_logits, labels,
                                                           self.temperature)}


def inverse_propensity_weights(class_propensity: torch.Tensor) -> torch.Tensor:
    """Per class, 1 / q_c normalised to mean 1 over the classes (all 1 for a uniform q)."""
    inverse = 1.0 / class_propensity.clamp_min(torch.finfo(class_propensity.dtype).tiny)
    return inverse / inverse.mean()


@register("ipwd")
class IPWD(Distiller):
    """gamma CE + lam sum_i w_{y_i} KL_i T^2 / N, with the inverse-propensity class weights of
    the module's docstring (gamma 0.1, lam 0.9, T 4). The class propensity is the running
    average of the teacher's softened predictions over the samples of every training step
    (all ranks' under DDP); before any step it is uniform."""

    replicated_buffers = ("teacher_probability_sum", "samples_seen")

    def __init__(self, student, teacher, gamma=0.1, lam=0.9, temperature=4.0):
        super().__init__(student, teacher)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.gamma, self.lam, self.temperature = gamma, lam, temperature
        num_classes = classifier_layer(teacher).out_features
        self.register_buffer("teacher_probability_sum",
                             torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("samples_seen", torch.zeros((), dtype=torch.float64))

    def class_propensity(self) -> torch.Tensor:
        """q_c: the teacher's average softened probability of class c so far (uniform before
        any training step)."""
        if self.samples_seen.item() == 0:
            return torch.full_like(self.teacher_probability_sum,
                                   1.0 / self.teacher_probability_sum.numel())
        return self.teacher_probability_sum / self.samples_seen

    def _observe(self, teacher_logits):
        probabilities = F.softmax(teacher_logits.detach().double() / self.temperature, dim=1)
        # Summed over ranks (whose last batches may differ in size), so every rank keeps the
        # same estimate.
        self.teacher_probability_sum += distributed.all_reduce_sum(probabilities.sum(0))
        self.samples_seen += distributed.all_reduce_sum(
            torch.tensor(float(probabilities.shape[0]), dtype=torch.float64,
                         device=probabilities.device))

    def sample_weights(self, labels) -> torch.Tensor:
        return inverse_propensity_weights(self.class_propensity())[labels]

    def forward(self, images, labels, indices=None):
        t_logits, _ = self.teacher_outputs(images)
        logits = self.student(images)
        if self.training:
            self._observe(t_logits)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        T = self.temperature
        per_sample_kl = F.kl_div(F.log_softmax(logits.to(dtype) / T, dim=1),
                                 F.softmax(t_logits.to(dtype) / T, dim=1),
                                 reduction="none").sum(1)
        weights = self.sample_weights(labels).to(dtype)
        weighted_kd = (weights * per_sample_kl).sum() / logits.shape[0] * T ** 2
        return logits, {"ce": self.gamma * F.cross_entropy(logits, labels),
                        "ipwd": self.lam * weighted_kd}


__all__ = ["IPWD", "WSLD", "inverse_propensity_weights", "wsld_sample_weights",
           "wsld_soft_loss"]
