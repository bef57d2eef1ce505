"""Vocabulary-parallel losses on CPU (gloo), 2 and 4 processes: loss and every gradient equal the
single-process result.

Oracle: for every quantity, max |vocab-parallel - ref64| <= 2 * max |single-process - ref64|
+ (32 ulp(fp32) + 2 ulp(output dtype)) of the quantity's scale (max |ref64|), where ref64 is a plain
dense float64 computation of docs/semantics.md (log_softmax, autograd) on the same (for bf16 cases,
bf16-rounded) inputs. The floor covers the one extra level of fp32 summation (partial sums per
shard, e.g. dh = sum_r g_r W_r); a wrong shard offset, a missing shard or a locally normalized
softmax gives errors of the order of the scale itself. The shards are uneven on purpose (one rank
holds 0 or 1 columns), V = 1031, N = 37, some rows ignored, non-unit upstream gradients.

One process group per world size runs every case (test_distributed_harness.py: spawning costs
seconds on 2 cores); each rank checks its own shard and records its measurements; the parametrized
tests read them.
"""
from __future__ import annotations

import traceback
import zlib

import pytest
import torch
import torch.nn.functional as F

EPS32 = torch.finfo(torch.float32).eps
N, H, HT, V = 37, 32, 24, 1031
SPLITS = {2: [400, 631], 4: [500, 0, 1, 530]}

# name -> (op, kwargs). op: "linear" (fused_linear_kd_loss), "logits" (kd_loss), "sparse".
CASES = {
    "linear_fkl_mean": ("linear", dict(divergence="forward_kl")),
    "linear_rkl_T2_ce": ("linear", dict(divergence="reverse_kl", temperature=2.0, ce_weight=0.5)),
    "linear_jsd_bias_sum": ("linear", dict(divergence="jsd", beta=0.3, bias=True, reduction="sum")),
    "linear_skewf_none": ("linear", dict(divergence="skew_forward_kl", alpha=0.2, reduction="none")),
    "linear_skewr_softcap": ("linear", dict(divergence="skew_reverse_kl", alpha=0.3,
                                            student_softcap=5.0, teacher_softcap=7.0, ce_weight=1.0)),
    # tvd's gradient jumps where q_j = p_j; a teacher = student + {0, 1} pattern keeps every
    # p_j / q_j away from 1, so rounding cannot flip a sign and the comparison stays tight.
    "logits_tvd_separated": ("logits", dict(divergence="tvd", separated=True, reduction="sum")),
    "linear_extreme": ("linear", dict(divergence="jsd", scale=20.0, ce_weight=0.3)),
    "linear_vocab_cut": ("linear", dict(divergence="forward_kl", vocab_size=1000, ce_weight=0.5)),
    "linear_normalizer": ("linear", dict(divergence="reverse_kl", normalizer=50.0)),
    "linear_bf16": ("linear", dict(divergence="forward_kl", ce_weight=0.5, dtype=torch.bfloat16)),
    "logits_fkl_ce": ("logits", dict(divergence="forward_kl", ce_weight=0.5, temperature=1.5)),
    "logits_jsd_none": ("logits", dict(divergence="jsd", reduction="none")),
    "logits_vocab_cut": ("logits", dict(divergence="reverse_kl", vocab_size=1000)),
    "sparse_bucket_fkl": ("sparse", dict(divergence="forward_kl", ce_weight=0.5)),
    "sparse_bucket_rkl_T2": ("sparse", dict(divergence="reverse_kl", temperature=2.0)),
    "sparse_bucket_jsd_bias": ("sparse", dict(divergence="jsd", bias=True, reduction="sum")),
    "sparse_renorm_teacher_tvd": ("sparse", dict(divergence="tvd", tail="renorm_teacher")),
    "sparse_renorm_both_skewr": ("sparse", dict(divergence="skew_reverse_kl", tail="renorm_both",
                                                reduction="none")),
    "sparse_weights_fkl_softcap": ("sparse", dict(divergence="forward_kl", values="weights",
                                                  student_softcap=6.0)),
    "sparse_vocab_cut": ("sparse", dict(divergence="skew_forward_kl", vocab_size=1000, ce_weight=0.2)),
    "sparse_bf16": ("sparse", dict(divergence="reverse_kl", tail="bucket", dtype=torch.bfloat16)),
}
ALL_IGNORED = ("linear", "logits", "sparse")


