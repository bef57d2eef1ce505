"""Hugging Face integration: `KDTrainer`, a `transformers.Trainer` whose loss is the fused KD loss.

    from kdkernels.hf import KDTrainer, kd_collator
    trainer = KDTrainer(model=student, args=TrainingArguments(...), train_dataset=cache_examples,
                        data_collator=kd_collator(pad_id), kd_weight=1.0, ce_weight=0.5,
                        temperature=reader.temperature, values=reader.values)   # or teacher=model
    trainer.train()

`compute_loss` never calls the student's LM head: it takes the body's final hidden states and calls
fused_linear_sparse_kd_loss (batches with `teacher_ids`/`teacher_values`) or fused_linear_kd_loss
(`teacher=` a live model). Batches carry labels that are already aligned with the rows (labels[t] is
token t+1, see kdkernels.train.data); kd_collator also puts them under `shift_labels`, which the
Trainer uses as-is to count `num_items_in_batch` over all gradient-accumulation micro-batches: that
count is passed as `normalizer=`, so accumulation matches one large batch.

transformers is imported when this module is, never by `import kdkernels`.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers import Trainer

from .train.data import collate
from .train.model_parts import lm_parts
from .train.objective import Objective, micro_batch_loss

TEACHER_COLUMNS = ("teacher_ids", "teacher_values", "teacher_logprob_next", "domain")


def kd_collator(pad_id: int = 0, ignore_index: int = -100):
    """Collate examples (input_ids, optional teacher_ids/teacher_values) into a KDTrainer batch."""
    def fn(examples):
        batch = collate(examples, pad_id, ignore_index)
        batch["shift_labels"] = batch["labels"]   # already aligned: Trainer counts them as-is
        return batch
    return fn


class KDTrainer(Trainer):
    def __init__(self, *args, teacher: Optional[torch.nn.Module] = None, kd_weight: float = 1.0,
                 ce_weight: float = 0.0, divergence: str = "forward_kl", temperature: float = 1.0,
                 tail: str = "bucket", values: str = "logprobs", ignore_index: int = -100,
                 backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = Objective(kd_weight=kd_weight, ce_weight=ce_weight, divergence=divergence,
                                   temperature=temperature, tail=tail, values=values,
                                   ignore_index=ignore_index, backend=backend)
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            teacher.to(self.args.device)

    def _set_signature_columns_if_needed(self):
        # Keep the cached teacher's columns when remove_unused_columns=True drops the others.
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None:
            self._signature_columns = list(dict.fromkeys([*self._signature_columns, *TEACHER_COLUMNS]))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student = lm_parts(self.accelerator.unwrap_model(model))
        teacher = lm_parts(self.teacher) if self.teacher is not None else None
        normalizer = None
        if num_items_in_batch is not None:
            normalizer = torch.as_tensor(num_items_in_batch, dtype=torch.float32,
                                         device=inputs["input_ids"].device).reshape(-1)[0].clamp_min(1)
        loss, _ = micro_batch_loss(student, inputs, self.objective, teacher=teacher,
                                   normalizer=normalizer)
        return (loss, {"loss": loss}) if return_outputs else loss
