"""Argument checks shared by the public ops. Each error names the argument and the expected form.

Checks that read tensor values (ids in range, finite values) synchronize with the device once per
forward call; set KDKERNELS_CHECK_VALUES=0 to skip them (e.g. under CUDA graphs). Backward never
checks anything.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_values_enabled() -> bool:
    return os.environ.get("KDKERNELS_CHECK_VALUES", "1") != "0"


def tensor(name: str, t, ndim: Optional[int] = None, min_ndim: Optional[int] = None,
           floating: bool = False, integer: bool = False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, float16, bfloat16), got {t.dtype}")
    if integer and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    return t


def same_device(**named: Optional[torch.Tensor]) -> torch.device:
    devs = {k: v.device for k, v in named.items() if v is not None}
    first = next(iter(devs.values()))
    for k, d in devs.items():
        if d != first:
            listing = ", ".join(f"{n}={dv}" for n, dv in devs.items())
            raise ValueError(f"all tensors must be on one device; got {listing}")
    return first


def same_dtype(a_name: str, a: torch.Tensor, b_name: str, b: Optional[torch.Tensor]) -> None:
    if b is not None and a.dtype != b.dtype:
        raise TypeError(f"{b_name} must have the dtype of {a_name} ({a.dtype}), got {b.dtype}")


def rows_match(n: int, **named: Optional[torch.Tensor]) -> None:
    for k, v in named.items():
        if v is not None and v.shape[0] != n:
            raise ValueError(f"{k} must have {n} rows (one per token), got shape {tuple(v.shape)}")


def common_vocab(student_v: int, teacher_v: int, vocab_size: Optional[int]) -> int:
    if vocab_size is None:
        if student_v != teacher_v:
            raise ValueError(f"student vocabulary size {student_v} != teacher vocabulary size "
                             f"{teacher_v}; pass vocab_size= to use their common prefix")
        return student_v
    if vocab_size > min(student_v, teacher_v):
        raise ValueError(f"vocab_size={vocab_size} exceeds a vocabulary (student {student_v}, "
                         f"teacher {teacher_v})")
    return vocab_size


def labels_in_range(labels: torch.Tensor, mask: torch.Tensor, vocab: int) -> None:
    if not check_values_enabled() or labels.numel() == 0:
        return
    bad = mask & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index; labels[{i}] = "
                         f"{int(labels[i])}")


def sparse_teacher(ids: torch.Tensor, vals: torch.Tensor, vocab: int, values: str) -> None:
    if not check_values_enabled() or ids.numel() == 0:
        return
    if bool(((ids < -1) | (ids >= vocab)).any()):
        bad = ((ids < -1) | (ids >= vocab)).nonzero()[0].tolist()
        raise ValueError(f"teacher_ids must be in [0, {vocab}) or -1 (empty slot); "
                         f"teacher_ids{bad} = {int(ids[tuple(bad)])}")
    valid = ids >= 0
    v = vals.float()
    if values == "logprobs":
        bad = valid & (torch.isnan(v) | (v > 1e-3))
        if bool(bad.any()):
            raise ValueError("teacher_values with values='logprobs' must be log-probabilities "
                             "(<= 0, not NaN) at valid ids; did you pass probabilities or weights? "
                             "(values='weights')")
    else:
        bad = valid & (~torch.isfinite(v) | (v < 0))
        if bool(bad.any()):
            raise ValueError("teacher_values with values='weights' must be finite and >= 0 "
                             "(count / draws); did you pass log-probs? (values='logprobs')")
        sums = torch.where(valid, v, 0.0).sum(1)
        has = valid.any(1)
        if bool((has & ((sums - 1).abs() > 1e-3)).any()):
            raise ValueError("teacher_values with values='weights' must sum to 1 over each row's "
                             "valid ids (count / draws); did you pass log-probs? (values='logprobs')")
    if ids.shape[1] > 1:
        srt = torch.sort(ids, 1).values
        dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
        if bool(dup.any()):
            raise ValueError("teacher_ids must be distinct within a row (apart from -1 empty slots)")


def finite_loss(loss_rows: torch.Tensor, mask: torch.Tensor, what: str) -> None:
    """NaN in a counted row means NaN in the inputs: say so instead of returning NaN."""
    if not check_values_enabled():
        return
    if bool((mask & torch.isnan(loss_rows)).any()):
        i = int((mask & torch.isnan(loss_rows)).nonzero()[0, 0])
        raise ValueError(f"the loss of row {i} is NaN: {what} contain NaN in a counted row "
                         f"(rows whose label is ignore_index may hold anything)")