# --------------------------------------------------------------------------------------------------
# data and float64 reference


def _data(case: str, op: str, kw: dict):
    g = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    scale = kw.get("scale", 1.0)
    hs = torch.randn(N, H, generator=g)
    ws = torch.randn(V, H, generator=g) * 0.5 * scale
    bs = torch.randn(V, generator=g) if kw.get("bias") else None
    ht = torch.randn(N, HT, generator=g)
    wt = torch.randn(V, HT, generator=g) * 0.6 * scale
    labels = torch.randint(0, kw.get("vocab_size", V), (N,), generator=g)
    labels[::5] = -100
    d = dict(hs=hs, ws=ws, bs=bs, ht=ht, wt=wt, labels=labels)
    if op == "logits":
        d["zs"], d["zt"] = hs @ ws.T * 0.5, ht @ wt.T * 0.5
        if kw.get("separated"):
            d["zt"] = d["zs"] + (torch.arange(V) % 2)
    if op == "sparse":
        v = kw.get("vocab_size", V)
        lp = torch.log_softmax((ht @ wt[:v].T).double() / kw.get("temperature", 1.0), 1)
        if kw.get("values") == "weights":
            draws = torch.multinomial(lp.exp(), 20, replacement=True, generator=g)
            ids = torch.full((N, 20), -1, dtype=torch.int64)
            vals = torch.zeros(N, 20)
            for i in range(N):
                u, c = torch.unique(draws[i], return_counts=True)
                ids[i, :len(u)], vals[i, :len(u)] = u, c.float() / 20
        else:
            vals, ids = torch.topk(lp, 8, 1)
            vals = vals.float()
            ids[1::3, -2:] = -1       # empty slots
            vals[1::3, -2:] = 0.0
        d["ids"], d["vals"] = ids, vals
    return d


def _opts(kw):
    from kdkernels.options import KDOptions
    keys = set(KDOptions.__dataclass_fields__) - {"vocab_size"}  # "dtype" is not an option
    return KDOptions(**{k: v for k, v in kw.items() if k in keys})


def _softcap(x, c):
    return x if c is None else c * torch.tanh(x / c)


def _reduce(rows, labels, kw):
    mask = labels != -100
    rows = torch.where(mask, rows, 0.0)
    red = kw.get("reduction", "mean")
    if red == "none":
        return rows
    if red == "sum":
        return rows.sum()
    return rows.sum() / (kw["normalizer"] if "normalizer" in kw else mask.sum().clamp_min(1))


def _ce(z, labels, ce):
    has = labels != -100
    picked = z.gather(1, labels.clamp_min(0)[:, None])[:, 0]
    return ce * torch.where(has, torch.logsumexp(z, 1) - picked, 0.0)


def _ref_dense(zs, zt, labels, kw):
    from kdkernels.backends.torch.terms import element_terms
    o = _opts(kw)
    f, _ = element_terms(torch.log_softmax(zt / o.temperature, 1),
                         torch.log_softmax(zs / o.temperature, 1), o)
    rows = o.kd_scale * f.sum(1) + _ce(zs, labels, o.ce_weight)
    return _reduce(rows, labels, kw)


def _masked_lse(x, valid):
    return torch.logsumexp(x.masked_fill(~valid, float("-inf")), 1)


