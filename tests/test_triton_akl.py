"""divergence="akl" with backend="triton" in the CPU interpreter (fp32, fp16; bf16 is GPU-only, in
tests/test_triton_gpu.py): the public API against the float64 AKL of tests/reference.py (bounded
by 2x naive fp32 PyTorch's error, tests/conftest.py) and against backend="torch" (bounded by 2x the
torch backend's error against float64, tests/_triton_util.py), plus the backend pieces directly:
the five public stats columns, the weighted backward, and rows with grad_row == 0.

Shapes are odd on purpose: V = 1031 (not a multiple of any tile), 300 (one partial tile per
vocabulary split), 37 (less than a tile); N = 70 (a full and a partial row block), 37, 13.
`akl_head_max` is small in most cases: H comes from the backend's linear_topk, which at the default
M = 256 costs ~10 s per call in the interpreter (one case keeps the default).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before the backend's kernels load (see _triton_util)

import pytest  # noqa: E402
import torch  # noqa: E402

import _triton_util as U  # noqa: E402
import reference as R  # noqa: E402
import kdkernels  # noqa: E402
from kdkernels.options import KDOptions  # noqa: E402

pytestmark = [pytest.mark.interpreter,
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]  # numpy log(0) in the interpreter

AKL_FORMS = [f for f in R.FORMS if not R.rejected(f, "akl")]


def _check_both(kd, case, opts: dict, go, ulps=None):
    """Triton vs float64 (2x naive fp32 + floor) and vs the torch backend (2x its error)."""
    got = kd.check(case, dict(opts, backend="triton"), go, **({} if ulps is None else {"ulps": ulps}))
    ref = kd.run(case, "kd", dict(opts, backend="torch"), go)
    truth = kd.run(case, "truth", opts, go)
    U.assert_close_to_reference("loss", got[0], ref[0], truth[0].to(got[0].dtype))
    for name in case.grads:
        U.assert_close_to_reference(f"d {name}", got[1][name], ref[1][name],
                                    truth[1][name].to(got[1][name].dtype))
    return got


# (form, shape, T, reduction, ignore pattern, extras, akl options): every form twice, once small and
# once on an odd large shape; extras rotate bias + softcaps, CE weight + kd_weight, a normalizer.
CASES = [
    ("logits", dict(n=70, v=1031), 2.0, "none", "some", "ce", dict(akl_head_max=256)),
    ("logits", dict(n=13, v=37), 0.5, "mean", "all", "", dict(mu=0.9)),
    ("linear", dict(n=37, v=1031, h_s=48, h_t=40), 1.0, "mean", "some", "cap", dict(akl_head_max=256)),
    ("linear", dict(n=13, v=300, h_s=16, h_t=24), 2.0, "sum", "none", "ce", dict(mu=0.2, akl_head_max=8)),
    ("sparse:logprobs:bucket", dict(n=37, v=1031, h_s=48, k=7), 2.0, "normalizer", "some", "cap", {}),
    ("sparse:logprobs:bucket", dict(n=13, v=37, k=37), 1.0, "none", "none", "ce", dict(mu=0.9)),
    ("sparse:logprobs:renorm_both", dict(n=37, v=300, h_s=32, k=16), 0.5, "sum", "some", "ce", {}),
    ("sparse:logprobs:renorm_both", dict(n=13, v=37, k=7), 1.0, "mean", "all", "cap", {}),
    ("sparse:weights:renorm_both", dict(n=37, v=1031, h_s=32), 2.0, "none", "some", "cap", dict(mu=0.3)),
    ("sparse:weights:renorm_both", dict(n=13, v=37), 1.0, "mean", "none", "", dict(akl_head_max=2)),
]


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{c[0]}-v{c[1]['v']}" for c in CASES])
def test_matrix(kd, i):
    form, shape, T, reduction, ignore, extras, akl = CASES[i]
    assert form in AKL_FORMS
    extra = dict(bias=True, student_softcap=20.0, teacher_softcap=15.0) if extras == "cap" else {}
    if form == "logits":
        extra = {}
    case = kd.make_case(form, temperature=T, seed=300 + i, **shape, **extra)
    labels = kd.make_labels(case.n, case.v, ignore, seed=i)
    opts = dict(divergence="akl", temperature=T, labels=labels, **akl)
    if reduction == "normalizer":
        opts.update(reduction="mean", normalizer=29.0)
    else:
        opts["reduction"] = reduction
    if extras == "ce" and labels is not None:
        opts.update(ce_weight=0.3, kd_weight=0.7)
    go = kd.upstream(opts["reduction"], (case.n,), seed=i)
    loss, grads = _check_both(kd, case, opts, go)
    if ignore == "all":
        assert (loss == 0).all() and all((g == 0).all() for g in grads.values())


@pytest.mark.parametrize("form", ["logits", "linear", "sparse:logprobs:bucket", "sparse:weights:renorm_both"])
def test_fp16(kd, form):
    """fp16 inputs (tl.dot on fp16 is exact in the interpreter; bf16 is GPU-only)."""
    case = kd.make_case(form, n=37, v=1031, h_s=32, h_t=48, k=7, dtype=torch.float16, temperature=2.0)
    labels = kd.make_labels(case.n, case.v, "some")
    opts = dict(divergence="akl", temperature=2.0, labels=labels, ce_weight=0.5, akl_head_max=32)
    _check_both(kd, case, opts, kd.upstream("mean", (case.n,)))


def test_chunked_backward_and_scale_off(kd):
    """Many backward vocabulary chunks; scale_by_temperature_squared=False."""
    case = kd.make_case("sparse:logprobs:bucket", n=37, v=1031, h_s=32, k=7, bias=True)
    opts = dict(divergence="akl", temperature=1.5, chunk_bytes=37 * 4 * 256, reduction="none",
                scale_by_temperature_squared=False)
    _check_both(kd, case, opts, kd.upstream("none", (case.n,)))


def test_extreme_logits(kd):
    """+-1e4 logits, tokens of probability 0 in both models (-inf), NaN rows that are ignored."""
    case = kd.make_case("logits", n=13, v=1031, scale=30.0, seed=3)
    t = case.tensors
    zs, zt = t["student_logits"], t["teacher_logits"]
    zs[:, 5] = 1e4
    zs[0, :3] = torch.tensor([1e4, -1e4, 0.0])
    zt[:, 7] = zs[:, 7] = -float("inf")
    zt[2, :2] = torch.tensor([1e4, 1e4])          # a teacher tie at the top
    zt[4] = float("nan")
    labels = torch.randint(0, case.v, (case.n,), generator=torch.Generator().manual_seed(4))
    labels[4] = -100
    _check_both(kd, case, dict(divergence="akl", labels=labels, reduction="none", ce_weight=0.2),
                torch.linspace(0.5, 2.0, case.n, dtype=torch.float64))


def test_tiny_student_tail_against_teacher_tail():
    """Bucket: the student puts ~1e-60 outside K where the teacher puts 0.2, so reverse KL's h_Q
    = log Q/P and forward KL's -P/Q are extreme; the weighted backward must stay as accurate as
    the torch backend's against float64 (backend level, fixed weights)."""
    g = torch.Generator().manual_seed(12)
    n, v, h, k = 13, 1031, 32, 7
    hs = torch.randn(n, h, generator=g)
    ws = torch.randn(v, h, generator=g) * 0.1
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    ws[ids[:, 0]] = hs * 0.2
    hs = hs * 5
    vals = torch.log(torch.full((n, k), 0.8 / k))
    labels = torch.full((n,), -1)
    opts = KDOptions(divergence="akl", tail="bucket")
    go = torch.linspace(0.5, 1.5, n)
    w = torch.rand(n, 1, generator=g)
    w = torch.cat([w, 1 - w], 1)
    res = {}
    for name, mod, dt in (("triton", U.TRITON, torch.float32), ("torch", U.TORCH, torch.float32),
                          ("truth", U.TORCH, torch.float64)):
        a, b, vv = hs.to(dt), ws.to(dt), vals.to(dt)
        loss, stats = mod.linear_sparse_kd_forward(a, b, None, ids, vv, labels, opts)
        dh, dw, _ = mod.linear_sparse_kd_backward(a, b, None, ids, vv, labels, stats, go, opts,
                                                  (True, True, False), akl_weights=w.to(dt))
        res[name] = (stats[:, -5:], dh, dw)
    for i, what in enumerate(("public stats", "dh", "dw")):
        U.assert_close_to_reference(what, res["triton"][i], res["torch"][i], res["truth"][i].float())


