"""torch.nn.Module wrappers: the options are fixed at construction, the tensors go to forward."""
from __future__ import annotations

import inspect

import torch

from .dispatch import BACKENDS
from .losses import fused_linear_kd_loss, fused_linear_sparse_kd_loss, kd_loss
from .options import REDUCTIONS, KDOptions


class _KDModule(torch.nn.Module):
    _fn = None   # the wrapped public function (a staticmethod in each subclass)

    @classmethod
    def accepted_options(cls) -> tuple[str, ...]:
        """The wrapped function's keyword parameters, less the tensors that forward() takes."""
        tensors = set(inspect.signature(cls.forward).parameters)
        return tuple(n for n, p in inspect.signature(cls._fn).parameters.items()
                     if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in tensors)

    def __init__(self, **options):
        super().__init__()
        # Validate once, early, as the function would at its first call: names, then values.
        accepted = self.accepted_options()
        for k in options:
            if k not in accepted:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {k!r}; "
                                f"it accepts {', '.join(accepted)}")
        reduction = options.get("reduction", "mean")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        backend = options.get("backend")
        if backend is not None and backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
        KDOptions(**{k: v for k, v in options.items()
                     if k in KDOptions.__dataclass_fields__ and v is not None})
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class KDLoss(_KDModule):
    """Module form of kdkernels.kd_loss: forward(student_logits, teacher_logits, labels=None)."""
    _fn = staticmethod(kd_loss)

    def forward(self, student_logits, teacher_logits, labels=None, normalizer=None):
        return kd_loss(student_logits, teacher_logits, labels=labels, normalizer=normalizer, **self.options)


class FusedLinearKDLoss(_KDModule):
    """Module form of fused_linear_kd_loss: forward(student_hidden, student_weight, teacher_hidden,
    teacher_weight, labels=None, student_bias=None, teacher_bias=None)."""
    _fn = staticmethod(fused_linear_kd_loss)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
                student_bias=None, teacher_bias=None, normalizer=None):
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                    labels=labels, student_bias=student_bias,
                                    teacher_bias=teacher_bias, normalizer=normalizer, **self.options)


class FusedLinearSparseKDLoss(_KDModule):
    """Module form of fused_linear_sparse_kd_loss: forward(student_hidden, student_weight,
    teacher_ids, teacher_values, labels=None, student_bias=None)."""
    _fn = staticmethod(fused_linear_sparse_kd_loss)

    def forward(self, student_hidden, student_weight, teacher_ids, teacher_values, labels=None,
                student_bias=None, normalizer=None):
        return fused_linear_sparse_kd_loss(student_hidden, student_weight, teacher_ids,
                                           teacher_values, labels=labels, student_bias=student_bias,
                                           normalizer=normalizer, **self.options)
