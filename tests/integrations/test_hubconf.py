"""hubconf.py: the zoo through torch.hub, as torchdistill's configs load it (repo_or_dir), with
the weights read by the application's safe loader."""
from pathlib import Path

import pytest
import torch

from train.checkpoints import UntrustedCheckpoint
from train.models import build_model

from helpers import malicious_checkpoint

REPO = str(Path(__file__).resolve().parents[2])


def test_hub_entry_builds_a_zoo_model_with_a_published_teachers_weights(tmp_path):
    torch.manual_seed(0)
    trained = build_model("resnet8x4", 100).eval()
    path = tmp_path / "ckpt_epoch_240.pth"  # the CRD benchmark's layout
    torch.save({"epoch": 240, "model": trained.state_dict(), "accuracy": 0.0}, path)
    model = torch.hub.load(REPO, "resnet8x4", source="local", num_classes=100,
                           checkpoint=str(path)).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), trained(images))


def test_hub_entry_refuses_a_checkpoint_that_carries_code(tmp_path):
    path, marker = malicious_checkpoint(tmp_path)
    with pytest.raises(UntrustedCheckpoint, match="--trust-checkpoint"):
        torch.hub.load(REPO, "resnet8", source="local", num_classes=10, checkpoint=str(path))
    assert not marker.exists()