def _dense_inputs(n=13, v=300, h=24, seed=5):
    g = torch.Generator().manual_seed(seed)
    hs, ws = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.6
    ht, wt = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.6
    return hs, ws, ht, wt, torch.randint(0, v, (n,), generator=g)


@pytest.mark.parametrize("form", ["logits", "linear"])
def test_public_stats_and_ce_only_loss_dense(form):
    """docs/backends.md: loss = the CE part alone, stats[:, -5:] = [lse_p, lse_q, fkl, rkl, tv]
    as the torch backend's (and float64's)."""
    hs, ws, ht, wt, labels = _dense_inputs()
    labels[::4] = -1
    for T, ce in ((1.0, 0.0), (0.7, 0.4)):
        opts = KDOptions(divergence="akl", temperature=T, ce_weight=ce, student_softcap=12.0,
                         teacher_softcap=9.0)
        out = {}
        for name, mod, dt in (("triton", U.TRITON, torch.float32), ("torch", U.TORCH, torch.float32),
                              ("truth", U.TORCH, torch.float64)):
            a, b, c, d = (x.to(dt) for x in (hs, ws, ht, wt))
            if form == "logits":
                out[name] = mod.kd_forward(a @ b.T, c @ d.T, labels, opts)
            else:
                out[name] = mod.linear_kd_forward(a, b, None, c, d, None, labels, opts)
        loss, stats = out["triton"]
        assert stats.shape == (hs.shape[0], 9)
        if ce == 0:
            assert (loss == 0).all()
        for what, j in (("loss", None), ("stats", slice(-5, None))):
            pick = (lambda r: r[0]) if j is None else (lambda r: r[1][:, j])
            U.assert_close_to_reference(f"{form} T={T} {what}", pick(out["triton"]), pick(out["torch"]),
                                        pick(out["truth"]).float())


