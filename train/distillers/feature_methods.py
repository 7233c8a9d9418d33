"""The CRD benchmark's comparison methods as distillers: FitNet, AT, SP, CC, VID, RKD, PKT, AB,
FT, FSP and NST.

Each step is gamma CE + beta method (+ lambda KD when --kd-weight is given), with the
benchmark scripts' beta per method (scripts/run_cifar_distill.sh of HobbitLong/RepDistiller).
The criteria (train.distillers.criteria) read the feature points of
`train.models.feature_points`.

AB, FT and FSP are two-stage methods, as in the benchmark (helper/pretrain.py): an
initialisation stage (`init_stage()`, run by train.training for --init-epochs epochs) trains
  AB:  the connectors and the student's feature modules on the AB loss,
  FT:  the paraphraser as an autoencoder of the teacher's last stage (MSE),
  FSP: the student's feature modules on the FSP loss,
where the feature modules are what the benchmark's get_feat_modules() lists per architecture
(train.models.feature_modules); as in the benchmark (helper/pretrain.py: model_s.eval(),
init_modules.train()), the stage's modules train in train mode and every other module of the
student stays in eval mode and out of the optimiser. The main stage is then CE (+ KD) alone
for AB and FSP, CE + beta FT for FT with the paraphraser frozen.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..models import feature_modules, feature_points
from . import Distiller, kd_loss, register
from .criteria import build_criterion

# The benchmark scripts' weight of each method's loss (AB's and FSP's main stage has none).
DEFAULT_BETAS = {"fitnet": 100.0, "at": 1000.0, "sp": 3000.0, "cc": 0.02, "vid": 1.0,
                 "rkd": 1.0, "pkt": 30000.0, "ab": 1.0, "ft": 200.0, "fsp": 50.0, "nst": 50.0}
TWO_STAGE_METHODS = ("ab", "ft", "fsp")


def example_features(model: nn.Module, example_images: torch.Tensor, preact: bool):
    """One eval-mode pass that sizes a criterion (the benchmark sizes its modules the same
    way); the model's mode is restored. The images go to the model's device (a teacher may
    already sit on the GPU while the example batch comes from the data set)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        features, _ = feature_points(model, example_images.to(device), preact=preact)
    model.train(was_training)
    return features


class FeatureMethod(Distiller):
    """gamma CE + beta criterion(student points, teacher points) [+ lam KD_T]."""

    needs_example_images = True
    main_stage_loss = True  # False: the main stage is CE (+ KD) alone (AB, FSP)

    def __init__(self, student, teacher, example_images: Optional[torch.Tensor] = None,
                 gamma=1.0, lam=0.0, beta=None, temperature=4.0):
        super().__init__(student, teacher)
        if example_images is None or example_images.dim() != 4:
            raise ValueError(f"method {self.method!r} sizes its layers from example images "
                             f"(N, C, H, W); got "
                             f"{None if example_images is None else tuple(example_images.shape)}")
        self.gamma, self.lam, self.temperature = gamma, lam, temperature
        self.beta = DEFAULT_BETAS[self.method] if beta is None else beta
        criterion_name = self.method
        preact = criterion_name == "ab"
        self.criterion = build_criterion(
            criterion_name, example_features(student, example_images, preact),
            example_features(teacher, example_images, preact))

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad] + \
            [p for p in self.main_stage_modules().parameters() if p.requires_grad]

    def main_stage_modules(self) -> nn.Module:
        """The method's own modules trained with the student in the main stage."""
        return self.criterion if self.main_stage_loss else nn.ModuleList()

    def criterion_loss(self, images):
        """The criterion on one batch's points, before its weight (AB's and FSP's
        initialisation stage trains on it)."""
        preact = self.criterion.preact
        with torch.no_grad():
            t_features, _ = feature_points(self.teacher, images, preact=preact)
        s_features, _ = feature_points(self.student, images, preact=preact)
        return self.criterion(s_features, t_features)

    def forward(self, images, labels, indices=None):
        t_logits = None
        if self.main_stage_loss:
            preact = self.criterion.preact
            with torch.no_grad():
                t_features, t_logits = feature_points(self.teacher, images, preact=preact)
            s_features, logits = feature_points(self.student, images, preact=preact)
            losses = {"ce": self.gamma * F.cross_entropy(logits, labels),
                      self.method: self.beta * self.criterion(s_features, t_features)}
        else:
            logits = self.student(images)
            losses = {"ce": self.gamma * F.cross_entropy(logits, labels)}
        if self.lam:
            if t_logits is None:
                with torch.no_grad():
                    t_logits = self.teacher(images)
            losses["kd"] = self.lam * kd_loss(logits, t_logits, self.temperature)
        return logits, losses


