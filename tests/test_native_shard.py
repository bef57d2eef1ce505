"""The native backend's shard protocol (vocab-parallel losses, `process_group=` with backend="native";
kdkernels/distributed/shard_torch.py is the contract), CPU build.

1. Each shard pass on its own, single process: the native pass and shard_torch's on the same shard
   inputs (local labels with -1 / -2, local ids, GLOBAL statistics from the full vocabulary), both
   against shard_torch on float64 inputs. Oracle: max |native - ref64| <= 2 max |shard_torch fp32 -
   ref64| + 32 ulp(fp32) (+ 2 ulp of the output dtype) of the quantity's scale.
2. End to end on 2- and 4-process gloo groups: tests/test_distributed_vocab.py's checks (its data, float64
   reference and oracle: vocab-parallel vs ref64 within 2x the single-process error + a floor) with
   every loss call forced to backend="native", single-process run included; uneven shards
   (4 processes: one rank holds 0 columns, one holds 1).
"""
from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import traceback
import zlib
from datetime import timedelta

import pytest
import torch

pytestmark = pytest.mark.native

EPS32 = torch.finfo(torch.float32).eps
N, H, HT, V = 37, 32, 24, 1031
START, SIZE = 300, 517          # the shard [300, 817) of V = 1031: odd offset and width


@pytest.fixture(scope="module")
def native():
    from kdkernels.backends.native import _loader
    why = _loader.missing_tools(False)
    if why is not None and not _loader.is_loaded_or_prebuilt(False):
        pytest.skip(f"native CPU extension cannot be built here: {why}")
    _loader.load(False)
    from kdkernels.backends import native as mod
    return mod


def _opts(**kw):
    from kdkernels.options import KDOptions
    return KDOptions(**kw)


def _gen(name):
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _labels(g, n=N, v=V):
    """Global CE labels (ignored rows: -1), and the shard protocol's local labels."""
    from kdkernels.distributed.vocab_parallel import _local_labels
    y = torch.randint(0, v, (n,), generator=g)
    y[::5] = -1
    y[1] = START            # first column of the shard
    y[2] = START + SIZE - 1  # last column
    y[3] = START - 1         # just outside
    return _local_labels(y, START, SIZE)


def _check(name, got, naive, ref, out_dtype=torch.float32):
    """Oracle on one quantity; -inf entries must sit at the same places."""
    got, naive, ref = got.double(), naive.double(), ref.double()
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(got), inf) and torch.equal(got[inf], ref[inf]), f"{name}: inf pattern"
    fin = ~inf
    if not fin.any():
        return 0.0
    g, b, r = got[fin], naive[fin], ref[fin]
    assert torch.isfinite(g).all(), f"{name}: non-finite values"
    scale = float(r.abs().max())
    err, base = float((g - r).abs().max()), float((b - r).abs().max())
    floor = (32 * EPS32 + 2 * torch.finfo(out_dtype).eps) * scale
    assert err <= 2 * base + floor, f"{name}: |native - ref64| = {err:.3g} > 2 * {base:.3g} + {floor:.3g}"
    return scale


def _grad_rows(g, n=N):
    gr = torch.rand(n, generator=g) + 0.5
    gr[::5] = 0.0           # ignored rows
    return gr


# --------------------------------------------------------------------------------------------------
# 1. the passes, single process

DENSE = {
    "fkl_ce": dict(divergence="forward_kl", ce_weight=0.5),
    "rkl_T2_ce_chunks": dict(divergence="reverse_kl", temperature=2.0, ce_weight=0.5, chunk_bytes=8192),
    "jsd_bias": dict(divergence="jsd", beta=0.3, bias=True),
    "skewf_T05": dict(divergence="skew_forward_kl", alpha=0.2, temperature=0.5),
    "skewr_softcap_ce": dict(divergence="skew_reverse_kl", alpha=0.3, student_softcap=5.0,
                             teacher_softcap=7.0, ce_weight=1.0, chunk_bytes=8192),
    "tvd_separated": dict(divergence="tvd", separated=True),
    "extreme_jsd": dict(divergence="jsd", scale=20.0, ce_weight=0.3),
    "fkl_bf16_ce": dict(divergence="forward_kl", ce_weight=0.5, dtype=torch.bfloat16),
    "ce_only": dict(divergence="forward_kl", kd_weight=0.0, ce_weight=1.0),
}
_NOT_OPTS = ("bias", "scale", "separated", "dtype")