@pytest.mark.parametrize("tail,values,k", [("bucket", "logprobs", 37), ("bucket", "logprobs", 5),
                                           ("renorm_both", "logprobs", 5), ("renorm_both", "weights", 5)])
def test_public_stats_sparse(tail, values, k):
    """The k + 1 outcomes of each allowed tail mode (k = V: K covers the vocabulary in some rows, one
    empty slot in others); lse_p = 0 for bucket, LSE_K(u) for renorm_both."""
    g = torch.Generator().manual_seed(6)
    n, v, h = 13, 37, 16
    hs, ws = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    zt = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    top = torch.log_softmax(zt, 1).topk(k, 1)
    ids, vals = top.indices.clone(), top.values
    if values == "weights":
        vals = torch.softmax(vals, 1) * 0.9      # not normalized: lse_p = log 0.9
    ids[::3, -1] = -1
    vals = torch.where(ids >= 0, vals, 0.0)
    labels = torch.randint(0, v, (n,), generator=g)
    opts = KDOptions(divergence="akl", tail=tail, values=values, ce_weight=0.5, temperature=1.3)
    got = U.TRITON.linear_sparse_kd_forward(hs, ws, None, ids, vals.float(), labels, opts)
    ref = U.TORCH.linear_sparse_kd_forward(hs, ws, None, ids, vals.float(), labels, opts)
    truth = U.TORCH.linear_sparse_kd_forward(hs.double(), ws.double(), None, ids, vals.float().double(),
                                             labels, opts)
    U.assert_close_to_reference("loss", got[0], ref[0], truth[0].float())
    U.assert_close_to_reference("public stats", got[1][:, -5:], ref[1][:, -5:], truth[1][:, -5:].float())
    if tail == "bucket":
        assert (got[1][:, -5] == 0).all()


