"""Public loss functions: argument checks, rows and reductions, then the one backend-agnostic
autograd Function of kdkernels/function.py.

Backends compute per-row losses (and per-row statistics, or the gradients directly on the fused path)
(docs/backends.md); everything about ignore_index, reductions and normalizers lives here, once, for all
backends.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import function as F
from . import validate as V
from .dispatch import resolve
from .options import REDUCTIONS, KDOptions

Number = Union[int, float]


def _options(**kw) -> KDOptions:
    opts = KDOptions(**{k: v for k, v in kw.items() if v is not None})
    if opts.divergence == "akl" and not opts.kd_weight:   # no KD term: nothing to weigh
        import dataclasses
        opts = dataclasses.replace(opts, divergence="forward_kl")
    return opts


def _op_name(op: str, opts: KDOptions) -> str:
    """The op as dispatch knows it: backends may lack divergence='akl' (docs/backends.md)."""
    return f"{op}(divergence='akl')" if opts.divergence == "akl" else op


def _options_from(args: dict) -> KDOptions:
    """The KDOptions among a public function's arguments (its locals())."""
    return _options(**{k: args[k] for k in KDOptions.__dataclass_fields__ if k in args})


def check_logits_args(a: dict) -> tuple[torch.device, KDOptions]:
    """Argument checks of kd_loss (also used by its vocab-parallel form); a = the call's locals()."""
    zs, zt, labels = a["student_logits"], a["teacher_logits"], a["labels"]
    V.tensor("student_logits", zs, min_ndim=1, floating=True)
    V.tensor("teacher_logits", zt, min_ndim=1, floating=True)
    V.teacher_dtype("student_logits", zs, teacher_logits=zt)
    if a.get("process_group") is None:    # a vocabulary shard may hold no column
        V.nonempty("student_logits", zs.shape[-1], "vocabulary size V (last dim)")
        V.nonempty("teacher_logits", zt.shape[-1], "vocabulary size V (last dim)")
    if zs.shape[:-1] != zt.shape[:-1]:
        raise ValueError(f"student_logits {tuple(zs.shape)} and teacher_logits "
                         f"{tuple(zt.shape)} must have the same leading (row) shape")
    if labels is not None:
        V.tensor("labels", labels, integer=True)
    device = V.same_device(student_logits=zs, teacher_logits=zt, labels=labels)
    return device, _options_from(a)


def check_linear_args(a: dict) -> tuple[torch.device, KDOptions]:
    """Argument checks of fused_linear_kd_loss (and its vocab-parallel form)."""
    hs, ht, labels = a["student_hidden"], a["teacher_hidden"], a["labels"]
    _check_head("student", hs, a["student_weight"], a["student_bias"])
    V.teacher_dtype("student_hidden", hs, teacher_hidden=ht, teacher_weight=a["teacher_weight"],
                    teacher_bias=a["teacher_bias"])
    _check_head("teacher", ht, a["teacher_weight"], a["teacher_bias"])
    for side, h in (("student", hs), ("teacher", ht)):
        V.nonempty(f"{side}_hidden", h.shape[-1], "hidden size (last dim)")
        if a.get("process_group") is None:    # a vocabulary shard may hold no row
            V.nonempty(f"{side}_weight", a[f"{side}_weight"].shape[0], "vocabulary size V (rows)")
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(f"student_hidden {tuple(hs.shape)} and teacher_hidden "
                         f"{tuple(ht.shape)} must have the same leading (row) shape")
    if labels is not None:
        V.tensor("labels", labels, integer=True)
    device = V.same_device(**{k: a[k] for k in ("student_hidden", "student_weight", "student_bias",
                                                 "teacher_hidden", "teacher_weight", "teacher_bias",
                                                 "labels")})
    return device, _options_from(a)


def check_sparse_args(a: dict) -> tuple[torch.device, KDOptions]:
    """Argument checks of fused_linear_sparse_kd_loss (and its vocab-parallel form)."""
    hs, ids, vals, labels = a["student_hidden"], a["teacher_ids"], a["teacher_values"], a["labels"]
    _check_head("student", hs, a["student_weight"], a["student_bias"])
    V.nonempty("student_hidden", hs.shape[-1], "hidden size (last dim)")
    if a.get("process_group") is None:    # a vocabulary shard may hold no row
        V.nonempty("student_weight", a["student_weight"].shape[0], "vocabulary size V (rows)")
    V.tensor("teacher_ids", ids, min_ndim=1, integer=True)
    V.tensor("teacher_values", vals, min_ndim=1, floating=True)
    if ids.shape != vals.shape:
        raise ValueError(f"teacher_ids {tuple(ids.shape)} and teacher_values "
                         f"{tuple(vals.shape)} must have the same shape")
    if ids.shape[:-1] != hs.shape[:-1]:
        raise ValueError(f"teacher_ids {tuple(ids.shape)} must be (*rows, k) with the rows of "
                         f"student_hidden {tuple(hs.shape[:-1])}")
    V.nonempty("teacher_ids", ids.shape[-1], "k (slots per row, last dim)")
    if labels is not None:
        V.tensor("labels", labels, integer=True)
    device = V.same_device(**{k: a[k] for k in ("student_hidden", "student_weight", "student_bias",
                                                 "teacher_ids", "teacher_values", "labels")})
    opts = _options_from(a)
    opts.check_sparse()
    return device, opts