class InitStage(nn.Module):
    """A two-stage method's first stage, trained by the same loop as any stage: it holds the
    distiller (student, teacher, criterion) and trains the parameters of `trained_modules`
    on `stage_loss`, those modules in train mode and the rest of the distiller in eval mode;
    `student` is evaluated after each epoch like any run's."""

    def __init__(self, distiller: FeatureMethod, trained_modules: List[nn.Module], stage_loss):
        super().__init__()
        self.distiller = distiller
        self._trained_modules = list(trained_modules)
        self._stage_loss = stage_loss

    @property
    def student(self):
        return self.distiller.student

    @property
    def method(self):
        return f"{self.distiller.method}-init"

    @property
    def teacher(self):  # frozen: the engine leaves its buffers out of DDP's broadcasts
        return self.distiller.teacher

    @property
    def replicated_buffers(self):
        return tuple(f"distiller.{name}" for name in self.distiller.replicated_buffers)

    def trainable_parameters(self) -> List[nn.Parameter]:
        seen, params = set(), []
        for module in self._trained_modules:
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def train(self, mode: bool = True):
        self.distiller.train(False)  # the teacher, and what the stage does not train
        for module in self._trained_modules:
            module.train(mode)
        self.training = mode
        return self

    def forward(self, images, labels, indices=None):
        return None, {f"{self.distiller.method}_init": self._stage_loss(images)}


def _register_single_stage(name: str, doc: str):
    cls = type(name.upper(), (FeatureMethod,), {"__doc__": doc})
    register(name)(cls)
    return cls


for _name, _doc in (
        ("fitnet", "FitNet: hint (point 2) regression, beta 100."),
        ("at", "Attention transfer on the stages, beta 1000."),
        ("sp", "Similarity-preserving KD on the last stage, beta 3000."),
        ("cc", "Correlation congruence of 128-d embeddings of the pooled features, beta 0.02."),
        ("vid", "Variational information distillation on the stages, beta 1."),
        ("rkd", "Relational KD (distance 25, angle 50) of the pooled features, beta 1."),
        ("pkt", "Probabilistic knowledge transfer of the pooled features, beta 30000."),
        ("nst", "Neuron selectivity transfer on the stages, beta 50.")):
    _register_single_stage(_name, _doc)


@register("ab")
class AB(FeatureMethod):
    """Activation boundaries: init stage trains the connectors and the student's feature
    layers on the AB loss (pre-activation stages); the main stage is CE (+ KD) alone, as in
    the benchmark (its beta has nothing to weigh there)."""

    main_stage_loss = False

    def __init__(self, student, teacher, example_images=None, gamma=1.0, lam=0.0,
                 temperature=4.0):
        super().__init__(student, teacher, example_images, gamma, lam, None, temperature)

    def init_stage(self):
        return InitStage(self, [self.criterion, *feature_modules(self.student)],
                         self.criterion_loss)


@register("fsp")
class FSP(FeatureMethod):
    """Flow of solution procedure: init stage trains the student's feature layers on the FSP
    loss; the main stage is CE (+ KD) alone, as in the benchmark."""

    main_stage_loss = False

    def __init__(self, student, teacher, example_images=None, gamma=1.0, lam=0.0,
                 temperature=4.0):
        super().__init__(student, teacher, example_images, gamma, lam, None, temperature)

    def init_stage(self):
        return InitStage(self, feature_modules(self.student), self.criterion_loss)


@register("ft")
class FT(FeatureMethod):
    """Factor transfer: init stage trains the paraphraser as an autoencoder of the teacher's
    last stage; the main stage is CE + beta FT (beta 200) with the translator trained and the
    paraphraser frozen."""

    def main_stage_modules(self):
        return self.criterion.translator

    def _init_loss(self, images):
        with torch.no_grad():
            t_features, _ = feature_points(self.teacher, images)
        return self.criterion.reconstruction_loss(t_features)

    def init_stage(self):
        return InitStage(self, [self.criterion.paraphraser], self._init_loss)