@pytest.mark.parametrize("form", ["logits", "linear", "sparse"])
def test_zero_grad_rows_are_exactly_zero(form):
    """A row with grad_row == 0 contributes exactly 0, even with NaN weights and NaN hidden states;
    the other rows do not depend on it."""
    hs, ws, ht, wt, labels = _dense_inputs(v=37)
    n, v = hs.shape[0], ws.shape[0]
    g = torch.Generator().manual_seed(2)
    ids = torch.stack([torch.randperm(v, generator=g)[:6] for _ in range(n)])
    vals = torch.log_softmax(torch.randn(n, 6, generator=g), 1) - 0.3
    go = torch.linspace(0.5, 1.5, n)
    go[[1, 4]] = 0
    opts = KDOptions(divergence="akl", ce_weight=0.3, temperature=1.7)
    w = torch.rand(n, 1, generator=g)
    w = torch.cat([w, 1 - w], 1)
    out = []
    for poison in (False, True):
        a, wts = hs.clone(), w.clone()
        if poison:
            a[1] = float("nan")
            wts[1] = float("nan")
            wts[4] = float("inf")
        T = U.TRITON
        if form == "logits":
            zs, zt = a @ ws.T, ht @ wt.T
            _, st = T.kd_forward(zs, zt, labels, opts)
            out.append((T.kd_backward(zs, zt, labels, st, go, opts, akl_weights=wts),))
        elif form == "linear":
            _, st = T.linear_kd_forward(a, ws, None, ht, wt, None, labels, opts)
            out.append(T.linear_kd_backward(a, ws, None, ht, wt, None, labels, st, go, opts,
                                            (True, True, False), akl_weights=wts)[:2])
        else:
            _, st = T.linear_sparse_kd_forward(a, ws, None, ids, vals, labels, opts)
            out.append(T.linear_sparse_kd_backward(a, ws, None, ids, vals, labels, st, go, opts,
                                                   (True, True, False), akl_weights=wts)[:2])
    for x, y in zip(*out):
        assert torch.isfinite(y).all()
        assert torch.equal(x, y)
    assert (out[1][0][[1, 4]] == 0).all()


def test_weights_enter_linearly():
    """The backward is linear in [w_h, w_t] plus the CE part: w = (1, 0) gives forward KL's gradient
    and (0, 1) reverse KL's, each as the triton backend computes those divergences."""
    hs, ws, ht, wt, labels = _dense_inputs(v=300)
    n = hs.shape[0]
    go = torch.linspace(0.5, 1.5, n)
    need = (True, True, False)
    for name, w in (("forward_kl", (1.0, 0.0)), ("reverse_kl", (0.0, 1.0))):
        o = KDOptions(divergence="akl", temperature=1.3)
        _, st = U.TRITON.linear_kd_forward(hs, ws, None, ht, wt, None, labels, o)
        a = U.TRITON.linear_kd_backward(hs, ws, None, ht, wt, None, labels, st, go, o, need,
                                        akl_weights=torch.tensor([w]).expand(n, 2))
        o2 = KDOptions(divergence=name, temperature=1.3)
        _, st2 = U.TRITON.linear_kd_forward(hs, ws, None, ht, wt, None, labels, o2)
        b = U.TRITON.linear_kd_backward(hs, ws, None, ht, wt, None, labels, st2, go, o2, need)
        for x, y in zip(a[:2], b[:2]):
            torch.testing.assert_close(x, y, rtol=0, atol=float(y.abs().max()) * 1e-5)


