"""Argument checks shared by every backend and by the ops' fake-tensor rules, so that
the same bad call gets the same message everywhere (the C++ launchers check the same)."""
import math

import torch


def check_inputs(z_s, z_t, log_scale, bias, alpha, max_scale) -> None:
    for name, x in (("z_s", z_s), ("z_t", z_t), ("log_scale", log_scale)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    for name, x in (("z_s", z_s), ("z_t", z_t)):
        if x.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor (N, D), got shape {tuple(x.shape)}")
    if z_s.shape[0] != z_t.shape[0]:
        raise ValueError("z_s and z_t must have the same number of rows (batch size N), "
                         f"got {z_s.shape[0]} and {z_t.shape[0]}")
    if z_s.shape[1] != z_t.shape[1]:
        raise ValueError("z_s and z_t must have the same feature size D (project them first, "
                         f"e.g. with icd_fast.ICDLoss), got {z_s.shape[1]} and {z_t.shape[1]}")
    if z_s.shape[0] == 0:
        raise ValueError(f"the batch is empty: z_s has shape {tuple(z_s.shape)}")
    if z_s.shape[1] == 0:
        raise ValueError(f"the feature size D is 0: z_s has shape {tuple(z_s.shape)}")
    if not z_s.dtype.is_floating_point:
        raise TypeError(f"z_s must be a floating-point tensor, got {z_s.dtype}")
    if z_t.dtype != z_s.dtype:
        raise TypeError(f"z_s and z_t must have the same dtype, got {z_s.dtype} and {z_t.dtype}")
    if not log_scale.dtype.is_floating_point:
        raise TypeError(f"log_scale must be a floating-point tensor, got {log_scale.dtype}")
    if log_scale.numel() != 1 or log_scale.dim() > 1:
        raise ValueError("log_scale must hold exactly one value (shape () or (1,)), "
                         f"got shape {tuple(log_scale.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.numel() != 1
                             or bias.dim() > 1):
        raise ValueError("bias must be None or a tensor holding one value (shape () or (1,))")
    for name, x in (("z_t", z_t), ("log_scale", log_scale)) + ((("bias", bias),) if bias is not None else ()):
        if x.device != z_s.device:
            raise ValueError(f"z_s and {name} must be on the same device, "
                             f"got {z_s.device} and {x.device}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    if not (isinstance(max_scale, (int, float)) and max_scale > 0):
        raise ValueError(f"max_scale must be a number > 0, got {max_scale!r}")
