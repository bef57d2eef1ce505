"""Dense reference formulas for docs/semantics.md, written from the spec alone.

Nothing here imports kdkernels. Every loss is computed the obvious way: full (N, V) logits, full
softmax, the divergence summed over every outcome, then the reduction. Called on float64 tensors
(`compute=torch.float64`) these are the truth the tests compare against, differentiated by autograd.
Called on the inputs in their own dtype with `compute=torch.float32`, they are "naive PyTorch"
(materialized fp32 logits, the GEMM in the input dtype), whose error sets the tolerance.

Conventions (docs/semantics.md): z = c tanh(x / c); p = softmax(z_t / T), q = softmax(z_s / T);
0 log 0 = 0; a logit of -inf is a token of probability 0.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

TAIL_FLOOR = 1e-30  # tail masses are clamped below at this value (spec, "Tail modes")
_NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------------
# names (the spec's) used to parametrize the tests

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
# Teacher forms: the dense logits loss, the dense fused heads, and the sparse cache in every mode.
SPARSE_FORMS = ("sparse:logprobs:bucket", "sparse:logprobs:renorm_teacher", "sparse:logprobs:renorm_both",
                "sparse:weights:bucket", "sparse:weights:renorm_teacher", "sparse:weights:renorm_both")
FORMS = ("logits", "linear") + SPARSE_FORMS


def rejected(form: str, divergence: str) -> bool:
    """Combinations the spec rejects: reverse KL (alone or in AKL) against a teacher with no mass
    outside its ids."""
    if divergence not in ("reverse_kl", "akl") or not form.startswith("sparse"):
        return False
    _, values, tail = form.split(":")
    return tail == "renorm_teacher" or (values == "weights" and tail != "renorm_both")



# ------------------------------------------------------------------------------------------------
# logits and distributions


def softcap(x: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    return x if cap is None else cap * torch.tanh(x / cap)


def head_logits(h, w, b=None, cap=None, compute=torch.float64):
    """softcap(h @ w.T + b) as `compute`. float64: everything in float64. Otherwise the GEMM and the
    bias add run in the inputs' dtype and the result is upcast, as a naive PyTorch user would."""
    if compute == torch.float64:
        h, w = h.double(), w.double()
        b = b.double() if b is not None else None
    z = h @ w.T
    if b is not None:
        z = z + b
    return softcap(z.to(compute), cap)


def _kl(lx: torch.Tensor, ly: torch.Tensor) -> torch.Tensor:
    """sum_i x_i (log x_i - log y_i) over the last dim, from log x and log y, with 0 log 0 = 0.
    Written so that autograd gives finite gradients where x = 0 (double `where`)."""
    x = lx.exp()
    keep = x > 0
    diff = torch.where(keep, lx - ly, torch.zeros_like(lx))
    return torch.where(keep, x * diff, torch.zeros_like(lx)).sum(-1)


def _log_mix(lx: torch.Tensor, ly: torch.Tensor, w: float) -> torch.Tensor:
    """log(w x + (1 - w) y), mixed in probability space (the value is unused where the mix is 0)."""
    m = w * lx.exp() + (1 - w) * ly.exp()
    return torch.log(torch.where(m > 0, m, torch.ones_like(m)))


