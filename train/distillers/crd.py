"""Contrastive Representation Distillation (Tian et al., 2020) as the CRD benchmark trains it:
the memory-bank form with class-aware negatives.

Students' and teachers' penultimate features are embedded (linear + L2 norm, 128-d). Each
anchor is contrasted, on each side, with its positive and K = 16384 negatives read from a
memory bank holding one embedding per training sample; the negatives are samples of other
classes (`ClassAwareNegatives`). The NCE loss takes the noise distribution P_n = 1/n_data
and a normaliser Z estimated from the first batch of each side; the banks follow the
embeddings with momentum 0.5.

"crd" is gamma CE + beta CRD (1 / 0.8), "crd_kd" adds lambda KD_T with lambda 1, T 4: the
benchmark's CRD and CRD+KD settings.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from . import Distiller, kd_loss, register
from .class_negatives import DEFAULT_NUM_NEGATIVES, ClassAwareNegatives

NCE_EPS = 1e-7
# The scores come from the full product anchors x bank while the bank holds at most this
# many rows per drawn index (CIFAR-100 at K = 4096 or 16384, the digits demo), else from
# the drawn rows gathered (ImageNet). Measured on CPU, batch 64, D 128: at 50,000 rows the
# product took 1/10 of the gather's time at K = 16384 and 1/5 at K = 4096; at 400,000 rows
# and K = 4096 (98 rows per draw) it took 1.4 times as long.
FULL_PRODUCT_ROWS_PER_DRAW = 32


@register("crd")
class CRD(Distiller):
    """Options: num_negatives (K), mode ("exact": the positive is the sample itself;
    "relax": a random sample of its class), feat_dim, nce_temperature, momentum, and the
    loss weights gamma / lam / beta with the KD temperature."""

    needs_num_samples = True
    needs_labels = True
    default_lambda = 0.0
    replicated_buffers = ("memory_s", "memory_t",
                          *(f"negatives.{name}" for name in ClassAwareNegatives.buffer_names))

    def __init__(self, student, teacher, num_samples: Optional[int] = None,
                 labels: Optional[torch.Tensor] = None, gamma=1.0, lam=None, beta=0.8,
                 temperature=4.0, feat_dim=128, num_negatives=DEFAULT_NUM_NEGATIVES,
                 mode="exact", nce_temperature=0.07, momentum=0.5):
        super().__init__(student, teacher)
        if not num_samples:
            raise ValueError(f"{self.method} needs num_samples, the size of the training set "
                             f"(its memory banks hold one embedding per sample)")
        if labels is None:
            raise ValueError(f"{self.method} needs the training set's labels (labels=, e.g. "
                             f"train.data.labels.dataset_labels(train_set)): its negatives "
                             f"are samples of other classes")
        if len(labels) != num_samples:
            raise ValueError(f"{self.method}: {len(labels)} labels for a training set of "
                             f"{num_samples} samples")
        self.gamma, self.beta, self.temperature = gamma, beta, temperature
        self.lam = self.default_lambda if lam is None else lam
        self.nce_temperature, self.momentum = nce_temperature, momentum
        self.negatives = ClassAwareNegatives(labels, num_negatives, mode)
        self.embed_s = nn.Linear(self.student_tap.dim, feat_dim)
        self.embed_t = nn.Linear(self.teacher_tap.dim, feat_dim)
        bound = 1.0 / (feat_dim / 3) ** 0.5
        self.register_buffer("memory_s", torch.rand(num_samples, feat_dim) * 2 * bound - bound)
        self.register_buffer("memory_t", torch.rand(num_samples, feat_dim) * 2 * bound - bound)
        self.register_buffer("normalizer", torch.zeros(2))  # Z of each side, set on first use

    @property
    def num_negatives(self) -> int:
        return self.negatives.num_negatives

    @staticmethod
    def _dot_products(memory, anchor, sample_idx):
        """<memory[sample_idx[b, k]], anchor[b]>, (B, K + 1)."""
        if memory.shape[0] <= FULL_PRODUCT_ROWS_PER_DRAW * sample_idx.shape[1]:
            # Every bank row against every anchor, then the drawn entries: B N products
            # instead of gathering B (K + 1) rows of D (537 MB at K = 16384, batch 64).
            # (A copy: the bank is updated in place before the backward pass needs it.)
            return torch.gather(anchor @ memory.t().clone(), 1, sample_idx)
        return torch.bmm(memory[sample_idx], anchor.unsqueeze(2)).squeeze(2)

    def _scores(self, memory, anchor, sample_idx, side):
        # exp(<memory_k, anchor> / T) / Z for the positive (k = 0) and the negatives.
        scores = torch.exp(self._dot_products(memory, anchor, sample_idx)
                           / self.nce_temperature)
        if self.normalizer[side] == 0:  # estimated once, from the first batch
            self.normalizer[side] = scores.mean().detach() * memory.shape[0]
        # A copy: setting the other side's Z in place must not touch this graph's input.
        return scores / self.normalizer[side].clone()

    def _nce_loss(self, scores):
        noise = self.num_negatives / self.memory_s.shape[0]  # K P_n
        positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + NCE_EPS))
        negative = torch.log(noise / (scores[:, 1:] + noise + NCE_EPS))
        return -(positive.sum() + negative.sum()) / scores.shape[0]

    def forward(self, images, labels, indices=None):
        if indices is None:
            raise ValueError(f"{self.method} needs the training samples' indices")
        t_logits, t_features = self.teacher_outputs(images)
        logits = self.student(images)
        v_s = F.normalize(self.embed_s(self.student_tap.features), dim=1)
        v_t = F.normalize(self.embed_t(t_features), dim=1)
        sample_idx = self.negatives(indices, labels)  # this rank's samples only
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


@register("crd_kd")
class CRDKD(CRD):
    default_lambda = 1.0
