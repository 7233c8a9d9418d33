"""ICD for torchdistill: an auxiliary model wrapper and a mid-level loss, registered with
torchdistill's own registries when this module is imported (a config's ``dependencies``).

torchdistill trains the parameters of the models and their auxiliary wrappers, not those of
losses, so ICD is split the way torchdistill splits CRD (``Linear4CRD`` + ``CRDLoss``):

- ``Linear4ICD`` wraps the teacher and the student. Each wrapper holds its projection head
  (``embed``), applied in ``secondary_forward`` to the flattened feature that a forward hook
  recorded at ``input_module_path``; the student's also holds theta and b (``params``), whose
  forward returns them so that a forward hook hands them to the loss.
- ``ICDLoss`` reads the two heads' outputs and theta and b from torchdistill's io_dict and
  calls the fused :func:`icd_fast.icd_loss`.

The config names ``embed`` (both sides) and ``params`` (student) in ``forward_hook.output``;
``configs/torchdistill/`` has complete samples.
"""
from __future__ import annotations

import torch
from torch import nn

from torchdistill.losses.registry import register_mid_level_loss
from torchdistill.models.registry import register_auxiliary_model_wrapper
from torchdistill.models.util import wrap_if_distributed
from torchdistill.models.wrapper import AuxiliaryModelWrapper

from ..distributed import icd_loss_sharded
from ..functional import icd_loss

__all__ = ["ICDLoss", "ICDScaleParams", "Linear4ICD"]


class ICDScaleParams(nn.Module):
    """theta (log-scale) and b of the ICD logits, as learnable scalars. Its forward takes no
    input and returns (theta, b): torchdistill reads modules' outputs through forward hooks."""

    def __init__(self, init_log_scale: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(float(init_log_scale)))
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))

    def forward(self):
        return self.log_scale, self.bias


@register_auxiliary_model_wrapper
class Linear4ICD(AuxiliaryModelWrapper):
    """Teacher or student model with its ICD projection head (and, for the student, theta
    and b).

    Args:
        input_module_path: the module (in this wrapper, so ``model.<path>``) whose output or
            input (``input_module_io``) is the penultimate feature; it must be hooked in the
            config's ``forward_hook`` too. It is flattened from dimension 1 on.
        linear_kwargs: ``nn.Linear`` arguments of the head: ``in_features`` (the feature's
            width), ``out_features`` (the embedding size, 128 in the paper; the same for both
            sides), ``bias``.
        init_log_scale, init_bias: initial theta and b (student only; icd_fast.ICDLoss's
            defaults).
        input_module_io: ``'output'`` (default) or ``'input'`` of ``input_module_path``.

    The teacher's network is kept in eval mode (its batch-norm statistics stay those it was
    trained with) and runs without gradients; its head is trained, as in ICD.
    """

    def __init__(self, input_module_path, linear_kwargs, device, device_ids, distributed,
                 teacher_model=None, student_model=None, find_unused_parameters=None,
                 init_log_scale: float = 1.0, init_bias: float = 0.0,
                 input_module_io: str = "output"):
        super().__init__()
        if (teacher_model is None) == (student_model is None):
            raise ValueError("Linear4ICD wraps exactly one of teacher_model and student_model")
        if input_module_io not in ("input", "output"):
            raise ValueError(f"Linear4ICD: input_module_io must be 'input' or 'output', got "
                             f"{input_module_io!r}")
        self.is_teacher = teacher_model is not None
        if self.is_teacher:
            self.model = teacher_model.eval()
        else:
            self.model = wrap_if_distributed(student_model, device, device_ids, distributed,
                                             find_unused_parameters)
        self.input_module_path = input_module_path
        self.input_module_io = input_module_io
        self.embed = wrap_if_distributed(nn.Linear(**linear_kwargs), device, device_ids,
                                         distributed, find_unused_parameters)
        if not self.is_teacher:
            self.params = wrap_if_distributed(ICDScaleParams(init_log_scale, init_bias),
                                              device, device_ids, distributed,
                                              find_unused_parameters)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.is_teacher:
            self.model.eval()
        return self

    def forward(self, x, *args, **kwargs):
        if self.is_teacher:
            with torch.no_grad():
                return self.model(x)
        return self.model(x)

    def secondary_forward(self, io_dict):
        recorded = io_dict.get(self.input_module_path, {})
        if self.input_module_io not in recorded:
            side = "teacher" if self.is_teacher else "student"
            raise KeyError(f"Linear4ICD: the {side}'s io_dict holds no {self.input_module_io} "
                           f"of {self.input_module_path!r}; add it to the {side}'s "
                           f"forward_hook.{self.input_module_io} in the config")
        self.embed(torch.flatten(recorded[self.input_module_io], 1))
        if not self.is_teacher:
            self.params()


def _hooked_output(io_dict, path: str, side: str, what: str):
    try:
        return io_dict[path]["output"]
    except KeyError:
        raise KeyError(f"ICDLoss: the {side}'s io_dict holds no output of {path!r} ({what}); "
                       f"add {path!r} to the {side}'s forward_hook.output in the config, with "
                       f"the Linear4ICD auxiliary_model_wrapper") from None


@register_mid_level_loss
class ICDLoss(nn.Module):
    """The ICD loss of the two heads' outputs, computed by the fused :func:`icd_fast.icd_loss`.

    Args:
        student_embed_module_path, teacher_embed_module_path: the heads (``'embed'`` in
            ``Linear4ICD``), hooked for their output.
        params_module_path: the student's theta and b (``'params'``), hooked for its output.
        alpha: weight of the invariance (KL) term (0.5 in the paper).
        max_scale: clamp of exp(theta).
        backend: ``icd_fast.icd_loss``'s backend; ``"auto"`` picks the fused kernel of the
            features' device.
        sharded: in a distributed run, each process's rows are contrasted with every
            process's (the global batch, as one process would) through
            :func:`icd_fast.icd_loss_sharded`, whose gradient convention matches DDP's
            averaging; False contrasts each process's own batch only. Without a process
            group both are ``icd_loss``.
    """

    def __init__(self, student_embed_module_path: str = "embed",
                 teacher_embed_module_path: str = "embed", params_module_path: str = "params",
                 alpha: float = 0.5, max_scale: float = 10.0, backend: str = "auto",
                 sharded: bool = True):
        super().__init__()
        self.student_embed_module_path = student_embed_module_path
        self.teacher_embed_module_path = teacher_embed_module_path
        self.params_module_path = params_module_path
        self.alpha = alpha
        self.max_scale = max_scale
        self.backend = backend
        self.sharded = sharded

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs):
        z_s = _hooked_output(student_io_dict, self.student_embed_module_path, "student",
                             "its projection head")
        z_t = _hooked_output(teacher_io_dict, self.teacher_embed_module_path, "teacher",
                             "its projection head")
        log_scale, bias = _hooked_output(student_io_dict, self.params_module_path, "student",
                                         "theta and b")
        loss = icd_loss_sharded if self.sharded else icd_loss
        return loss(z_s, z_t, log_scale, bias, alpha=self.alpha, max_scale=self.max_scale,
                    backend=self.backend)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, max_scale={self.max_scale}, backend={self.backend!r}, "
                f"sharded={self.sharded}")
