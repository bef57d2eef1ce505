"""The loss of one micro-batch: student body -> hidden states -> fused KD loss against the teacher.

    loss_row(t) = kd_weight * T^2 * D(p_t, q_t) + ce_weight * CE(student_t, labels[t])
    loss        = sum over counted rows of every micro-batch / normalizer

p_t is the teacher's distribution at row t: from cached slots (`teacher_ids`, `teacher_values` in
the batch; fused_linear_sparse_kd_loss) or from a live teacher model's hidden states and LM head
(fused_linear_kd_loss). q_t comes from the student's hidden state and head weight; the (N, V)
logits of neither model are ever formed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..losses import fused_linear_kd_loss, fused_linear_sparse_kd_loss
from .model_parts import LMParts, final_hidden


@dataclass(frozen=True)
class Objective:
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    divergence: str = "forward_kl"
    temperature: float = 1.0
    tail: str = "bucket"
    values: str = "logprobs"        # what cached teacher_values hold (the cache reader says)
    ignore_index: int = -100
    backend: Optional[str] = None
    mu: float = 0.5                  # divergence="akl" (docs/semantics.md, "Adaptive KL")


def _match(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    # Under autocast the body returns bf16 hidden states while the master weight stays fp32; the
    # fused losses want one dtype, so cast the weight (differentiably: grads reach the fp32 weight).
    return w if w.dtype == h.dtype else w.to(h.dtype)


def _no_teacher_slots(n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    # One empty slot per row: the sparse KD term is exactly 0 (tail P = Q = 1), only CE remains.
    return (torch.full((n, 1), -1, dtype=torch.long, device=device),
            torch.zeros((n, 1), dtype=torch.float32, device=device))


def micro_batch_loss(student: LMParts, batch: dict, obj: Objective, *,
                     teacher: Optional[LMParts] = None,
                     normalizer: Optional[torch.Tensor] = None,
                     per_row: bool = False):
    """(loss, rows): loss = sum of this micro-batch's counted row losses / normalizer (the global
    token count), rows = the detached (N,) per-row losses when per_row (for DDK), else None."""
    hs = final_hidden(student, batch["input_ids"], batch.get("attention_mask"))
    hs = hs.reshape(-1, hs.shape[-1])
    labels = batch["labels"].reshape(-1)
    common = dict(divergence=obj.divergence, temperature=obj.temperature, labels=labels,
                  ignore_index=obj.ignore_index, ce_weight=obj.ce_weight, kd_weight=obj.kd_weight,
                  backend=obj.backend)
    if obj.divergence == "akl":
        common["mu"] = obj.mu
    common.update(reduction="none") if per_row else common.update(reduction="mean",
                                                                    normalizer=normalizer)
    ws = _match(student.weight, hs)
    bs = None if student.bias is None else _match(student.bias, hs)
    if teacher is not None:
        with torch.no_grad():
            ht = final_hidden(teacher, batch["input_ids"], batch.get("attention_mask"))
            ht = ht.reshape(-1, ht.shape[-1])
        out = fused_linear_kd_loss(hs, ws, ht, _match(teacher.weight, ht), student_bias=bs,
                                   teacher_bias=None if teacher.bias is None else _match(teacher.bias, ht),
                                   student_softcap=student.softcap, teacher_softcap=teacher.softcap,
                                   **common)
    else:
        if "teacher_ids" in batch:
            ids = batch["teacher_ids"].reshape(hs.shape[0], -1)
            vals = batch["teacher_values"].reshape(hs.shape[0], -1)
        elif obj.kd_weight == 0:
            ids, vals = _no_teacher_slots(hs.shape[0], hs.device)
        else:
            raise ValueError("kd_weight > 0 needs a teacher: cached teacher_ids/teacher_values in the "
                             "batch, or teacher= (a live model)")
        out = fused_linear_sparse_kd_loss(hs, ws, ids, vals, values=obj.values, tail=obj.tail,
                                          student_bias=bs, student_softcap=student.softcap, **common)
    if not per_row:
        return out, None
    denom = normalizer if normalizer is not None else (labels != obj.ignore_index).sum().clamp_min(1)
    return out.sum() / denom, out.detach()


@torch.no_grad()
def teacher_ce_rows(batch: dict, obj: Objective, teacher: Optional[LMParts] = None) -> torch.Tensor:
    """(N,) the teacher's cross-entropy -log p(label) per row, 0 at ignored rows.

    Live teacher: exact, streamed through the fused loss (CE only, T = 1). Caches built by
    kdkernels.cache store `teacher_logprob_next` = log p_teacher(label) at the cache temperature:
    exact. Other cached slots: top-k -> exact when the label is among the ids, else the lower bound
    -log(tail mass); sampled -> -log(weight) at the label, or -log(smallest weight) when the label
    was not drawn (estimates; see docs/training.md)."""
    labels = batch["labels"].reshape(-1)
    counted = labels != obj.ignore_index
    if teacher is not None:
        ht = final_hidden(teacher, batch["input_ids"], batch.get("attention_mask"))
        ht = ht.reshape(-1, ht.shape[-1])
        ids, vals = _no_teacher_slots(ht.shape[0], ht.device)
        return fused_linear_sparse_kd_loss(ht, teacher.weight.to(ht.dtype), ids, vals, labels=labels,
                                           ignore_index=obj.ignore_index, ce_weight=1.0, kd_weight=0.0,
                                           reduction="none", backend=obj.backend)
    if "teacher_logprob_next" in batch:
        lp = batch["teacher_logprob_next"].reshape(-1).float()
        return torch.where(counted, -torch.nan_to_num(lp, nan=0.0), 0.0)
    ids = batch["teacher_ids"].reshape(labels.shape[0], -1)
    vals = batch["teacher_values"].reshape(labels.shape[0], -1).float()
    valid = ids >= 0
    hit = (ids == labels[:, None]) & valid
    if obj.values == "logprobs":
        at_label = torch.where(hit, vals, 0.0).sum(1)
        mass = torch.where(valid, vals, -torch.inf).logsumexp(1)
        tail = torch.log(-torch.expm1(mass.clamp(max=-1e-7)))      # log(1 - sum_K p)
        ce = torch.where(hit.any(1), -at_label, -tail)
    else:
        w = torch.where(hit, vals, 0.0).sum(1)
        floor = torch.where(valid, vals, torch.inf).amin(1).clamp(max=1.0)
        ce = -torch.log(torch.where(w > 0, w, floor))
    return torch.where(counted, ce, 0.0)