def _dense_data(name, kw, op):
    g = _gen(name)
    s = kw.get("scale", 1.0)
    d = dict(hs=torch.randn(N, H, generator=g), ws=torch.randn(V, H, generator=g) * 0.5 * s,
             bs=torch.randn(V, generator=g) if kw.get("bias") else None,
             ht=torch.randn(N, HT, generator=g), wt=torch.randn(V, HT, generator=g) * 0.6 * s, bt=None)
    if op == "logits":
        d = dict(zs=d["hs"] @ d["ws"].T * 0.5, zt=d["ht"] @ d["wt"].T * 0.5)
        if kw.get("separated"):
            d["zt"] = d["zs"] + (torch.arange(V) % 2)
    dtype = kw.get("dtype", torch.float32)
    d = {k: (t.to(dtype).double() if t is not None else None) for k, t in d.items()}  # rounded once
    return d, _labels(g), _grad_rows(g), g


def _shard_args(d, op, dtype):
    cast = (lambda t: None if t is None else t.to(dtype))
    if op == "logits":
        return (cast(d["zs"][:, START:START + SIZE]), cast(d["zt"][:, START:START + SIZE]))
    cut = (lambda t: None if t is None else cast(t[START:START + SIZE]))
    return (cast(d["hs"]), cut(d["ws"]), cut(d["bs"]), cast(d["ht"]), cut(d["wt"]), cut(d["bt"]))


def _global_dense_stats(d, op, opts, labels_global=None):
    """[LSE(b), LSE(z_s), LSE(a), S] over the whole vocabulary, float64 (torch backend)."""
    from kdkernels.backends.torch import dense
    no_labels = torch.full((N,), -1)
    if op == "logits":
        _, st = dense.kd_forward(d["zs"], d["zt"], no_labels, opts)
    else:
        _, st = dense.linear_kd_forward(d["hs"], d["ws"], d["bs"], d["ht"], d["wt"], d["bt"], no_labels,
                                        opts)
    if opts.ce_weight:   # LSE(z_s) (the forward without labels may leave it out)
        z = d["zs"] if op == "logits" else d["hs"] @ d["ws"].T + (d["bs"] if d["bs"] is not None else 0)
        if opts.student_softcap:
            z = opts.student_softcap * torch.tanh(z / opts.student_softcap)
        st = st.clone()
        st[:, 1] = torch.logsumexp(z, 1)
        st[:, 5] = 0
    # the torch backend keeps each LSE as hi + lo (columns 4, 5, 6): the shard layout wants the sums
    return torch.cat([st[:, 0:3] + st[:, 4:7], st[:, 3:4]], 1)


@pytest.mark.parametrize("op", ["logits", "linear"])
@pytest.mark.parametrize("case", list(DENSE))
def test_dense_passes_match_torch_reference(native, op, case):
    check_dense_case(native, op, case, "cpu")


def _to(device, *ts):
    return tuple(None if t is None else t.to(device) for t in ts)


