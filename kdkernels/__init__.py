"""kdkernels: memory-efficient knowledge-distillation losses and teacher caches for
large-vocabulary language models. Semantics: docs/semantics.md."""
from .dispatch import BackendUnavailable, available_backends
from .heads import Sample, TopK, linear_sample, linear_topk
from .losses import fused_linear_kd_loss, fused_linear_sparse_kd_loss, kd_loss
from .modules import FusedLinearKDLoss, FusedLinearSparseKDLoss, KDLoss
from .options import DIVERGENCES, TAILS, KDOptions

__version__ = "0.1.0"

__all__ = ["kd_loss", "fused_linear_kd_loss", "fused_linear_sparse_kd_loss", "linear_topk",
           "linear_sample", "TopK", "Sample", "KDLoss", "FusedLinearKDLoss",
           "FusedLinearSparseKDLoss", "KDOptions", "DIVERGENCES", "TAILS", "available_backends",
           "BackendUnavailable", "__version__"]