def test_rejected_and_dispatch():
    """Explicit backend='triton' serves every akl op (nothing left in UNSUPPORTED_OPS); the
    combinations the spec rejects raise before any kernel runs."""
    assert not any("akl" in op for op in U.TRITON.UNSUPPORTED_OPS)
    hs, ws = torch.randn(3, 8), torch.randn(11, 8)
    ids, vals = torch.tensor([[0, 1]] * 3), torch.full((3, 2), -1.0)
    with pytest.raises(ValueError, match="renorm_teacher"):
        kdkernels.fused_linear_sparse_kd_loss(hs, ws, ids, vals, divergence="akl", tail="renorm_teacher",
                                              backend="triton")
    with pytest.raises(ValueError, match="weights"):
        kdkernels.fused_linear_sparse_kd_loss(hs, ws, ids, vals.exp(), divergence="akl", values="weights",
                                              backend="triton")


@pytest.mark.parametrize("divergence", ["akl", "forward_kl"])
def test_sparse_id_cursor_edge_cases(divergence):
    """The sparse kernels walk each row's sorted ids with a cursor (docs/triton.md): ids packed
    into one tile, on both sides of tile (256), split (768) and backward-chunk edges, the last
    column, a row of empty slots, a row whose ids all lie in the last partial tile; shuffled slots.
    Forward stats and dh, dW against the torch backend and float64."""
    g = torch.Generator().manual_seed(21)
    n, v, h, k = 9, 1031, 16, 12
    rows = [list(range(12)), [255, 256, 511, 512, 767, 768, 0, 1030, 300, 301, -1, -1],
            [-1] * k, list(range(1019, 1031)), [5, 700, 1000, 255, 257, 766, 769, -1, 2, 3, 4, 6],
            list(range(250, 262)), list(range(760, 772)), [1030, 0, -1, 512, -1, -1, -1, 9, 8, 7, 6, 5],
            list(range(100, 1031, 80))[:k]]
    ids = torch.tensor(rows)
    ids = ids.gather(1, torch.argsort(torch.rand(n, k, generator=g), 1))
    hs, ws = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.7
    lp = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, 1)
    vals = torch.where(ids >= 0, lp.gather(1, ids.clamp_min(0)), 0.0)
    labels = torch.randint(0, v, (n,), generator=g)
    opts = KDOptions(divergence=divergence, ce_weight=0.2, temperature=1.2, chunk_bytes=n * 4 * 256)
    go = torch.linspace(0.5, 1.5, n)
    w = torch.rand(n, 1, generator=g)
    w = torch.cat([w, 1 - w], 1)
    res = {}
    for name, mod, dt in (("triton", U.TRITON, torch.float32), ("torch", U.TORCH, torch.float32),
                          ("truth", U.TORCH, torch.float64)):
        a, b, vv = hs.to(dt), ws.to(dt), vals.to(dt)
        loss, stats = mod.linear_sparse_kd_forward(a, b, None, ids, vv, labels, opts)
        kw = dict(akl_weights=w.to(dt)) if divergence == "akl" else {}
        dh, dw, _ = mod.linear_sparse_kd_backward(a, b, None, ids, vv, labels, stats, go, opts,
                                                  (True, True, False), **kw)
        if divergence != "akl" and name != "triton":
            stats = U.lse_stats(stats)
        res[name] = (loss, stats[:, -5:] if divergence == "akl" else stats[:, [0, 2, 3]], dh, dw)
    for i, what in enumerate(("loss", "stats", "dh", "dw")):
        U.assert_close_to_reference(what, res["triton"][i], res["torch"][i], res["truth"][i].float())
