"""The comparison methods' criteria, as the CRD benchmark (Tian et al., ICLR 2020) defines them.

    criterion = build_criterion(name, student_features, teacher_features, **options)
    loss = criterion(student_features, teacher_features)   # before the method's weight

Feature lists are those of `train.models.feature_points`: the stem, each stage, and the pooled
penultimate feature (AB reads the stages before their final ReLU: `criterion.preact`). Each
criterion picks the points its reference reads and sizes its own layers from the example
lists; the call returns one scalar, summed over the points where the method uses several.

Under bf16/fp16 autocast the criteria still compute in float32 (their features are cast up
and autocast is off inside them): they divide by norms and take logarithms of probabilities
near 1/N, which bf16 resolves too coarsely (PKT's KL divergence even turns negative).
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import registrar

CRITERIA: Dict[str, Callable[..., "Criterion"]] = {}


register = registrar(CRITERIA, "name")


def build_criterion(name: str, student_features: Sequence[torch.Tensor],
                    teacher_features: Sequence[torch.Tensor], **options) -> "Criterion":
    """The criterion `name`, sized from example feature lists (the points of one batch)."""
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; known: {', '.join(sorted(CRITERIA))}")
    cls = CRITERIA[name]
    accepted = [k for k in inspect.signature(cls.__init__).parameters
                if k not in ("self", "student_features", "teacher_features")]
    unknown = sorted(k for k in options if k not in accepted)
    if unknown:
        raise ValueError(f"criterion {name!r} has no option {', '.join(unknown)}; its "
                         f"options: {', '.join(accepted) or 'none'}")
    return cls(student_features, teacher_features, **options)


# ----------------------------------------------------------------------------- feature points

def stage_points(features):
    """The stages' outputs: every point between the stem and the pooled feature."""
    return list(features[1:-1])


def last_stage(features):
    return [features[-2]]


def pooled(features):
    return [features[-1]]


def stem_and_stages(features):
    return list(features[:-1])


def hint_point(index: int):
    def points(features):
        return [features[index]]
    return points


def _check_feature_list(features, side: str) -> None:
    if not isinstance(features, (list, tuple)) or len(features) < 3:
        raise ValueError(f"{side} features must be a list of at least 3 tensors (stem, "
                         f"stages, pooled feature), got {type(features).__name__} of "
                         f"{len(features) if isinstance(features, (list, tuple)) else '?'}")
    for i, f in enumerate(features):
        if not torch.is_tensor(f):
            raise ValueError(f"{side} feature point {i} is a {type(f).__name__}, not a tensor")
        expected = 2 if i == len(features) - 1 else 4
        if f.dim() != expected:
            raise ValueError(f"{side} feature point {i} must be {expected}-D "
                             f"({'pooled (N, C)' if expected == 2 else '(N, C, H, W)'}), "
                             f"got shape {tuple(f.shape)}")