def _ref_sparse(z, ids, vals, labels, kw):
    from kdkernels.backends.torch.terms import element_terms
    o = _opts(kw)
    b, valid = z / o.temperature, ids >= 0
    lp = vals.double() if o.values == "logprobs" else vals.double().log()
    lp = lp.masked_fill(~valid, float("-inf"))
    lP = torch.full((z.shape[0],), float("-inf"), dtype=z.dtype)
    if o.tail != "bucket":
        lp = lp - _masked_lse(lp, valid)[:, None]
    elif o.values == "logprobs":
        lP = torch.log(-torch.expm1(_masked_lse(lp, valid)))
    bK = b.gather(1, ids.clamp_min(0)).masked_fill(~valid, float("-inf"))
    lse = _masked_lse(bK, valid) if o.tail == "renorm_both" else torch.logsumexp(b, 1)
    lqK = (bK - lse[:, None]).masked_fill(~valid, float("-inf"))
    fK, _ = element_terms(lp, lqK, o)
    D = fK.sum(1)
    if o.tail != "renorm_both":
        lQ = torch.log(-torch.expm1(_masked_lse(lqK, valid)))
        fQ, _ = element_terms(lP[:, None], lQ[:, None], o)
        D = D + fQ[:, 0]
    rows = o.kd_scale * D + _ce(z, labels, o.ce_weight)
    return _reduce(rows, labels, kw)


def _loss_kwargs(kw):
    skip = {"bias", "scale", "dtype", "separated"}
    return {k: v for k, v in kw.items() if k not in skip}


def _run_op(op, d, kw, dtype, pg=None, shard=None, backend="torch"):
    """Forward + backward in `dtype` with `backend` (float64: the dense reference formulas); with
    `shard` = (start, size) the head/logits are the rank's shard. Returns {name: tensor}: the loss
    and the gradients of the student inputs."""
    import kdkernels  # process_group= delegates to kdkernels.distributed.vocab_parallel
    cut = (lambda t, dim=0: t) if shard is None else \
        (lambda t, dim=0: t.narrow(dim, shard[0], shard[1]))
    lk = _loss_kwargs(kw)
    leaves = {}

    def leaf(name, t, dim=None):
        if t is None:
            return None
        x = (t if dim is None else cut(t, dim)).to(dtype).detach().requires_grad_(True)
        leaves[name] = x
        return x

    ref64 = dtype == torch.float64
    if op == "logits":
        zs, zt = leaf("zs", d["zs"], 1), cut(d["zt"], 1).to(dtype)
        if ref64:
            v = kw.get("vocab_size", V)
            loss = _ref_dense(zs[:, :v], zt[:, :v], d["labels"], kw)
        else:
            loss = kdkernels.kd_loss(zs, zt, labels=d["labels"], backend=backend, process_group=pg,
                                     **lk)
    else:
        hs, ws, bs = leaf("hs", d["hs"]), leaf("ws", d["ws"], 0), leaf("bs", d["bs"], 0)
        if op == "linear":
            ht, wt = d["ht"].to(dtype), cut(d["wt"]).to(dtype)
            if ref64:
                v = kw.get("vocab_size", V)
                zs = _softcap(hs @ ws[:v].T + (bs[:v] if bs is not None else 0), kw.get("student_softcap"))
                zt = _softcap(ht @ wt[:v].T, kw.get("teacher_softcap"))
                loss = _ref_dense(zs, zt, d["labels"], kw)
            else:
                loss = kdkernels.fused_linear_kd_loss(hs, ws, ht, wt, student_bias=bs,
                                                      labels=d["labels"], backend=backend,
                                                      process_group=pg, **lk)
        else:
            if ref64:
                v = kw.get("vocab_size", V)
                z = _softcap(hs @ ws[:v].T + (bs[:v] if bs is not None else 0), kw.get("student_softcap"))
                loss = _ref_sparse(z, d["ids"], d["vals"], d["labels"], kw)
            else:
                loss = kdkernels.fused_linear_sparse_kd_loss(hs, ws, d["ids"], d["vals"],
                                                             student_bias=bs, labels=d["labels"],
                                                             backend=backend, process_group=pg, **lk)
    gen = torch.Generator().manual_seed(7)
    grad_out = (torch.rand(loss.shape, generator=gen, dtype=loss.dtype) + 0.5) if loss.dim() \
        else torch.tensor(0.7, dtype=loss.dtype)
    loss.backward(grad_out)
    out = {"loss": loss.detach()}
    out.update({f"d{k}": x.grad for k, x in leaves.items()})
    return out