def check_dense_case(native, op, case, device):
    """One DENSE case on `device` (tests/test_native_cuda.py runs it on CUDA)."""
    from kdkernels.distributed import shard_torch as ref
    kw = DENSE[case]
    if op == "logits" and ("student_softcap" in kw or kw.get("bias")):
        kw = {k: v for k, v in kw.items() if k not in ("student_softcap", "teacher_softcap", "bias")}
    opts = _opts(**{k: v for k, v in kw.items() if k not in _NOT_OPTS})
    dtype = kw.get("dtype", torch.float32)
    d, labels, grad_rows, _ = _dense_data(case + op, kw, op)
    gst = _global_dense_stats(d, op, opts)
    d = {k: (t.to(device) if t is not None else None) for k, t in d.items()}
    labels, grad_rows, gst = _to(device, labels, grad_rows, gst)
    a64, a = _shard_args(d, op, torch.float64), _shard_args(d, op, dtype)
    pre = "" if op == "logits" else "linear_"
    fn = lambda mod, what: getattr(mod, f"{pre}kd_shard_{what}")

    # pass 1: local LSEs and the CE target logit
    r64, r32, got = (fn(m, "stats")(*x, labels, opts) for m, x in ((ref, a64), (ref, a), (native, a)))
    cols = [0] + ([1] if opts.ce_weight else []) + ([2] if opts.kd_weight else [])
    _check("lse", got[0][:, cols], r32[0][:, cols], r64[0][:, cols])
    _check("picked", got[1], r32[1], r64[1])
    assert got[0].dtype == got[1].dtype == torch.float32

    # pass 2: sum f, sum qh with the global LSEs
    glse = gst[:, :3]
    r64, r32, got = (fn(m, "terms")(*x, glse.to(x[0].dtype if x[0].dtype == torch.float64 else torch.float32),
                                    opts) for m, x in ((ref, a64), (ref, a), (native, a)))
    if opts.kd_weight:
        _check("terms", got, r32, r64)
    else:
        assert not got.any()

    # backward with the global stats
    st = gst.float()
    if op == "logits":
        r64, r32, got = (ref.kd_shard_backward(*a64, labels, gst, grad_rows.double(), opts),
                         ref.kd_shard_backward(*a, labels, st, grad_rows, opts),
                         native.kd_shard_backward(*a, labels, st, grad_rows, opts))
        assert got.dtype == dtype and got.shape == (N, SIZE)
        _check("grad_zs", got, r32, r64, dtype)
        return
    need = (True, True, kw.get("bias", False))
    r64 = ref.linear_kd_shard_backward(*a64, labels, gst, grad_rows.double(), opts, need)
    r32 = ref.linear_kd_shard_backward(*a, labels, st, grad_rows, opts, need)
    got = native.linear_kd_shard_backward(*a, labels, st, grad_rows, opts, need)
    assert got[0].dtype == torch.float32, "dh is the fp32 partial"
    for name, x, y, z, dt in zip(("dh", "dw", "db"), got, r32, r64, (torch.float32, dtype, dtype)):
        if z is None:
            assert x is None
            continue
        assert x.dtype == dt and x.shape == z.shape
        _check(name, x, y, z, dt)


SPARSE = {
    "bucket_fkl_ce": dict(divergence="forward_kl", ce_weight=0.5),
    "bucket_rkl_T2_chunks": dict(divergence="reverse_kl", temperature=2.0, chunk_bytes=8192),
    "bucket_jsd_bias": dict(divergence="jsd", bias=True, ce_weight=0.2),
    "renorm_teacher_tvd": dict(divergence="tvd", tail="renorm_teacher"),
    "renorm_both_skewr": dict(divergence="skew_reverse_kl", tail="renorm_both", ce_weight=0.5),
    "weights_fkl_softcap": dict(divergence="forward_kl", values="weights", student_softcap=6.0),
    "bucket_skewf_bf16": dict(divergence="skew_forward_kl", dtype=torch.bfloat16),
}


def _sparse_data(name, kw):
    import test_distributed_vocab as tdv
    d = tdv._data(name, "sparse", {k: v for k, v in kw.items() if k != "dtype"})
    dtype = kw.get("dtype", torch.float32)
    for k in ("hs", "ws", "bs"):
        d[k] = d[k].to(dtype).double() if d[k] is not None else None
    g = _gen(name + "rows")
    # a few ids on the shard's edges, so both boundaries are crossed
    d["ids"][4, 0], d["ids"][5, 0] = START, START + SIZE - 1
    d["ids"][4, 1], d["ids"][5, 1] = START - 1, START + SIZE
    for r in (4, 5):
        row = d["ids"][r]
        assert len(set(row[row >= 0].tolist())) == int((row >= 0).sum())
    return d, _labels(g), _grad_rows(g)


@pytest.mark.parametrize("case", list(SPARSE))
def test_sparse_passes_match_torch_reference(native, case):
    check_sparse_case(native, case, "cpu")


