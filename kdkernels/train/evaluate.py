"""Held-out metrics without logits: student perplexity and KL(teacher || student) per token.

    ppl = exp( sum_t CE(student_t, label_t) / n )
    kl  = sum_t KL(p_t || q_t) / n        over the n counted tokens, at temperature 1

With a live teacher the KL is exact over the full vocabulary (fused_linear_kd_loss); with cached
top-k slots it is the k+1-outcome "bucket" value of docs/semantics.md (a lower bound of the full
KL, by the data-processing inequality).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from ..losses import fused_linear_kd_loss, fused_linear_sparse_kd_loss
from .data import collate
from .model_parts import LMParts, final_hidden, lm_parts
from .objective import _no_teacher_slots


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Sequence[dict], *, teacher=None,
             batch_size: int = 8, values: str = "logprobs", ignore_index: int = -100, pad_id: int = 0,
             backend: Optional[str] = None, collate_fn: Optional[Callable] = None) -> dict:
    """{'ppl', 'ce', 'kl', 'teacher_ppl' (live teacher only), 'tokens'} on `data`.

    `teacher` is a causal LM or its LMParts; examples may carry precomputed `teacher_hidden`
    (L, Ht) final hidden states, which then replace the teacher body's forward pass."""
    was_training = model.training
    model.eval()
    s = lm_parts(model)
    t = teacher if teacher is None or isinstance(teacher, LMParts) else lm_parts(teacher.eval())
    collate_fn = collate_fn or (lambda ex: collate(ex, pad_id, ignore_index))
    device = s.weight.device
    ce = kl = tce = 0.0
    n = 0
    for i in range(0, len(data), batch_size):
        examples = [data[j] for j in range(i, min(i + batch_size, len(data)))]
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate_fn(examples).items()}
        labels = b["labels"].reshape(-1)
        hs = final_hidden(s, b["input_ids"], b["attention_mask"]).reshape(labels.shape[0], -1)
        empty = _no_teacher_slots(hs.shape[0], device)
        kw = dict(labels=labels, ignore_index=ignore_index, reduction="sum", backend=backend)
        ce += float(fused_linear_sparse_kd_loss(hs, s.weight.to(hs.dtype), *empty, ce_weight=1.0,
                                                kd_weight=0.0, student_softcap=s.softcap, **kw))
        if t is not None:
            if "teacher_hidden" in examples[0]:   # equal lengths: stack the stored states
                ht = torch.stack([e["teacher_hidden"] for e in examples]).to(device)
            else:
                ht = final_hidden(t, b["input_ids"], b["attention_mask"])
            ht = ht.reshape(labels.shape[0], -1)
            kl += float(fused_linear_kd_loss(hs, s.weight.to(hs.dtype), ht, t.weight.to(ht.dtype),
                                             student_softcap=s.softcap, teacher_softcap=t.softcap, **kw))
            tce += float(fused_linear_sparse_kd_loss(ht, t.weight.to(ht.dtype), *empty, ce_weight=1.0,
                                                     kd_weight=0.0, student_softcap=t.softcap, **kw))
        elif "teacher_ids" in b:
            ids = b["teacher_ids"].reshape(labels.shape[0], -1)
            vals = b["teacher_values"].reshape(labels.shape[0], -1)
            kl += float(fused_linear_sparse_kd_loss(hs, s.weight.to(hs.dtype), ids, vals, values=values,
                                                    student_softcap=s.softcap, **kw))
        else:
            kl = math.nan
        n += int((labels != ignore_index).sum())
    model.train(was_training)
    n = max(n, 1)
    out = {"ce": ce / n, "ppl": math.exp(ce / n), "kl": kl / n, "tokens": n}
    if t is not None:
        out["teacher_ppl"] = math.exp(tce / n)
    return out