def akl(lp: torch.Tensor, lq: torch.Tensor, mu: float = 0.5, head_max: int = 256,
        candidates: Optional[int] = None, ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Adaptive KL (spec, "Adaptive KL"): H = the teacher's top outcomes among the first
    `candidates` columns (all by default; the k slots of a sparse teacher, never its tail outcome)
    in descending p until the cumulative p reaches mu, at most head_max; weights without gradient."""
    with torch.no_grad():
        p, q = lp.exp(), lq.exp()
        c = lp.shape[-1] if candidates is None else candidates
        # descending p, ties by the smaller token id (the column index, or `ids` of sparse slots)
        cols = torch.arange(c, device=lp.device)
        by_id = (cols.expand(lp.shape[0], c) if ids is None
                 else torch.where(ids >= 0, ids, ids.max() + 1 + cols).argsort(1))
        srt = torch.sort(lp[:, :c].gather(1, by_id), dim=1, descending=True, stable=True).indices
        order = by_id.gather(1, srt)[:, :head_max]
        ps = p.gather(1, order)
        in_h = (ps.cumsum(1) - ps) < mu - 1e-6     # "reaches mu" within 1e-6 (spec)
        g_head = torch.where(in_h, (ps - q.gather(1, order)).abs(), 0.0).sum(1)
        g_tail = ((p - q).abs().sum(1) - g_head).clamp_min(0.0)
        total = g_head + g_tail
        w_h = torch.where(total > 0, g_head / torch.where(total > 0, total, 1.0), 0.5)
    return w_h * _kl(lp, lq) + (1 - w_h) * _kl(lq, lp)


def divergence(lp: torch.Tensor, lq: torch.Tensor, name: str, beta: float = 0.5,
               alpha: float = 0.1, mu: float = 0.5, akl_head_max: int = 256,
               candidates: Optional[int] = None, ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """D(p, q) summed over the last dim (the outcomes), from teacher and student log-probs."""
    if name == "akl":
        return akl(lp, lq, mu, akl_head_max, candidates, ids)
    if name == "forward_kl":
        return _kl(lp, lq)
    if name == "reverse_kl":
        return _kl(lq, lp)
    if name == "jsd":
        lm = _log_mix(lp, lq, beta)
        return beta * _kl(lp, lm) + (1 - beta) * _kl(lq, lm)
    if name == "skew_forward_kl":
        return _kl(lp, _log_mix(lp, lq, alpha))
    if name == "skew_reverse_kl":
        return _kl(lq, _log_mix(lq, lp, alpha))
    if name == "tvd":
        return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    raise ValueError(name)


def cross_entropy_rows(zs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log softmax(z_s)[y] at T = 1 (labels already valid)."""
    return -torch.log_softmax(zs, -1).gather(1, labels.unsqueeze(1)).squeeze(1)


# ------------------------------------------------------------------------------------------------
# per-row losses


def _scale(temperature, scale_by_temperature_squared, kd_weight):
    return kd_weight * (temperature ** 2 if scale_by_temperature_squared else 1.0)


def dense_rows(zs, zt, *, divergence_name="forward_kl", temperature=1.0, beta=0.5, alpha=0.1,
               scale_by_temperature_squared=True, kd_weight=1.0, ce_weight=0.0, labels=None,
               mu=0.5, akl_head_max=256):
    """Per-row loss for a dense teacher, both logits (N, V) already softcapped and cut to V."""
    T = temperature
    lq = torch.log_softmax(zs / T, -1)
    lp = torch.log_softmax(zt / T, -1)
    rows = _scale(T, scale_by_temperature_squared, kd_weight) * divergence(lp, lq, divergence_name,
                                                                            beta, alpha, mu, akl_head_max)
    if ce_weight:
        rows = rows + ce_weight * cross_entropy_rows(zs, labels)
    return rows


def sparse_rows(zs, ids, vals, *, values="logprobs", tail="bucket", divergence_name="forward_kl",
                temperature=1.0, beta=0.5, alpha=0.1, scale_by_temperature_squared=True,
                kd_weight=1.0, ce_weight=0.0, labels=None, mu=0.5, akl_head_max=256):
    """Per-row loss for a cached sparse teacher (ids (N, k), -1 = empty slot) on the full student
    logits zs (N, V): the divergence over the k ids plus one tail outcome (spec, "Tail modes")."""
    T = temperature
    lq = torch.log_softmax(zs / T, -1)                    # full-vocabulary student log-probs
    n, v = lq.shape
    valid = ids >= 0
    idx = ids.clamp_min(0)
    neg = torch.full_like(lq[:, :1], _NEG_INF).expand(-1, ids.shape[1])
    lqK = torch.where(valid, lq.gather(1, idx), neg)
    tv = vals.to(lq.dtype)
    lpK = torch.where(valid, tv if values == "logprobs" else torch.log(tv.clamp_min(0)), neg)
    in_k = torch.zeros(n, v, dtype=lq.dtype, device=lq.device).scatter_add(1, idx, valid.to(lq.dtype)) > 0
    covers_all = in_k.all(1)

    def renorm(lx):
        return lx - torch.logsumexp(lx, 1, keepdim=True)

    if tail == "renorm_both":
        lp_out, lq_out = renorm(lpK), renorm(lqK)
    else:
        if tail == "renorm_teacher":
            lpK = renorm(lpK)
        if tail == "renorm_teacher" or values == "weights":
            lP = torch.full_like(lq[:, 0], _NEG_INF)   # the teacher has no mass outside K
        else:
            P = 1 - lpK.exp().sum(1)                    # the teacher's mass outside its top-k
            lP = torch.log(P.clamp_min(TAIL_FLOOR))
        # The student's mass outside K, summed directly over the tokens outside K.
        outside = torch.where(~in_k | covers_all.unsqueeze(1), lq, torch.full_like(lq, _NEG_INF))
        lQ = torch.logsumexp(outside, 1).clamp_min(math.log(TAIL_FLOOR))
        none = torch.full_like(lQ, _NEG_INF)            # k = V: no tail outcome
        lP = torch.where(covers_all, none, lP)
        lQ = torch.where(covers_all, none, lQ)
        lp_out = torch.cat([lpK, lP.unsqueeze(1)], 1)
        lq_out = torch.cat([lqK, lQ.unsqueeze(1)], 1)
    rows = _scale(T, scale_by_temperature_squared, kd_weight) * divergence(
        lp_out, lq_out, divergence_name, beta, alpha, mu, akl_head_max, candidates=ids.shape[1],
        ids=ids)
    if ce_weight:
        rows = rows + ce_weight * cross_entropy_rows(zs, labels)
    return rows


# ------------------------------------------------------------------------------------------------
# ignored rows and reductions


def counted(labels: Optional[torch.Tensor], n: int, ignore_index: int = -100) -> torch.Tensor:
    if labels is None:
        return torch.ones(n, dtype=torch.bool)
    return labels.reshape(-1) != ignore_index


def blank_ignored(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Ignored rows replaced by zeros, so whatever they hold (NaN) neither reaches the loss nor
    the gradient (autograd sends 0 to the discarded branch)."""
    return torch.where(mask.to(x.device).unsqueeze(1), x, torch.zeros((), dtype=x.dtype, device=x.device))


def reduce_rows(rows: torch.Tensor, mask: torch.Tensor, reduction: str, normalizer=None,
                lead_shape=None):
    mask = mask.to(rows.device)
    rows = torch.where(mask, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    if reduction == "none":
        return rows if lead_shape is None else rows.reshape(lead_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    denom = float(normalizer) if normalizer is not None else max(int(mask.sum()), 1)
    return total / denom


# ------------------------------------------------------------------------------------------------
# the three public losses, end to end


def _row_options(opts: dict) -> dict:
    keys = ("temperature", "beta", "alpha", "scale_by_temperature_squared", "kd_weight", "ce_weight",
            "mu", "akl_head_max")
    out = {k: opts[k] for k in keys if k in opts}
    out["divergence_name"] = opts.get("divergence", "forward_kl")
    return out


def _labels_for_ce(labels, mask):
    return None if labels is None else torch.where(mask, labels.reshape(-1), 0).long()


def kd_loss(student_logits, teacher_logits, *, compute=torch.float64, labels=None,
            ignore_index=-100, reduction="mean", normalizer=None, vocab_size=None, **opts):
    v = vocab_size or student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    zs = student_logits.reshape(-1, student_logits.shape[-1])[:, :v].to(compute)
    zt = teacher_logits.reshape(-1, teacher_logits.shape[-1])[:, :v].to(compute)
    mask = counted(labels, zs.shape[0], ignore_index)
    rows = dense_rows(blank_ignored(zs, mask), blank_ignored(zt, mask),
                      labels=_labels_for_ce(labels, mask), **_row_options(opts))
    return reduce_rows(rows, mask, reduction, normalizer, lead)


def fused_linear_kd_loss(hs, ws, ht, wt, *, student_bias=None, teacher_bias=None,
                         student_softcap=None, teacher_softcap=None, compute=torch.float64,
                         labels=None, ignore_index=-100, reduction="mean", normalizer=None,
                         vocab_size=None, **opts):
    lead = hs.shape[:-1]
    hs, ht = hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1])
    v = vocab_size or ws.shape[0]
    mask = counted(labels, hs.shape[0], ignore_index)
    zs = head_logits(blank_ignored(hs, mask), ws[:v],
                     student_bias[:v] if student_bias is not None else None, student_softcap, compute)
    zt = head_logits(blank_ignored(ht, mask), wt[:v],
                     teacher_bias[:v] if teacher_bias is not None else None, teacher_softcap, compute)
    rows = dense_rows(zs, zt, labels=_labels_for_ce(labels, mask), **_row_options(opts))
    return reduce_rows(rows, mask, reduction, normalizer, lead)


def fused_linear_sparse_kd_loss(hs, ws, ids, vals, *, values="logprobs", tail="bucket",
                                student_bias=None, student_softcap=None, compute=torch.float64,
                                labels=None, ignore_index=-100, reduction="mean", normalizer=None,
                                vocab_size=None, **opts):
    lead = hs.shape[:-1]
    hs = hs.reshape(-1, hs.shape[-1])
    ids, vals = ids.reshape(-1, ids.shape[-1]), vals.reshape(-1, vals.shape[-1])
    v = vocab_size or ws.shape[0]
    mask = counted(labels, hs.shape[0], ignore_index)
    zs = head_logits(blank_ignored(hs, mask), ws[:v],
                     student_bias[:v] if student_bias is not None else None, student_softcap, compute)
    rows = sparse_rows(zs, ids.long(), vals, values=values, tail=tail,
                       labels=_labels_for_ce(labels, mask), **_row_options(opts))
    return reduce_rows(rows, mask, reduction, normalizer, lead)


# ------------------------------------------------------------------------------------------------
# the tolerance: at most 2x the error of naive PyTorch in the same dtype, plus a small floor


def max_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return float((x.double() - truth.double()).abs().max()) if truth.numel() else 0.0


def assert_like_naive(what: str, got: torch.Tensor, truth: torch.Tensor, naive: torch.Tensor,
                      logit_scale: float = 1.0, ulps: float = 16.0, gemm_floor: float = 0.0) -> None:
    """max |got - truth| <= 2 max |naive - truth| + floor.

    floor = ulps * eps32 * max(1, logit_scale) * max |truth|: the change that perturbing each
    scaled logit (of magnitude up to `logit_scale`) by a few fp32 ulps makes. A streaming
    implementation forms log-probs as b - LSE(b) with LSE rounded to fp32, an absolute error of
    eps * |LSE| that naive log_softmax (b - max - log sum) does not make. It also leaves the logit
    gradient summing to ~eps |LSE| instead of 0 over the vocabulary, which the head GEMM turns into
    an error ~eps |LSE| |q^T W| rather than ~eps |LSE| |dh|; 16 ulps covers that on these tests.
    That is backward-stable and must not fail the test; a formula mistake gives errors of order
    max |truth| (tests/ mutation runs: every injected mistake fails by orders of magnitude).
    (max |truth| counts as at least 1e-3: an exact 0 may come out as rounding noise.)
    gemm_floor: for a gradient that leaves through a head GEMM, the rounding of that GEMM's own sums,
    which depends on how the BLAS blocks them (a one-row block runs as a GEMV that sums K terms in
    another order than naive's one big GEMM; the order differs between CPUs): see gemm_floor()."""
    assert got.shape == truth.shape, f"{what}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite entries"
    e_got, e_naive = max_err(got, truth), max_err(naive, truth)
    scale = float(truth.double().abs().max()) if truth.numel() else 0.0
    floor = ulps * 2.0 ** -23 * max(1.0, logit_scale) * max(scale, 1e-3)
    bound = 2 * e_naive + floor + gemm_floor + 1e-30
    assert e_got <= bound, (f"{what}: error {e_got:.3e} > 2 x naive {e_naive:.3e} + floor "
                            f"{floor:.1e} (max |truth| {scale:.3e}, logit scale {logit_scale:.3g})")


GEMM_LAMBDA = 4.0   # the constant of the probabilistic bound below


def gemm_floor(abs_a: torch.Tensor, abs_b: torch.Tensor) -> float:
    """Rounding of C = A @ B summed in fp32 over K = A.shape[1] terms, in any order:
    |C - fl(C)| <= lambda sqrt(K) u (|A| @ |B|) for independent rounding errors (Higham and Mary,
    "A new approach to probabilistic rounding error analysis", 2019; u = 2^-24 the unit roundoff of
    fp32 accumulation, lambda = GEMM_LAMBDA covers all but a vanishing probability). Derived from the
    inputs, so it holds for any BLAS and CPU; a formula mistake changes C by O(|A| @ |B|) instead."""
    k = abs_a.shape[1]
    if abs_a.numel() == 0 or abs_b.numel() == 0:
        return 0.0
    return GEMM_LAMBDA * math.sqrt(k) * 2.0 ** -24 * float((abs_a @ abs_b).max())
