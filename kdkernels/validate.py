"""Argument checks shared by the public ops. Each error names the argument and the expected form.

Checks that read tensor values (ids in range, finite values) synchronize with the device once per
forward call; set KDKERNELS_CHECK_VALUES=0 to skip them (e.g. under CUDA graphs). They never read
meta tensors (shape-only tracing passes through). Backward never checks anything.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_values_enabled() -> bool:
    return os.environ.get("KDKERNELS_CHECK_VALUES", "1") != "0"


def _skip_values(*ts: Optional[torch.Tensor]) -> bool:
    """True when value checks must not read these tensors: checks switched off, or a meta tensor
    (shape-only: nothing to read, and .item() would raise)."""
    return not check_values_enabled() or any(t is not None and t.device.type == "meta" for t in ts)


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


def teacher_dtype(student_name: str, student: torch.Tensor, **teacher: Optional[torch.Tensor]) -> None:
    """A dense teacher's floating tensors must have the student's dtype: backends compute each side in
    its own dtype and some cannot mix them (float64 with float32, notably), so say so up front."""
    for name, t in teacher.items():
        if (isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES and t.dtype != student.dtype):
            raise TypeError(f"{name} has dtype {t.dtype} but {student_name} has {student.dtype}: the "
                            f"teacher must have the student's dtype; pass {name}.to({student.dtype})")


def values_dtype(student_dtype: torch.dtype) -> torch.dtype:
    """The dtype sparse teacher_values are cast to before any backend sees them (they are data, not
    parameters): float64 for a float64 student, else float32."""
    return torch.float64 if student_dtype == torch.float64 else torch.float32


def nonempty(name: str, size: int, what: str) -> None:
    """A size that must be >= 1 (vocabulary, hidden size, slots per row): name it instead of failing
    in a reshape of an empty tensor."""
    if size < 1:
        raise ValueError(f"{name} has {what} = {size}; it must be at least 1")


def normalizer(value, device: torch.device) -> torch.Tensor:
    """reduction='mean''s denominator from `normalizer=`: a finite number > 0, or a single-element
    tensor (shape () or (1,)) whose value is checked like one when value checks are on (a host sync;
    KDKERNELS_CHECK_VALUES=0 skips it, and meta tensors are never read). Returned as a float32 0-dim
    tensor on `device`."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(f"normalizer must be a number or a single-element tensor (shape () or "
                             f"(1,)), got a tensor of shape {tuple(value.shape)}")
        if value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"normalizer must be a real number, got a {value.dtype} tensor")
        if not _skip_values(value):
            x = float(value.reshape(()))
            if not (math.isfinite(x) and x > 0):
                raise ValueError(f"normalizer must be a finite number > 0 (the number of counted "
                                 f"tokens of the whole batch), got {x!r}")
        return value.to(dtype=torch.float32, device=device).reshape(())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"normalizer must be a number or a single-element tensor, got "
                        f"{type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"normalizer must be a finite number > 0 (the number of counted tokens of "
                         f"the whole batch), got {value!r}")
    return torch.tensor(float(value), dtype=torch.float32, device=device)


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
    if _skip_values(labels, mask) or labels.numel() == 0:
        return
    bad = mask & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index; labels[{i}] = "
                         f"{int(labels[i])}")


# values="logprobs": how far LSE over a row's valid ids of the stored log-probs may exceed log 1 = 0.
# The true top-k mass is <= 1, so what is allowed is rounding of the stored values:
#  - LOGPROB_QUANT_NATS: every value of a compact teacher cache (docs/cache-format.md, "q_rice" at the
#    default value_step = 1/64) decodes to within step/2 = 1/128 nat of the true log-prob, upwards
#    included (a top log-prob of -0.003 decodes to 0), so decoded top-k masses of a confident teacher
#    reach exp(1/128) ~ 1.0079. Caches built with a larger value_step can exceed it.
#  - LOGPROB_ULPS * k * eps(dtype): each float value v_i rounds by eps/2 * |v_i|, which moves
#    exp(v_i) by p_i |v_i| eps/2 <= eps/(2e); summed over k slots, plus the summation (done in float64
#    here), this stays below k * eps; the factor leaves room for the log-softmax that produced them.
# The typical mistakes are far above it: probabilities passed as log-probs (v > 0 by up to 1 nat),
# or log-probs of different distributions (3 slots at log 0.6: LSE = log 1.8 = 0.59 nat).
LOGPROB_QUANT_NATS = 1.0 / 128.0
LOGPROB_ULPS = 4.0


def logprob_tolerance(k: int, dtype: torch.dtype) -> float:
    """The nats by which LSE over a row's valid log-probs may exceed 0 (see the note above)."""
    return LOGPROB_QUANT_NATS + LOGPROB_ULPS * k * torch.finfo(dtype).eps


def sparse_teacher(ids: torch.Tensor, vals: torch.Tensor, vocab: int, values: str) -> None:
    if _skip_values(ids, vals) or ids.numel() == 0:
        return
    if bool(((ids < -1) | (ids >= vocab)).any()):
        bad = ((ids < -1) | (ids >= vocab)).nonzero()[0].tolist()
        raise ValueError(f"teacher_ids must be in [0, {vocab}) or -1 (empty slot); "
                         f"teacher_ids{bad} = {int(ids[tuple(bad)])}")
    valid = ids >= 0
    if values == "logprobs":
        tol = logprob_tolerance(ids.shape[1], vals.dtype)
        v = vals.double()
        bad = valid & (torch.isnan(v) | (v > tol))
        if bool(bad.any()):
            raise ValueError("teacher_values with values='logprobs' must be log-probabilities "
                             "(<= 0, not NaN) at valid ids; did you pass probabilities or weights? "
                             "(values='weights')")
        lse = torch.logsumexp(torch.where(valid, v, -math.inf), 1)
        if bool((lse > tol).any()):
            i = int((lse > tol).nonzero()[0, 0])
            raise ValueError(f"teacher_values with values='logprobs' must be log-probabilities of one "
                             f"distribution: their probabilities at a row's valid ids sum to at most 1 "
                             f"(within {math.expm1(tol):.2g}, rounding), but row {i} sums to "
                             f"{math.exp(float(lse[i])):.6g}")
    else:
        v = vals.float()
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
    if _skip_values(loss_rows, mask):
        return
    if bool((mask & torch.isnan(loss_rows)).any()):
        i = int((mask & torch.isnan(loss_rows)).nonzero()[0, 0])
        raise ValueError(f"the loss of row {i} is NaN: {what} contain NaN in a counted row "
                         f"(rows whose label is ignore_index may hold anything)")


def finite_lse(lse: torch.Tensor, what: str) -> None:
    """linear_topk / linear_sample: a row whose log-sum-exp is NaN or infinite has no distribution
    (NaN or inf in its logits); its ids and log-probs or samples would be garbage, so raise."""
    if _skip_values(lse) or lse.numel() == 0:
        return
    bad = ~torch.isfinite(lse)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"row {i} has no distribution (its log-sum-exp is {float(lse[i])}): {what} "
                         f"contain NaN or inf")
