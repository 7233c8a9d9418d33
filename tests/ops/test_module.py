"""ICDLoss: the drop-in module, its parameters, modes and the authors' state dicts."""
import pytest
import torch

import icd_fast
from icd_fast import ICDLoss


def test_module_equals_functional_on_projected_features():
    torch.manual_seed(0)
    crit = ICDLoss(s_dim=12, t_dim=20, feat_dim=8, alpha=0.3)
    f_s, f_t = torch.randn(16, 12), torch.randn(16, 20)
    got = crit(f_s, f_t)
    want = icd_fast.icd_loss_reference(crit.embed_s(f_s), crit.embed_t(f_t), crit.log_scale,
                                       crit.bias, alpha=0.3)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_features_with_spatial_dims_are_flattened():
    crit = ICDLoss(s_dim=2 * 3 * 3, t_dim=4, feat_dim=8)
    assert crit(torch.randn(5, 2, 3, 3), torch.randn(5, 4, 1, 1)).dim() == 0


def test_theta_and_heads_learn():
    torch.manual_seed(1)
    crit = ICDLoss(s_dim=6, t_dim=6, feat_dim=4)
    opt = torch.optim.SGD(crit.parameters(), lr=0.5)
    f_s, f_t = torch.randn(32, 6), torch.randn(32, 6)
    theta0 = crit.log_scale.item()
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = crit(f_s, f_t)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert crit.log_scale.item() != theta0
    assert crit.bias.grad.item() == 0.0
    assert losses[-1] < losses[0]


def test_fixed_temperature_means_scale_one_over_t():
    crit = ICDLoss(s_dim=4, t_dim=4, feat_dim=4, learnable=False, temperature=0.07)
    assert crit.scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert "log_scale" not in dict(crit.named_parameters())
    with pytest.raises(ValueError, match="learnable=False"):
        ICDLoss(4, 4, temperature=0.1)


@pytest.mark.parametrize("head", ["", ".linear"])  # the authors' nn.Linear, or CRD's Embed
def test_loads_the_authors_state_dict(head):
    # Keys as the authors' DCDLoss saves them: two heads and a LearnableParams `params`.
    authors = {
        f"embed_s{head}.weight": torch.randn(8, 6), f"embed_s{head}.bias": torch.randn(8),
        f"embed_t{head}.weight": torch.randn(8, 10), f"embed_t{head}.bias": torch.randn(8),
        "params.tau": torch.tensor(0.4), "params.b": torch.tensor(0.2),
    }
    crit = ICDLoss(s_dim=6, t_dim=10, feat_dim=8)
    crit.load_authors_state_dict(authors)
    assert torch.equal(crit.embed_s.weight, authors[f"embed_s{head}.weight"])
    assert torch.equal(crit.embed_t.bias, authors[f"embed_t{head}.bias"])
    assert crit.log_scale.item() == pytest.approx(0.4)  # theta: the scale is exp(0.4)
    assert crit.bias.item() == pytest.approx(0.2)
    with pytest.raises(KeyError, match="unexpected key"):
        crit.load_authors_state_dict({**authors, "queue": torch.zeros(1)})


def test_authors_non_trainable_tau_is_the_multiplier_itself():
    authors = {"embed_s.weight": torch.randn(4, 3), "embed_s.bias": torch.randn(4),
               "embed_t.weight": torch.randn(4, 5), "embed_t.bias": torch.randn(4),
               "params.tau": torch.tensor(0.07), "params.b": torch.tensor(0.0)}
    crit = ICDLoss(3, 5, feat_dim=4, learnable=False)
    crit.load_authors_state_dict(authors, authors_trainable=False)
    assert crit.scale.item() == pytest.approx(0.07, rel=1e-6)
    f_s, f_t = torch.randn(9, 3), torch.randn(9, 5)
    z_s, z_t = crit.embed_s(f_s), crit.embed_t(f_t)
    logits = 0.07 * torch.nn.functional.normalize(z_s, dim=1) @ torch.nn.functional.normalize(z_t, dim=1).T
    want = torch.nn.functional.cross_entropy(logits, torch.arange(9)) + 0.5 * torch.nn.functional.kl_div(
        logits.log_softmax(1), logits.softmax(0).T, reduction="batchmean")
    assert crit(f_s, f_t).item() == pytest.approx(want.item(), rel=1e-5)


def test_state_dict_round_trip():
    a = ICDLoss(5, 7, feat_dim=3)
    b = ICDLoss(5, 7, feat_dim=3)
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(4, 5), torch.randn(4, 7)
    assert a(x, y).item() == b(x, y).item()


def test_bad_dimensions():
    with pytest.raises(ValueError, match="s_dim"):
        ICDLoss(0, 4)


@pytest.mark.parametrize("tau", [-0.07, 0.0, float("nan")])
def test_authors_non_trainable_tau_must_be_a_positive_multiplier(tau):
    # log(tau) would be a NaN scale, silently: the whole loss NaN.
    criterion = icd_fast.ICDLoss(4, 4, 2, learnable=False, temperature=1.0)
    state = {"embed_s.weight": torch.zeros(2, 4), "embed_s.bias": torch.zeros(2),
             "embed_t.weight": torch.zeros(2, 4), "embed_t.bias": torch.zeros(2),
             "params.tau": torch.tensor([tau]), "params.b": torch.tensor([0.0])}
    with pytest.raises(ValueError, match="params.tau .* must be > 0"):
        criterion.load_authors_state_dict(state, authors_trainable=False)


def test_sharded_module_without_a_process_group_is_the_plain_module():
    torch.manual_seed(0)
    plain = icd_fast.ICDLoss(6, 5, 4)
    sharded = icd_fast.ICDLoss(6, 5, 4, sharded=True)
    sharded.load_state_dict(plain.state_dict())
    f_s, f_t = torch.randn(9, 6), torch.randn(9, 5)
    assert sharded(f_s, f_t).item() == pytest.approx(plain(f_s, f_t).item(), rel=1e-6)
    assert "sharded=True" in repr(sharded)