def check_sparse_case(native, case, device):
    """One SPARSE case on `device` (tests/test_native_cuda.py runs it on CUDA)."""
    from kdkernels.backends.torch import sparse
    from kdkernels.distributed import shard_torch as ref
    from kdkernels.distributed.vocab_parallel import _local_teacher
    kw = SPARSE[case]
    opts = _opts(**{k: v for k, v in kw.items() if k not in _NOT_OPTS})
    dtype = kw.get("dtype", torch.float32)
    d, labels, grad_rows = _sparse_data(case, kw)
    d = {k: (t.to(device) if t is not None else None) for k, t in d.items()}
    labels, grad_rows = _to(device, labels, grad_rows)
    ids, vals = d["ids"], d["vals"]
    loc = ids - START
    local_ids = torch.where((ids >= 0) & (loc >= 0) & (loc < SIZE), loc, -1)
    assert (local_ids >= 0).any() and ((ids >= 0) & (local_ids < 0)).any()
    cut = (lambda t, dt: None if t is None else t[START:START + SIZE].to(dt))
    a64 = (d["hs"], cut(d["ws"], torch.float64), cut(d["bs"], torch.float64))
    a = (d["hs"].to(dtype), cut(d["ws"], dtype), cut(d["bs"], dtype))

    r64, r32, got = (m.linear_sparse_kd_shard_stats(*x, local_ids, labels, opts)
                     for m, x in ((ref, a64), (ref, a), (native, a)))
    cols = [0, 2] + ([1] if opts.ce_weight else [])
    _check("lse", got[0][:, cols], r32[0][:, cols], r64[0][:, cols])
    _check("picked", got[1], r32[1], r64[1])
    _check("bK", got[2], r32[2], r64[2])

    # backward with the global stats [lse, LSE(z_s), h_Q, S] of the whole vocabulary (torch backend)
    lab = torch.where(labels == -1, -1, 0)     # any valid label: only LSE(z_s) is read from the stats
    _, gst = sparse.linear_sparse_kd_forward(d["hs"], d["ws"], d["bs"], ids, vals.double(), lab, opts)
    # the torch backend keeps each LSE as hi + lo (columns 4, 5): the shard layout wants the sums
    gst = torch.cat([gst[:, 0:1] + gst[:, 4:5], gst[:, 1:2] + gst[:, 5:6], gst[:, 2:4]], 1)
    lpK, _ = _local_teacher(ids, vals, local_ids, opts)
    need = (True, True, kw.get("bias", False))
    r64 = ref.linear_sparse_kd_shard_backward(*a64, local_ids, lpK.double(), labels, gst,
                                              grad_rows.double(), opts, need)
    st = gst.float()
    r32 = ref.linear_sparse_kd_shard_backward(*a, local_ids, lpK, labels, st, grad_rows, opts, need)
    got = native.linear_sparse_kd_shard_backward(*a, local_ids, lpK, labels, st, grad_rows, opts, need)
    assert got[0].dtype == torch.float32, "dh is the fp32 partial"
    for name, x, y, z, dt in zip(("dh", "dw", "db"), got, r32, r64, (torch.float32, dtype, dtype)):
        if z is None:
            assert x is None
            continue
        assert x.dtype == dt and x.shape == z.shape
        assert float(z.abs().max()) > 0, f"{name} is 0: the comparison would prove nothing"
        _check(name, x, y, z, dt)


