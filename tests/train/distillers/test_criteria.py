"""The comparison methods' criteria on synthetic feature lists: each value against a plain
NumPy transcription of the benchmark's formula (loops, no code shared with the criteria),
the layers each parametric criterion adds, and the errors of bad input."""
import numpy as np
import pytest
import torch

from train.distillers import CRITERIA, build_criterion
from train.distillers.criteria import correlation_congruence

N = 5


def feature_list(generator, channels, sizes, pooled):
    """stem, stages (channels[i] x sizes[i]^2) and a pooled feature, float64, non-negative
    maps as after a ReLU (AB's pre-activations may be negative: see ab_lists)."""
    maps = [torch.relu(torch.randn(N, c, s, s, generator=generator, dtype=torch.float64))
            for c, s in zip(channels, sizes)]
    return maps + [torch.randn(N, pooled, generator=generator, dtype=torch.float64)]


@pytest.fixture
def lists():
    g = torch.Generator().manual_seed(0)
    student = feature_list(g, (4, 4, 6, 8), (8, 8, 4, 2), 8)
    teacher = feature_list(g, (4, 4, 6, 8), (8, 4, 4, 2), 8)  # stage 1 at half size
    return student, teacher


def np_(t):
    return t.detach().numpy()


def pool_to(a, size):
    """Average of size x size equal blocks (the adaptive pool of an exact multiple)."""
    n, c, h, _ = a.shape
    k = h // size
    return a.reshape(n, c, size, k, size, k).mean(axis=(3, 5))


def matched(a, b):
    if a.shape[2] > b.shape[2]:
        a = pool_to(a, b.shape[2])
    elif b.shape[2] > a.shape[2]:
        b = pool_to(b, a.shape[2])
    return a, b


def unit_rows(x):
    return x / np.maximum(np.sqrt((x ** 2).sum(1, keepdims=True)), 1e-12)


def reference_at(s_list, t_list):
    total = 0.0
    for s, t in zip(s_list[1:-1], t_list[1:-1]):
        s, t = matched(np_(s), np_(t))
        a_s = unit_rows((s ** 2).mean(1).reshape(N, -1))
        a_t = unit_rows((t ** 2).mean(1).reshape(N, -1))
        total += ((a_s - a_t) ** 2).mean()
    return total


def reference_sp(s_list, t_list):
    s, t = np_(s_list[-2]).reshape(N, -1), np_(t_list[-2]).reshape(N, -1)
    g_s, g_t = unit_rows(s @ s.T), unit_rows(t @ t.T)
    return ((g_t - g_s) ** 2).sum() / N ** 2


def reference_pkt(s_list, t_list, eps=1e-7):
    def probabilities(f):
        f = f / (np.sqrt((f ** 2).sum(1, keepdims=True)) + eps)
        p = np.zeros((N, N))
        for i in range(N):
            for j in range(N):
                p[i, j] = (f[i] @ f[j] + 1) / 2
        return p / p.sum(1, keepdims=True)
    p_s, p_t = probabilities(np_(s_list[-1])), probabilities(np_(t_list[-1]))
    return (p_t * np.log((p_t + eps) / (p_s + eps))).mean()


def reference_nst(s_list, t_list):
    def kernel_mean(a, b):
        values = [(a[n, i] @ b[n, j]) ** 2 for n in range(N) for i in range(a.shape[1])
                  for j in range(b.shape[1])]
        return np.mean(values)
    total = 0.0
    for s, t in zip(s_list[1:-1], t_list[1:-1]):
        s, t = matched(np_(s), np_(t))
        s = s.reshape(N, s.shape[1], -1)
        t = t.reshape(N, t.shape[1], -1)
        s = s / np.maximum(np.sqrt((s ** 2).sum(2, keepdims=True)), 1e-12)
        t = t / np.maximum(np.sqrt((t ** 2).sum(2, keepdims=True)), 1e-12)
        total += kernel_mean(t, t) + kernel_mean(s, s) - 2 * kernel_mean(s, t)
    return total


def reference_fsp(s_list, t_list):
    def matrices(points):
        out = []
        for bottom, top in zip(points[:-1], points[1:]):
            bottom, top = matched(np_(bottom), np_(top))
            hw = bottom.shape[2] * bottom.shape[3]
            g = np.zeros((N, top.shape[1], bottom.shape[1]))
            for n in range(N):
                for i in range(top.shape[1]):
                    for j in range(bottom.shape[1]):
                        g[n, i, j] = (top[n, i] * bottom[n, j]).sum() / hw
            out.append(g)
        return out
    return sum(((a - b) ** 2).mean()
               for a, b in zip(matrices(s_list[:-1]), matrices(t_list[:-1])))


