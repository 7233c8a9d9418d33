"""icd_fast: a fused C++/CUDA Invariant Consistency Distillation (ICD / DCD) loss for PyTorch.

    >>> import torch, icd_fast
    >>> criterion = icd_fast.ICDLoss(s_dim=64, t_dim=256)          # projection heads + loss
    >>> loss = criterion(torch.randn(32, 64), torch.randn(32, 256))
    >>> loss.backward()
"""
from ._ops import build_info
from .distributed import icd_loss_sharded
from .functional import ICDLossParts, icd_loss
from .modules import ICDLoss
from .reference import icd_loss_reference

__version__ = "0.1.0"

__all__ = ["ICDLoss", "ICDLossParts", "build_info", "icd_loss", "icd_loss_reference",
           "icd_loss_sharded", "__version__"]