def test_empty_shard_and_ignored_nan_rows(native):
    """A rank that holds 0 columns: LSE -inf, terms 0, gradients of shape (.., 0) and an exact-zero
    dh partial. Rows with grad_rows = 0 holding NaN hidden states give exact zeros everywhere."""
    opts = _opts(divergence="jsd", ce_weight=0.5)
    g = _gen("empty")
    hs, ht = torch.randn(N, H, generator=g), torch.randn(N, HT, generator=g)
    ws, wt = torch.randn(0, H), torch.randn(0, HT)
    labels = torch.where(torch.arange(N) % 5 == 0, -1, -2)
    lse, picked = native.linear_kd_shard_stats(hs, ws, None, ht, wt, None, labels, opts)
    assert torch.isinf(lse[:, 0]).all() and (lse[:, 0] < 0).all() and not picked.any()
    assert not native.linear_kd_shard_terms(hs, ws, None, ht, wt, None, torch.zeros(N, 3), opts).any()
    st = torch.zeros(N, 4)
    dh, dw, db = native.linear_kd_shard_backward(hs, ws, None, ht, wt, None, labels, st,
                                                 torch.ones(N), opts, (True, True, False))
    assert dh.shape == (N, H) and not dh.any() and dw.shape == (0, H) and db is None
    zs = torch.randn(N, 0)
    assert native.kd_shard_backward(zs, zs, labels, st, torch.ones(N), opts).shape == (N, 0)
    ids = torch.full((N, 4), -1)
    lse, picked, bK = native.linear_sparse_kd_shard_stats(hs, ws, None, ids, labels, opts)
    assert torch.isinf(bK).all() and torch.isinf(lse[:, 2]).all()

    # NaN rows with grad_rows = 0, on a real shard
    ws, wt = torch.randn(SIZE, H, generator=g), torch.randn(SIZE, HT, generator=g)
    hs[3] = float("nan")
    gr = torch.ones(N)
    gr[3] = 0.0
    lab = torch.zeros(N, dtype=torch.long)
    st = torch.cat([torch.full((N, 3), 5.0), torch.zeros(N, 1)], 1)
    dh, dw, _ = native.linear_kd_shard_backward(hs, ws, None, ht, wt, None, lab, st, gr, opts,
                                                (True, True, False))
    assert torch.isfinite(dw).all() and torch.isfinite(dh).all() and not dh[3].any()
    ids = torch.randint(0, SIZE, (N, 3))
    ids[:, 1], ids[:, 2] = (ids[:, 0] + 1) % SIZE, (ids[:, 0] + 2) % SIZE
    dh, dw, _ = native.linear_sparse_kd_shard_backward(hs, ws, None, ids, torch.full((N, 3), -2.0), lab,
                                                       st, gr, opts, (True, True, False))
    assert torch.isfinite(dw).all() and torch.isfinite(dh).all() and not dh[3].any()


def test_dispatch_picks_native_passes(native):
    from kdkernels.distributed.shard_dispatch import SHARD_OPS, resolve_shard
    for op in SHARD_OPS:
        assert resolve_shard("native", "cpu", op) is native


def test_shard_ops_opcheck(native):
    """Schemas, Meta kernels and the CPU kernels agree (torch.library.opcheck)."""
    from kdkernels.backends.native._shard import _lists
    ops = torch.ops.kdkernels_native
    opts = _opts(divergence="jsd", ce_weight=0.5)
    f, i = _lists(opts)
    g = _gen("opcheck")
    hs, ws, ht, wt = (torch.randn(5, 8, generator=g), torch.randn(40, 8, generator=g),
                      torch.randn(5, 6, generator=g), torch.randn(40, 6, generator=g))
    labels = torch.tensor([0, -1, -2, 39, 7])
    zs, zt = hs @ ws.T, ht @ wt.T
    glse = torch.randn(5, 3, generator=g) + 6
    ids = torch.tensor([[0, 3, -1]] * 5)
    for name, args in (("kd_shard_stats", (zs, zt, labels, f, i)),
                       ("kd_shard_terms", (zs, zt, glse, f, i)),
                       ("linear_kd_shard_stats", (hs, ws, None, ht, wt, None, labels, f, i)),
                       ("linear_kd_shard_terms", (hs, ws, None, ht, wt, None, glse, f, i)),
                       ("linear_sparse_kd_shard_stats", (hs, ws, None, ids, labels, f, i))):
        torch.library.opcheck(getattr(ops, name).default, args,
                              test_utils=("test_schema", "test_faketensor"))
    st = torch.cat([glse, torch.zeros(5, 1)], 1)
    torch.library.opcheck(ops.linear_kd_backward.default,
                          (hs, ws, None, ht, wt, None, torch.where(labels == -2, 40, labels), st,
                           torch.ones(5), f, i + [1], [True, True, False], None),
                          test_utils=("test_schema", "test_faketensor"))


# --------------------------------------------------------------------------------------------------
# 2. end to end: process_group= with backend="native" on 2 gloo processes