def smooth_l1(a, b):
    d = np.abs(a - b)
    return np.where(d < 1, 0.5 * d ** 2, d - 0.5).mean()


def reference_rkd(s_list, t_list):
    def distances(x):
        d = np.array([[np.sqrt(((x[i] - x[j]) ** 2).sum()) if i != j else 0.0
                       for j in range(N)] for i in range(N)])
        return d / d[d > 0].mean()

    def angles(x):
        out = np.zeros((N, N, N))
        for i in range(N):
            for j in range(N):
                for k in range(N):
                    u, v = x[j] - x[i], x[k] - x[i]
                    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                    if nu > 0 and nv > 0:
                        out[i, j, k] = u @ v / (nu * nv)
        return out
    s, t = np_(s_list[-1]), np_(t_list[-1])
    return 25 * smooth_l1(distances(s), distances(t)) + 50 * smooth_l1(angles(s), angles(t))


def reference_cc(f_s, f_t):
    delta = np.abs(np_(f_s) - np_(f_t))
    return np.mean([delta[i] @ delta[i + 1] for i in range(N - 1)])


REFERENCES = {"at": reference_at, "sp": reference_sp, "pkt": reference_pkt,
              "nst": reference_nst, "fsp": reference_fsp, "rkd": reference_rkd}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_parameter_free_criteria_match_their_formulas(name, lists):
    student, teacher = lists
    criterion = build_criterion(name, student, teacher)
    assert sum(p.numel() for p in criterion.parameters()) == 0
    value = criterion(student, teacher)
    assert value.dim() == 0 and value.dtype == torch.float64
    expected = REFERENCES[name](student, teacher)
    assert value.item() == pytest.approx(expected, rel=1e-10), (value.item(), expected)
    assert value.item() > 0


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_a_student_equal_to_its_teacher_costs_nothing(name, lists):
    student, _ = lists
    copy = [f.clone() for f in student]
    assert abs(build_criterion(name, student, copy)(student, copy).item()) < 1e-12


def test_correlation_congruence_matches_its_formula(lists):
    student, teacher = lists
    expected = reference_cc(student[-1], teacher[-1])
    assert correlation_congruence(student[-1], teacher[-1]).item() == pytest.approx(
        expected, rel=1e-12)
    raw = build_criterion("cc", student, teacher, embed_dim=None)
    assert raw(student, teacher).item() == pytest.approx(expected, rel=1e-12)


def test_ab_matches_its_margin_formula():
    g = torch.Generator().manual_seed(3)
    # Pre-activation maps (either sign), student and teacher of equal shapes: identity
    # connectors, so the formula reads the maps themselves.
    student = [torch.randn(N, 4, 8, 8, generator=g, dtype=torch.float64)
               for _ in range(4)] + [torch.randn(N, 8, dtype=torch.float64)]
    teacher = [torch.randn(N, 4, 8, 8, generator=g, dtype=torch.float64)
               for _ in range(4)] + [torch.randn(N, 8, dtype=torch.float64)]
    criterion = build_criterion("ab", student, teacher)
    assert criterion.preact and sum(p.numel() for p in criterion.parameters()) == 0
    expected = 0.0
    stages = list(zip(student[1:-1], teacher[1:-1]))
    for i, (s, t) in enumerate(stages):
        s, t = np_(s), np_(t)
        on = (s + 1) ** 2 * ((s > -1) & (t <= 0)) + (s - 1) ** 2 * ((s <= 1) & (t > 0))
        expected += 2.0 ** (i - len(stages) + 1) * on.sum()
    expected = expected / N / 1000 * 3
    assert criterion(student, teacher).item() == pytest.approx(expected, rel=1e-12)


def conv_params(c_in, c_out, k, bias=True):
    return c_in * c_out * k * k + (c_out if bias else 0)