class _Rows:
    """Which rows count, the CE labels handed to backends (-1 = no CE term), the denominator."""

    def __init__(self, labels: Optional[torch.Tensor], n: int, device: torch.device, opts: KDOptions,
                 reduction: str, normalizer, vocab: int):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if labels is None:
            if opts.ce_weight:
                raise ValueError("ce_weight > 0 needs labels= (the hard next-token targets)")
            self.mask = torch.ones(n, dtype=torch.bool, device=device)
            self.ce_labels = torch.full((n,), -1, dtype=torch.int64, device=device)
        else:
            labels = labels.reshape(-1)
            if labels.shape[0] != n:
                raise ValueError(f"labels must hold one entry per row ({n}), got {labels.shape[0]}")
            self.mask = labels != opts.ignore_index
            V.labels_in_range(labels, self.mask, vocab) if opts.ce_weight else None
            self.ce_labels = torch.where(self.mask, labels.long(), -1) if opts.ce_weight else \
                torch.full((n,), -1, dtype=torch.int64, device=device)
        self.reduction = reduction
        if normalizer is not None:
            if reduction != "mean":
                raise ValueError("normalizer= only applies to reduction='mean'")
            self.denom = V.normalizer(normalizer, device)
        else:
            self.denom = self.mask.sum().clamp_min(1).to(torch.float32)

    def reduce(self, loss_rows: torch.Tensor, lead_shape) -> torch.Tensor:
        loss_rows = torch.where(self.mask, loss_rows, 0.0)
        if self.reduction == "none":
            return loss_rows.reshape(lead_shape)
        total = loss_rows.sum()
        return total / self.denom if self.reduction == "mean" else total

    grad_rows = staticmethod(F.row_gradient)


