"""The zoo by name: every model feeds the ICD loss, unknown names are named."""
import pytest
import torch

import icd_fast
from train.models import FeatureTap, build_model, model_names


@pytest.mark.parametrize("name", model_names())
def test_every_zoo_model_feeds_icd_loss(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7)
    tap = FeatureTap(model)
    logits = model(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 7)
    assert tap.features.shape == (3, tap.dim)
    criterion = icd_fast.ICDLoss(tap.dim, 24, feat_dim=16)
    loss = criterion(tap.features, torch.randn(3, 24))
    loss.backward()
    assert torch.isfinite(loss)
    # The loss reaches the model's own weights through the tapped features.
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet9'.*resnet8"):
        build_model("resnet9", 10)