def test_parametric_criteria_add_the_benchmarks_layers():
    g = torch.Generator().manual_seed(1)
    student = feature_list(g, (8, 8, 16, 32), (16, 16, 8, 4), 32)
    teacher = feature_list(g, (16, 16, 32, 64), (16, 8, 8, 4), 64)

    def count(module):
        return sum(p.numel() for p in module.parameters() if p.requires_grad)
    # FitNet at point 2: 16x8x8 -> 32x8x8, a 1x1 conv with bias, batch norm (2 x 32).
    assert count(build_criterion("fitnet", student, teacher)) == conv_params(16, 32, 1) + 64
    # ... at point 1: 8x16x16 -> 16x8x8, a 3x3 stride-2 conv.
    assert count(build_criterion("fitnet", student, teacher, hint_layer=1)) == \
        conv_params(8, 16, 3) + 32
    # ... teacher map twice as large: a 4x4 transposed conv.
    assert count(build_criterion("fitnet", teacher, student, hint_layer=1)) == \
        conv_params(16, 8, 4) + 16
    assert count(build_criterion("cc", student, teacher)) == (32 * 128 + 128) + (64 * 128 + 128)
    # VID: per stage three 1x1 convs without bias (s->t, t->t, t->t) and t log-scales.
    vid = sum(s * t + 2 * t * t + t for s, t in ((8, 16), (16, 32), (32, 64)))
    assert count(build_criterion("vid", student, teacher)) == vid
    # AB: a connector (conv + batch norm, no ReLU) where channels or size differ.
    ab = build_criterion("ab", student, teacher)
    assert count(ab) == (conv_params(8, 16, 3) + 32) + (conv_params(16, 32, 1) + 64) + \
        (conv_params(32, 64, 1) + 128)
    same = build_criterion("ab", student, [f.clone() for f in student])
    assert count(same) == 0
    # FT: paraphraser of the teacher's 64 channels (rate 0.5: 32), translator 32 -> 32.
    ft = build_criterion("ft", student, teacher)
    paraphraser = 2 * (conv_params(64, 64, 3) + conv_params(32, 32, 3)) + \
        conv_params(64, 32, 3) + conv_params(32, 64, 3)
    translator = conv_params(32, 32, 3) + 64 + conv_params(32, 32, 3) + 64 + \
        conv_params(32, 32, 3) + 64
    assert count(ft.paraphraser) == paraphraser and count(ft.translator) == translator


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_every_criterion_gives_a_finite_scalar_with_gradients(name, lists):
    student, teacher = lists
    if name == "fsp":  # FSP pairs points of equal channels
        teacher = [f.clone() for f in teacher]
    student = [f.clone().requires_grad_(True) for f in student]
    criterion = build_criterion(name, student, teacher).double()
    loss = criterion(student, teacher)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert any(f.grad is not None and f.grad.abs().sum() > 0 for f in student)


def test_bad_feature_lists_are_named(lists):
    student, teacher = lists
    with pytest.raises(ValueError, match="unknown criterion 'fitnets'"):
        build_criterion("fitnets", student, teacher)
    with pytest.raises(ValueError, match="criterion 'at' has no option margin"):
        build_criterion("at", student, teacher, margin=1.0)
    with pytest.raises(ValueError, match="at least 3 tensors"):
        build_criterion("at", student[-2:], teacher)
    with pytest.raises(ValueError, match=r"student feature point 4 must be 2-D.*\(5, 8, 1, 1\)"):
        build_criterion("sp", student[:-1] + [student[-1][:, :, None, None]], teacher)
    with pytest.raises(ValueError, match="fsp needs equal channels"):
        build_criterion("fsp", student, [teacher[0]] + [f.repeat(1, 2, 1, 1) for f in
                                                         teacher[1:-1]] + [teacher[-1]])
    with pytest.raises(ValueError, match="pairs the stages, but the student has 3"):
        build_criterion("nst", student, teacher[:1] + teacher[2:])
    with pytest.raises(ValueError, match="equal width"):
        build_criterion("cc", student, teacher[:-1] + [teacher[-1][:, :4]], embed_dim=None)
    criterion = build_criterion("at", student, teacher)
    with pytest.raises(ValueError, match="batches differ: 5 vs 3"):
        criterion(student, [f[:3] for f in teacher])
    with pytest.raises(ValueError, match="built for"):
        criterion(student[1:], teacher)


def test_low_precision_features_are_compared_in_float32(lists):
    student, teacher = lists
    criterion = build_criterion("pkt", student, teacher)
    exact = criterion(student, teacher).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = criterion([f.bfloat16() for f in student], [f.bfloat16() for f in teacher])
    assert low.dtype == torch.float32
    assert low.item() >= 0 and low.item() == pytest.approx(exact, rel=0.2)