def _flatten_rows(name: str, t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _vocab_parallel(op: str, args: dict) -> torch.Tensor:
    """process_group= given: each rank holds a vocabulary shard (docs/scaling.md)."""
    if args.get("divergence") == "akl":
        raise NotImplementedError("divergence='akl' with process_group= (vocabulary-parallel heads) is "
                                  "not implemented: the teacher's head set would need a distributed "
                                  "top-k; run AKL without process_group")
    from .distributed import vocab_parallel
    args = {k: v for k, v in args.items() if k not in ("mu", "akl_head_max")}
    return getattr(vocab_parallel, op)(**args)


# --------------------------------------------------------------------------------------------------
# kd_loss: logits-level


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
            divergence: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
            alpha: float = 0.1, mu: float = 0.5, akl_head_max: int = 256,
            scale_by_temperature_squared: bool = True,
            labels: Optional[torch.Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
            normalizer: Optional[Union[Number, torch.Tensor]] = None, ce_weight: float = 0.0,
            kd_weight: float = 1.0, vocab_size: Optional[int] = None, backend: Optional[str] = None,
            chunk_bytes: Optional[int] = None, process_group=None) -> torch.Tensor:
    """Distillation loss between student and teacher logits of shape (..., V), streaming over V.

    Gradients flow to `student_logits` only. See docs/semantics.md for the exact definition.
    With `process_group`, each rank holds the columns of its vocabulary shard (docs/scaling.md).
    """
    if process_group is not None:
        return _vocab_parallel("kd_loss", locals())
    device, opts = check_logits_args(locals())
    lead = student_logits.shape[:-1]
    zs, zt = _flatten_rows("student_logits", student_logits), _flatten_rows("teacher_logits", teacher_logits)
    full_v = zs.shape[1]
    v = V.common_vocab(full_v, zt.shape[1], vocab_size)
    if v != zs.shape[1]:     # (a slice of the whole width would cost an (N, V) copy in backward)
        zs = zs[:, :v]
    if v != zt.shape[1]:
        zt = zt[:, :v]
    rows = _Rows(labels, zs.shape[0], device, opts, reduction, normalizer, v)
    mod = resolve(backend, device.type, _op_name("kd_loss", opts), dtype=zs.dtype)
    return F.apply(F.KD, mod, opts, rows, lead, zs, zt.detach())


# --------------------------------------------------------------------------------------------------
# fused_linear_kd_loss: online dense teacher


def _check_head(prefix: str, h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> None:
    V.tensor(f"{prefix}_hidden", h, min_ndim=1, floating=True)
    V.tensor(f"{prefix}_weight", w, ndim=2, floating=True)
    if h.shape[-1] != w.shape[1]:
        raise ValueError(f"{prefix}_hidden has hidden size {h.shape[-1]} but {prefix}_weight is "
                         f"{tuple(w.shape)} (expected (V, {h.shape[-1]}))")
    V.same_dtype(f"{prefix}_hidden", h, f"{prefix}_weight", w)
    if b is not None:
        V.tensor(f"{prefix}_bias", b, ndim=1, floating=True)
        if b.shape[0] != w.shape[0]:
            raise ValueError(f"{prefix}_bias must have shape ({w.shape[0]},), got {tuple(b.shape)}")


def _cut_head(w: torch.Tensor, b: Optional[torch.Tensor], v: int):
    """The first v rows of an LM head. No slice when v is the whole head: autograd would route the
    gradient through SliceBackward, which allocates and fills a second (V, H) tensor."""
    if v == w.shape[0]:
        return w, b
    return w[:v], (b[:v] if b is not None else None)


def fused_linear_kd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                         teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, *,
                         student_bias: Optional[torch.Tensor] = None,
                         teacher_bias: Optional[torch.Tensor] = None,
                         student_softcap: Optional[float] = None,
                         teacher_softcap: Optional[float] = None,
                         divergence: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
                         alpha: float = 0.1, mu: float = 0.5, akl_head_max: int = 256,
                         scale_by_temperature_squared: bool = True,
                         labels: Optional[torch.Tensor] = None, ignore_index: int = -100,
                         reduction: str = "mean",
                         normalizer: Optional[Union[Number, torch.Tensor]] = None,
                         ce_weight: float = 0.0, kd_weight: float = 1.0,
                         vocab_size: Optional[int] = None, backend: Optional[str] = None,
                         chunk_bytes: Optional[int] = None, process_group=None) -> torch.Tensor:
    """KD loss between softmax(student_hidden @ student_weight.T) and the same for the teacher,
    without materializing either (..., V) logits tensor. Hidden sizes may differ.
    With `process_group`, each rank holds a vocabulary shard of both heads (docs/scaling.md)."""
    if process_group is not None:
        return _vocab_parallel("fused_linear_kd_loss", locals())
    device, opts = check_linear_args(locals())
    lead = student_hidden.shape[:-1]
    hs = _flatten_rows("student_hidden", student_hidden)
    ht = _flatten_rows("teacher_hidden", teacher_hidden)
    full_v = student_weight.shape[0]
    v = V.common_vocab(full_v, teacher_weight.shape[0], vocab_size)
    ws, bs = _cut_head(student_weight, student_bias, v)
    wt, bt = _cut_head(teacher_weight, teacher_bias, v)
    rows = _Rows(labels, hs.shape[0], device, opts, reduction, normalizer, v)
    mod = resolve(backend, device.type, _op_name("fused_linear_kd_loss", opts), dtype=hs.dtype)
    return F.apply(F.LINEAR_KD, mod, opts, rows, lead, hs, ws, bs, ht.detach(), wt.detach(),
                   bt.detach() if bt is not None else None)


# --------------------------------------------------------------------------------------------------
# fused_linear_sparse_kd_loss: cached sparse teacher


def fused_linear_sparse_kd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                                teacher_ids: torch.Tensor, teacher_values: torch.Tensor, *,
                                values: str = "logprobs", tail: str = "bucket",
                                student_bias: Optional[torch.Tensor] = None,
                                student_softcap: Optional[float] = None,
                                divergence: str = "forward_kl", temperature: float = 1.0,
                                beta: float = 0.5, alpha: float = 0.1, mu: float = 0.5,
                                akl_head_max: int = 256, scale_by_temperature_squared: bool = True,
                                labels: Optional[torch.Tensor] = None, ignore_index: int = -100,
                                reduction: str = "mean",
                                normalizer: Optional[Union[Number, torch.Tensor]] = None,
                                ce_weight: float = 0.0, kd_weight: float = 1.0,
                                vocab_size: Optional[int] = None, backend: Optional[str] = None,
                                chunk_bytes: Optional[int] = None, process_group=None) -> torch.Tensor:
    """KD loss of the student head against a cached sparse teacher: per row k ids (-1 = empty slot)
    and their values (full-vocab log-probs, or sampling weights), without materializing logits.
    With `process_group`, each rank holds a vocabulary shard of the head (docs/scaling.md)."""
    if process_group is not None:
        return _vocab_parallel("fused_linear_sparse_kd_loss", locals())
    device, opts = check_sparse_args(locals())
    lead = student_hidden.shape[:-1]
    hs = _flatten_rows("student_hidden", student_hidden)
    ids = _flatten_rows("teacher_ids", teacher_ids).long()
    vals = _flatten_rows("teacher_values", teacher_values).detach().to(V.values_dtype(hs.dtype))
    full_v = student_weight.shape[0]
    v = full_v if vocab_size is None else V.common_vocab(full_v, vocab_size, vocab_size)
    if ids.shape[1] > v:
        raise ValueError(f"teacher_ids has k={ids.shape[1]} slots per row, more than the vocabulary "
                         f"size {v}")
    V.sparse_teacher(ids, vals, v, opts.values)
    ws, bs = _cut_head(student_weight, student_bias, v)
    rows = _Rows(labels, hs.shape[0], device, opts, reduction, normalizer, v)
    mod = resolve(backend, device.type, _op_name("fused_linear_sparse_kd_loss", opts), dtype=hs.dtype)
    return F.apply(F.LINEAR_SPARSE_KD, mod, opts, rows, lead, hs, ws, bs, ids, vals)
