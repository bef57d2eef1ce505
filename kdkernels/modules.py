"""torch.nn.Module wrappers: the options are fixed at construction, the tensors go to forward."""
from __future__ import annotations

import torch

from .losses import fused_linear_kd_loss, fused_linear_sparse_kd_loss, kd_loss
from .options import KDOptions


class _KDModule(torch.nn.Module):
    _fn = None

    def __init__(self, **options):
        super().__init__()
        # Validate once, early, with the same dataclass the functions use.
        KDOptions(**{k: v for k, v in options.items()
                     if k in KDOptions.__dataclass_fields__ and v is not None})
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class KDLoss(_KDModule):
    """Module form of kdkernels.kd_loss: forward(student_logits, teacher_logits, labels=None)."""

    def forward(self, student_logits, teacher_logits, labels=None, normalizer=None):
        return kd_loss(student_logits, teacher_logits, labels=labels, normalizer=normalizer, **self.options)


class FusedLinearKDLoss(_KDModule):
    """Module form of fused_linear_kd_loss: forward(student_hidden, student_weight, teacher_hidden,
    teacher_weight, labels=None, student_bias=None, teacher_bias=None)."""

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
                student_bias=None, teacher_bias=None, normalizer=None):
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                    labels=labels, student_bias=student_bias,
                                    teacher_bias=teacher_bias, normalizer=normalizer, **self.options)


class FusedLinearSparseKDLoss(_KDModule):
    """Module form of fused_linear_sparse_kd_loss: forward(student_hidden, student_weight,
    teacher_ids, teacher_values, labels=None, student_bias=None)."""

    def forward(self, student_hidden, student_weight, teacher_ids, teacher_values, labels=None,
                student_bias=None, normalizer=None):
        return fused_linear_sparse_kd_loss(student_hidden, student_weight, teacher_ids,
                                           teacher_values, labels=labels, student_bias=student_bias,
                                           normalizer=normalizer, **self.options)