def full_precision(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def without_autocast(x: torch.Tensor):
    return torch.autocast(x.device.type, enabled=False)


def match_spatial(a: torch.Tensor, b: torch.Tensor):
    """The larger map average-pooled to the smaller one's (square) size, as the benchmark's
    AT, NST, VID, FT and FSP do for points of different resolution."""
    a_h, b_h = a.shape[2], b.shape[2]
    if a_h > b_h:
        a = F.adaptive_avg_pool2d(a, (b_h, b_h))
    elif a_h < b_h:
        b = F.adaptive_avg_pool2d(b, (a_h, a_h))
    return a, b


def spatial_attention(f: torch.Tensor, p: float) -> torch.Tensor:
    """AT's and FT's map: the channel mean of |f|^p, flattened and L2-normalised per sample."""
    return F.normalize(f.pow(p).mean(1).reshape(f.shape[0], -1))


class Criterion(nn.Module):
    """Reads `points(features)` of both sides; subclasses define `loss(student, teacher)` on
    the selected point lists."""

    preact = False  # AB alone reads the stages before their final ReLU
    points: Callable = staticmethod(stage_points)
    pairs_stages = False  # True: stage i of the student is compared with stage i of the teacher

    def __init__(self, student_features, teacher_features):
        super().__init__()
        _check_feature_list(student_features, "student")
        _check_feature_list(teacher_features, "teacher")
        if self.pairs_stages and \
                len(stage_points(student_features)) != len(stage_points(teacher_features)):
            raise ValueError(
                f"criterion {self.name!r} pairs the stages, but the student has "
                f"{len(stage_points(student_features))} and the teacher "
                f"{len(stage_points(teacher_features))}")
        self.num_points = (len(student_features), len(teacher_features))

    def forward(self, student_features, teacher_features) -> torch.Tensor:
        if (len(student_features), len(teacher_features)) != self.num_points:
            raise ValueError(f"criterion {self.name!r} was built for {self.num_points} "
                             f"(student, teacher) feature points, got "
                             f"({len(student_features)}, {len(teacher_features)})")
        if student_features[0].shape[0] != teacher_features[0].shape[0]:
            raise ValueError(f"student and teacher batches differ: "
                             f"{student_features[0].shape[0]} vs {teacher_features[0].shape[0]}")
        with without_autocast(student_features[0]):
            return self.loss([full_precision(f) for f in self.points(student_features)],
                             [full_precision(f) for f in self.points(teacher_features)])

    def loss(self, student: List[torch.Tensor], teacher: List[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


def regressor(s_shape, t_shape, relu: bool) -> nn.Sequential:
    """The benchmark's ConvReg: maps a student map onto a teacher map's channels and size
    (stride-2 conv when the student's map is twice as large, a transposed conv when half as
    large, else a valid conv that shrinks it), then batch norm (and ReLU for FitNet)."""
    s_c, s_h, s_w = s_shape[1:]
    t_c, t_h, t_w = t_shape[1:]
    if s_h == 2 * t_h:
        conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
    elif s_h * 2 == t_h:
        conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
    elif s_h >= t_h:
        conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
    else:
        raise ValueError(f"no regressor maps a {s_h}x{s_w} student map onto a {t_h}x{t_w} "
                         f"teacher map (the benchmark handles x2, /2 and shrinking sizes)")
    layers = [conv, nn.BatchNorm2d(t_c)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


# -------------------------------------------------------------------------------- criteria

@register("fitnet")
class FitNet(Criterion):
    """Romero et al., FitNets (ICLR 2015): MSE between the teacher's hint and a regressed
    student map, at hint point 2 (the benchmark's --hint_layer default)."""

    def __init__(self, student_features, teacher_features, hint_layer: int = 2):
        super().__init__(student_features, teacher_features)
        last = min(len(student_features), len(teacher_features)) - 2
        if not 0 <= hint_layer <= last:
            raise ValueError(f"hint_layer must be a map point in 0..{last}, got {hint_layer}")
        self.points = hint_point(hint_layer)
        self.regressor = regressor(student_features[hint_layer].shape,
                                   teacher_features[hint_layer].shape, relu=True)

    def loss(self, student, teacher):
        return F.mse_loss(self.regressor(student[0]), teacher[0])


@register("at")
class AttentionTransfer(Criterion):
    """Zagoruyko & Komodakis, Attention Transfer (ICLR 2017), p = 2, on every stage."""

    pairs_stages = True

    def __init__(self, student_features, teacher_features, p: float = 2.0):
        super().__init__(student_features, teacher_features)
        self.p = p

    def loss(self, student, teacher):
        total = 0.0
        for s, t in zip(student, teacher):
            s, t = match_spatial(s, t)
            total = total + (spatial_attention(s, self.p) - spatial_attention(t, self.p)
                             ).pow(2).mean()
        return total


@register("sp")
class SimilarityPreserving(Criterion):
    """Tung & Mori, Similarity-Preserving KD (ICCV 2019): the batch's row-normalised Gram
    matrices of the last stage, squared difference summed and divided by N^2."""

    points = staticmethod(last_stage)

    def loss(self, student, teacher):
        s, t = (x[0].reshape(x[0].shape[0], -1) for x in (student, teacher))
        g_s, g_t = F.normalize(s @ s.t()), F.normalize(t @ t.t())
        return (g_t - g_s).pow(2).sum() / s.shape[0] ** 2


def correlation_congruence(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """The benchmark's CC form: with delta = |f_s - f_t|, the batch mean of
    <delta_i, delta_i+1> over consecutive samples."""
    delta = (f_s - f_t).abs()
    return (delta[:-1] * delta[1:]).sum(1).mean()


@register("cc")
class CorrelationCongruence(Criterion):
    """Peng et al., Correlation Congruence (ICCV 2019), on linear embeddings (128-d) of the
    pooled features; embed_dim=None compares the raw pooled features (equal widths)."""

    points = staticmethod(pooled)

    def __init__(self, student_features, teacher_features, embed_dim=128):
        super().__init__(student_features, teacher_features)
        s_dim, t_dim = student_features[-1].shape[1], teacher_features[-1].shape[1]
        if embed_dim is None:
            if s_dim != t_dim:
                raise ValueError(f"cc without embeddings needs pooled features of equal "
                                 f"width, got student {s_dim} and teacher {t_dim}")
            self.embed_s, self.embed_t = nn.Identity(), nn.Identity()
        else:
            self.embed_s, self.embed_t = nn.Linear(s_dim, embed_dim), nn.Linear(t_dim, embed_dim)

    def loss(self, student, teacher):
        return correlation_congruence(self.embed_s(student[0]), self.embed_t(teacher[0]))


class VariationalRegressor(nn.Module):
    """One VID point: a 3-layer 1x1-conv regressor of the teacher map (its mean) and a
    per-channel variance softplus(log_scale) + eps, initialised at init_variance."""

    def __init__(self, in_channels, mid_channels, out_channels, init_variance=5.0, eps=1e-5):
        super().__init__()
        self.mean = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid_channels, out_channels, 1, bias=False))
        # softplus^-1(init_variance - eps), so that the variance starts at init_variance
        self.log_scale = nn.Parameter(
            math.log(math.expm1(init_variance - eps)) * torch.ones(out_channels))
        self.eps = eps

    def forward(self, student, teacher):
        student, teacher = match_spatial(student, teacher)
        mean = self.mean(student)
        variance = (F.softplus(self.log_scale) + self.eps).view(1, -1, 1, 1)
        return (0.5 * ((mean - teacher) ** 2 / variance
                       + torch.log(variance))).mean()


@register("vid")
class VariationalInformation(Criterion):
    """Ahn et al., Variational Information Distillation (CVPR 2019): a Gaussian negative
    log-likelihood of each teacher stage given the student's, summed over the stages."""

    pairs_stages = True

    def __init__(self, student_features, teacher_features, init_variance: float = 5.0):
        super().__init__(student_features, teacher_features)
        self.regressors = nn.ModuleList(
            VariationalRegressor(s.shape[1], t.shape[1], t.shape[1], init_variance)
            for s, t in zip(stage_points(student_features), stage_points(teacher_features)))

    def loss(self, student, teacher):
        return sum(r(s, t) for r, s, t in zip(self.regressors, student, teacher))


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    squared = e.pow(2).sum(1)
    d = (squared.unsqueeze(1) + squared.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def normalised_distances(e: torch.Tensor) -> torch.Tensor:
    d = pairwise_distances(e)
    return d / d[d > 0].mean()


def triplet_angles(e: torch.Tensor) -> torch.Tensor:
    """cos of the angle at every vertex j of every triplet (i, j, k), flattened."""
    directions = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(directions, directions.transpose(1, 2)).reshape(-1)


@register("rkd")
class RelationalKD(Criterion):
    """Park et al., Relational KD (CVPR 2019): smooth-L1 between the batch's distance
    structures (weight 25) and angle structures (weight 50) of the pooled features."""

    points = staticmethod(pooled)

    def __init__(self, student_features, teacher_features, distance_weight: float = 25.0,
                 angle_weight: float = 50.0):
        super().__init__(student_features, teacher_features)
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def loss(self, student, teacher):
        s = student[0].reshape(student[0].shape[0], -1)
        t = teacher[0].reshape(teacher[0].shape[0], -1)
        with torch.no_grad():
            t_distances, t_angles = normalised_distances(t), triplet_angles(t)
        return (self.distance_weight * F.smooth_l1_loss(normalised_distances(s), t_distances)
                + self.angle_weight * F.smooth_l1_loss(triplet_angles(s), t_angles))


def cosine_probabilities(f: torch.Tensor, eps: float) -> torch.Tensor:
    """PKT's conditional probabilities: cosine similarities scaled to [0, 1], rows summing
    to 1."""
    unit = f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)
    unit = torch.where(torch.isnan(unit), torch.zeros_like(unit), unit)
    similarity = (unit @ unit.t() + 1.0) / 2.0
    return similarity / similarity.sum(1, keepdim=True)


@register("pkt")
class ProbabilisticTransfer(Criterion):
    """Passalis & Tefas, Probabilistic Knowledge Transfer (ECCV 2018): KL divergence of the
    cosine-similarity distributions of the pooled features (mean over the N^2 entries)."""

    points = staticmethod(pooled)

    def __init__(self, student_features, teacher_features, eps: float = 1e-7):
        super().__init__(student_features, teacher_features)
        self.eps = eps

    def loss(self, student, teacher):
        p_s = cosine_probabilities(student[0], self.eps)
        p_t = cosine_probabilities(teacher[0], self.eps)
        return (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()


def polynomial_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean over samples and channel pairs of <a_i, b_j>^2 (NST's polynomial kernel, d = 2,
    c = 0)."""
    return torch.bmm(b, a.transpose(1, 2)).pow(2).mean()


@register("nst")
class NeuronSelectivity(Criterion):
    """Huang & Wang, Neuron Selectivity Transfer (2017): squared MMD with a polynomial kernel
    between the stages' L2-normalised channel maps, summed over the stages."""

    pairs_stages = True

    def loss(self, student, teacher):
        total = 0.0
        for s, t in zip(student, teacher):
            s, t = match_spatial(s, t)
            s = F.normalize(s.reshape(s.shape[0], s.shape[1], -1), dim=2)
            t = F.normalize(t.reshape(t.shape[0], t.shape[1], -1), dim=2)
            total = total + (polynomial_kernel_mean(t, t).detach() + polynomial_kernel_mean(s, s)
                             - 2 * polynomial_kernel_mean(s, t))
        return total


def fsp_matrices(points: List[torch.Tensor]) -> List[torch.Tensor]:
    """Flow of solution procedure: for consecutive points (bottom, top), the (N, C_top,
    C_bottom) matrix of spatial means of their channel products."""
    matrices = []
    for bottom, top in zip(points[:-1], points[1:]):
        bottom, top = match_spatial(bottom, top)
        bottom = bottom.reshape(bottom.shape[0], bottom.shape[1], -1)
        top = top.reshape(top.shape[0], top.shape[1], -1)
        matrices.append(torch.bmm(top, bottom.transpose(1, 2)) / bottom.shape[2])
    return matrices


@register("fsp")
class FlowOfSolution(Criterion):
    """Yim et al., A Gift from Knowledge Distillation (CVPR 2017): mean squared difference of
    the FSP matrices between consecutive points from the stem to the last stage, summed."""

    pairs_stages = True

    points = staticmethod(stem_and_stages)

    def __init__(self, student_features, teacher_features):
        super().__init__(student_features, teacher_features)
        s_channels = [f.shape[1] for f in stem_and_stages(student_features)]
        t_channels = [f.shape[1] for f in stem_and_stages(teacher_features)]
        if s_channels != t_channels:
            raise ValueError(f"fsp needs equal channels at every point from the stem to the "
                             f"last stage: student {s_channels}, teacher {t_channels}")

    def loss(self, student, teacher):
        s_fsp, t_fsp = fsp_matrices(student), fsp_matrices(teacher)
        return sum((s - t).pow(2).mean() for s, t in zip(s_fsp, t_fsp))


@register("ab")
class ActivationBoundaries(Criterion):
    """Heo et al., Activation Boundaries (AAAI 2019): a margin loss that makes each
    connected student neuron (pre-activation) fire where the teacher's does, on the stages;
    stage i of n weighs 2^(i - n + 1), and the sum is divided by N and scaled by 3/1000 as
    in the benchmark. A connector (regressor without ReLU) maps student stages whose channels
    or size differ from the teacher's."""

    pairs_stages = True

    preact = True

    def __init__(self, student_features, teacher_features, margin: float = 1.0):
        super().__init__(student_features, teacher_features)
        self.margin = margin
        pairs = list(zip(stage_points(student_features), stage_points(teacher_features)))
        self.connectors = nn.ModuleList(
            nn.Identity() if s.shape[1:3] == t.shape[1:3] else regressor(s.shape, t.shape,
                                                                          relu=False)
            for s, t in pairs)
        self.weights = [2.0 ** (i - len(pairs) + 1) for i in range(len(pairs))]

    def boundary_loss(self, source, target):
        m = self.margin
        return ((source + m).pow(2) * ((source > -m) & (target <= 0)).to(source.dtype)
                + (source - m).pow(2) * ((source <= m) & (target > 0)).to(source.dtype)).sum()

    def loss(self, student, teacher):
        batch = student[0].shape[0]
        return sum(w * self.boundary_loss(c(s), t)
                   for w, c, s, t in zip(self.weights, self.connectors, student, teacher)
                   ) / batch / 1000 * 3


def _leaky():
    return nn.LeakyReLU(0.1)


class Paraphraser(nn.Module):
    """FT's teacher-side autoencoder: three 3x3 convs down to rate * C channels (the factor),
    three transposed convs back, LeakyReLU(0.1) after each, no batch norm."""

    def __init__(self, channels: int, rate: float = 0.5):
        super().__init__()
        factor = int(channels * rate)
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1), _leaky(),
            nn.Conv2d(channels, factor, 3, 1, 1), _leaky(),
            nn.Conv2d(factor, factor, 3, 1, 1), _leaky())
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(factor, factor, 3, 1, 1), _leaky(),
            nn.ConvTranspose2d(factor, channels, 3, 1, 1), _leaky(),
            nn.ConvTranspose2d(channels, channels, 3, 1, 1), _leaky())

    def forward(self, x):
        return self.decoder(self.encoder(x))


def translator(in_channels: int, factor: int) -> nn.Sequential:
    """FT's student-side encoder: three 3x3 convs with batch norm and LeakyReLU(0.1)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, 1, 1), nn.BatchNorm2d(in_channels), _leaky(),
        nn.Conv2d(in_channels, factor, 3, 1, 1), nn.BatchNorm2d(factor), _leaky(),
        nn.Conv2d(factor, factor, 3, 1, 1), nn.BatchNorm2d(factor), _leaky())


@register("ft")
class FactorTransfer(Criterion):
    """Kim et al., Factor Transfer (NeurIPS 2018): the L1 distance between the normalised
    spatial maps (p = 2) of the translated student factor and the paraphrased teacher factor,
    on the last stage. The paraphraser is trained first as an autoencoder of the teacher's
    last stage (`reconstruction_loss`), then frozen."""

    points = staticmethod(last_stage)

    def __init__(self, student_features, teacher_features, rate: float = 0.5):
        super().__init__(student_features, teacher_features)
        t_channels = teacher_features[-2].shape[1]
        self.paraphraser = Paraphraser(t_channels, rate)
        self.translator = translator(student_features[-2].shape[1], int(t_channels * rate))

    def reconstruction_loss(self, teacher_features) -> torch.Tensor:
        """The initialisation stage's autoencoder loss on the teacher's last stage."""
        target = full_precision(last_stage(teacher_features)[0])
        with without_autocast(target):
            return F.mse_loss(self.paraphraser(target), target)

    def loss(self, student, teacher):
        # The paraphraser learns from reconstruction alone (the benchmark leaves it out of
        # the main stage's optimiser): its factor is a fixed target here.
        with torch.no_grad():
            factor_t = self.paraphraser.encoder(teacher[0])
        factor_s, factor_t = match_spatial(self.translator(student[0]), factor_t)
        return (spatial_attention(factor_s, 2) - spatial_attention(factor_t, 2)).abs().mean()
