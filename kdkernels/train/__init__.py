"""Distillation training with the fused losses: `kdkernels.train.train(model, data, TrainConfig())`.

The student's full logits are never formed: the loop takes the final hidden states from the model
body and calls fused_linear_sparse_kd_loss (cached teacher) or fused_linear_kd_loss (live teacher)
with the LM head's weight. See docs/training.md.
"""
from .data import StepSampler, collate
from .evaluate import evaluate
from .loop import TrainConfig, TrainResult, lr_factor, peak_memory_bytes, train
from .lora import save_adapter, wrap_lora
from .model_parts import LMParts, final_hidden, lm_parts
from .objective import Objective, micro_batch_loss, teacher_ce_rows

__all__ = ["train", "TrainConfig", "TrainResult", "evaluate", "collate", "StepSampler", "Objective",
           "micro_batch_loss", "teacher_ce_rows", "lm_parts", "final_hidden", "LMParts", "lr_factor",
           "peak_memory_bytes", "wrap_lora", "save_adapter"]