def _shard_of(world, rank):
    sizes = SPLITS[world]
    return sum(sizes[:rank]), sizes[rank]


def _check_case(name, op, kw, pg, world, rank, backend="torch"):
    """One case on this rank: the vocab-parallel result of `backend` against float64, bounded by
    2x the single-process error of the same backend + floor: {name: (err, bound, scale)}."""
    d = _data(name, op, kw)
    start, size = _shard_of(world, rank)
    dtype = kw.get("dtype", torch.float32)
    if dtype != torch.float32:   # the float64 reference sees the same (rounded) inputs
        d = {k: (v.to(dtype).float() if k in ("hs", "ws", "bs", "ht", "wt", "zs", "zt") and v is not None
                 else v) for k, v in d.items()}
    ref = _run_op(op, d, kw, torch.float64)
    single = _run_op(op, d, kw, dtype, backend=backend)
    vpr = _run_op(op, d, kw, dtype, pg=pg, shard=(start, size), backend=backend)
    meas = {}
    for k, r in ref.items():
        s = single[k]
        if k in ("dws", "dbs"):
            r, s = r.narrow(0, start, size), s.narrow(0, start, size)
        elif k == "dzs":
            r, s = r.narrow(1, start, size), s.narrow(1, start, size)
        p = vpr[k]
        assert p.shape == r.shape and p.dtype == s.dtype, (k, p.shape, r.shape, p.dtype, s.dtype)
        scale = float(r.abs().max()) if r.numel() else 0.0
        err = float((p.double() - r).abs().max()) if r.numel() else 0.0
        base = float((s.double() - r).abs().max()) if r.numel() else 0.0
        # + 2 ulp of the output dtype: a bf16 gradient is rounded once more at the end
        floor = (32 * EPS32 + 2 * torch.finfo(p.dtype).eps) * scale
        meas[k] = (err, 2 * base + floor, scale)
    return meas


def _check_all_ignored(op, pg, world, rank, backend="torch"):
    d = _data("ignored" + op, op, {})
    d["labels"] = torch.full((N,), -100)
    start, size = _shard_of(world, rank)
    if op == "logits":
        d["zs"][3] = float("nan")   # ignored rows may hold anything
    else:
        d["hs"][3] = float("nan")
    out = _run_op(op, d, {"ce_weight": 0.5}, torch.float32, pg=pg, shard=(start, size),
                  backend=backend)
    return {k: (float(v.abs().max()) if v.numel() else 0.0,
                bool(torch.isfinite(v).all())) for k, v in out.items()}


def _check_dtensor_head(pg, world, rank):
    """torch tensor parallelism: an LM head distributed as a DTensor with Shard(0) (torch.chunk
    boundaries) goes in as weight.to_local() with the mesh's group; its .grad is the DTensor of the
    single-process gradient."""
    import kdkernels
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    kw = {"divergence": "jsd", "ce_weight": 0.5}
    d = _data("dtensor", "sparse", kw)
    mesh = init_device_mesh("cpu", (world,))
    w = torch.nn.Parameter(distribute_tensor(d["ws"], mesh, [Shard(0)]))
    h = d["hs"].clone().requires_grad_(True)
    loss = kdkernels.fused_linear_sparse_kd_loss(h, w.to_local(), d["ids"], d["vals"],
                                                 labels=d["labels"], process_group=mesh.get_group(),
                                                 backend="torch", **kw)
    loss.backward(torch.tensor(0.7))   # the upstream gradient _run_op uses
    ref = _run_op("sparse", d, kw, torch.float64)
    single = _run_op("sparse", d, kw, torch.float32)
    got = {"loss": loss.detach(), "dhs": h.grad, "dws": w.grad.full_tensor()}
    meas = {}
    for k, r in ref.items():
        scale = float(r.abs().max())
        meas[k] = (float((got[k].double() - r).abs().max()),
                   2 * float((single[k].double() - r).abs().max()) + 32 * EPS32 * scale, scale)
    return meas