E2E = ("linear_fkl_mean", "linear_rkl_T2_ce", "linear_jsd_bias_sum", "linear_skewr_softcap",
       "linear_vocab_cut", "linear_bf16", "logits_fkl_ce", "logits_tvd_separated", "logits_vocab_cut",
       "sparse_bucket_fkl", "sparse_bucket_jsd_bias", "sparse_renorm_teacher_tvd", "sparse_renorm_both_skewr",
       "sparse_weights_fkl_softcap", "sparse_vocab_cut", "sparse_bf16")
ALL_IGNORED = ("linear", "logits", "sparse")
WORLDS = (2, 4)   # test_distributed_vocab.SPLITS: [400, 631] and [500, 0, 1, 530] (an empty and a 1-column shard)


@contextlib.contextmanager
def _count_native_passes(calls: dict):
    """Count the calls of the native shard passes (vocab_parallel looks them up on the package)."""
    from kdkernels.backends import native
    from kdkernels.distributed.shard_dispatch import SHARD_OPS
    names = sorted({f for fs in SHARD_OPS.values() for f in fs})
    saved = {f: getattr(native, f) for f in names}

    def counted(f, fn):
        def call(*a, **kw):
            calls[f] = calls.get(f, 0) + 1
            return fn(*a, **kw)
        return call

    for f, fn in saved.items():
        setattr(native, f, counted(f, fn))
    try:
        yield
    finally:
        for f, fn in saved.items():
            setattr(native, f, fn)


def _suite(rank, world, pg):
    import test_distributed_vocab as tdv
    from kdkernels.backends.native import _loader
    _loader.load(False)
    res = {"calls": {}}
    with _count_native_passes(res["calls"]):
        for name in E2E:
            op, kw = tdv.CASES[name]
            try:
                res[name] = tdv._check_case(name, op, kw, pg, world, rank, backend="native")
            except Exception:
                res[name] = traceback.format_exc()
        for op in ALL_IGNORED:
            try:
                res["ignored_" + op] = tdv._check_all_ignored(op, pg, world, rank, backend="native")
            except Exception:
                res["ignored_" + op] = traceback.format_exc()
    return res


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=180))
    try:
        res = _suite(rank, world, dist.group.WORLD)
    except Exception:
        res = traceback.format_exc()
    finally:
        dist.destroy_process_group()
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


@functools.lru_cache(maxsize=None)
def _e2e_results(world):
    import torch.multiprocessing as mp
    from test_distributed_harness import _free_port
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, _free_port(), tmp), nprocs=world, start_method="spawn")
        out = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    for rank, res in enumerate(out):
        assert not isinstance(res, str), f"rank {rank} failed:\n{res}"
    return out


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", E2E)
def test_native_vocab_parallel_equals_single_process(native, case, world):
    grad_scale = 0.0
    for rank, res in enumerate(_e2e_results(world)):
        meas = res[case]
        assert not isinstance(meas, str), f"rank {rank} raised:\n{meas}"
        for k, (err, tol, scale) in meas.items():
            assert err <= tol, f"rank {rank} {k}: |vp - ref64| = {err:.3g} > {tol:.3g} (scale {scale:.3g})"
        assert meas["loss"][2] > 0
        grad_scale = max(grad_scale, meas["dhs" if "dhs" in meas else "dzs"][2])
    assert grad_scale > 0, "every gradient is 0: the comparison would prove nothing"


@pytest.mark.parametrize("world", WORLDS)
def test_native_passes_ran(native, world):
    from kdkernels.distributed.shard_dispatch import SHARD_OPS
    for rank, res in enumerate(_e2e_results(world)):
        for f in sorted({f for fs in SHARD_OPS.values() for f in fs}):
            assert res["calls"].get(f, 0) > 0, f"rank {rank}: native {f} never ran ({res['calls']})"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("op", ALL_IGNORED)
def test_native_vocab_parallel_all_ignored_is_exactly_zero(native, op, world):
    for rank, res in enumerate(_e2e_results(world)):
        meas = res["ignored_" + op]
        assert not isinstance(meas, str), f"rank {rank} raised:\n{meas}"
        for k, (mx, finite) in meas.items():
            assert finite and mx == 0.0, f"rank {rank} {k}: max |.| = {mx}, finite = {finite}"