def suite(rank, world, pg):
    """Every check of this module on one rank of a `world`-process group (test_distributed_harness)."""
    res = {}
    for name, (op, kw) in CASES.items():
        try:
            res[name] = _check_case(name, op, kw, pg, world, rank)
        except Exception:
            res[name] = traceback.format_exc()
    for op in ALL_IGNORED:
        try:
            res["ignored_" + op] = _check_all_ignored(op, pg, world, rank)
        except Exception:
            res["ignored_" + op] = traceback.format_exc()
    try:
        res["dtensor_head"] = _check_dtensor_head(pg, world, rank)
    except Exception:
        res["dtensor_head"] = traceback.format_exc()
    res["errors"] = _check_errors(pg, world, rank)
    return res


def _check_errors(pg, world, rank):
    """A bad argument on one rank raises on every rank (nobody is left blocked in a collective)."""
    from kdkernels.distributed import vocab_parallel as vp
    d = _data("errors", "linear", {})
    start, size = _shard_of(world, rank)
    ws = d["ws"].narrow(0, start, size)
    hs = d["hs"] if rank != world - 1 else d["hs"][:, :-1]   # last rank: wrong hidden size
    try:
        vp.fused_linear_kd_loss(hs, ws, d["ht"], d["wt"].narrow(0, start, size), process_group=pg)
    except ValueError as e:
        return type(e).__name__ + ": " + str(e)
    return "no error"


def _results(world):
    from test_distributed_harness import results
    return results(world, "test_distributed_vocab")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_vocab_parallel_equals_single_process(world, case):
    grad_scale = 0.0
    for rank, res in enumerate(_results(world)):
        meas = res[case]
        assert not isinstance(meas, str), f"rank {rank} raised:\n{meas}"
        for k, (err, tol, scale) in meas.items():
            assert err <= tol, f"rank {rank} {k}: |vp - ref64| = {err:.3g} > {tol:.3g} (scale {scale:.3g})"
        assert meas["loss"][2] > 0
        grad_scale = max(grad_scale, meas["dhs" if "dhs" in meas else "dzs"][2])
    assert grad_scale > 0, "every gradient is 0: the comparison would prove nothing"


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("op", ALL_IGNORED)
def test_vocab_parallel_all_ignored_is_exactly_zero(world, op):
    for rank, res in enumerate(_results(world)):
        meas = res["ignored_" + op]
        assert not isinstance(meas, str), f"rank {rank} raised:\n{meas}"
        for k, (mx, finite) in meas.items():
            assert finite and mx == 0.0, f"rank {rank} {k}: max |.| = {mx}, finite = {finite}"


@pytest.mark.parametrize("world", [2, 4])
def test_bad_argument_on_one_rank_raises_everywhere(world):
    msgs = [res["errors"] for res in _results(world)]
    assert "hidden size" in msgs[-1], msgs[-1]
    for m in msgs[:-1]:
        assert "rejected their arguments" in m and f"[{world - 1}]" in m, m


@pytest.mark.parametrize("world", [2, 4])
def test_dtensor_sharded_head(world):
    for rank, res in enumerate(_results(world)):
        meas = res["dtensor_head"]
        assert not isinstance(meas, str), f"rank {rank} raised:\n{meas}"
        for k, (err, tol, scale) in meas.items():
            assert scale > 0 and err <= tol, f"rank {rank} {k}: {err:.3g} > {tol:.3g} (scale {scale:.3g})"
