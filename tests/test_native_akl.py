"""divergence="akl" on the native backend's CPU build (csrc/, the same host/device math the CUDA
kernels run).

Two levels:
- the public API with backend="native" against the float64 AKL of tests/reference.py (head set and
  detached weights included), error at most 2x naive fp32 PyTorch's + a floor (conftest `kd.check`);
- the contract functions (docs/backends.md, `divergence="akl"`): the forward's public stats
  [lse_p, lse_q, fkl, rkl, tv] and the backward with given `akl_weights`, against float64 formulas
  written here from tests/reference.py's pieces (bound: 2x the same formulas in fp32 + floor) and
  against the torch backend's contract functions.
"""
from __future__ import annotations

import math

import pytest
import torch

import reference as R

pytestmark = pytest.mark.native

AKL_FORMS = [f for f in R.FORMS if not R.rejected(f, "akl")]
# (values, tail) of a sparse teacher that AKL allows (reverse KL must be finite)
SPARSE_MODES = [tuple(f.split(":")[1:]) for f in AKL_FORMS if f.startswith("sparse")]


@pytest.fixture(scope="session")
def native():
    from kdkernels.backends.native import _loader
    why = _loader.missing_tools(False)
    if why is not None and not _loader.is_loaded_or_prebuilt(False):
        pytest.skip(f"native CPU extension cannot be built here: {why}")
    _loader.load(False)
    return torch.ops.kdkernels_native


def _api(divergence="akl", **kw):
    return dict(divergence=divergence, backend="native", **kw)


def _mu(form):
    """A sampled cache (values="weights", 48 draws) has p = count / 48: a cumulative p of exactly 0.5
    is common, and there H's cut (before < mu) is decided by the last bit of p, which no two
    float32 computations (nor float64 vs float32) need agree on. mu = 0.51 keeps every cumulative
    sum >= 0.01 away from the cut; other forms use the default."""
    return 0.51 if ":weights:" in form else 0.5


# --------------------------------------------------------------------------------------------------
# public API vs float64 reference


@pytest.mark.parametrize("form", AKL_FORMS)
def test_forms(native, kd, form):
    """Every allowed teacher form; T != 1, ignored rows, CE term, non-unit upstream gradient,
    (N, V) = (13, 37) and (37, 1031) with many vocabulary chunks (N odd)."""
    for (n, v, T, reduction, ignore, chunk) in ((13, 37, 0.7, "none", "some", None),
                                                (13, 37, 2.0, "sum", "none", None),
                                                (37, 1031, 1.5, "mean", "some", 37 * 4 * 64)):
        case = kd.make_case(form, n=n, v=v, k=16, temperature=T, seed=n + v)
        labels = kd.make_labels(n, v, ignore)
        opts = _api(temperature=T, labels=labels, reduction=reduction, mu=_mu(form),
                    ce_weight=0.3 if labels is not None else 0.0, chunk_bytes=chunk)
        try:
            kd.check(case, opts, kd.upstream(reduction, (n,)))
        except AssertionError as e:
            raise AssertionError(f"n={n} v={v} T={T} {reduction}: {e}") from None


@pytest.mark.parametrize("form", AKL_FORMS)
def test_all_ignored(native, kd, form):
    case = kd.make_case(form, seed=4)
    labels = kd.make_labels(case.n, case.v, "all")
    loss, grads = kd.check(case, _api(labels=labels, ce_weight=0.5, mu=_mu(form)), kd.upstream("mean", ()))
    assert (loss == 0).all() and all((g == 0).all() for g in grads.values())


@pytest.mark.parametrize("form", ["logits", "linear", "sparse:logprobs:bucket"])
def test_softcap_bias_mu_head_cap(native, kd, form):
    """Softcaps and a bias; mu and akl_head_max (a cap that binds, and one token)."""
    case = kd.make_case(form, n=15, v=263, k=12, temperature=1.3, seed=6, bias=form != "logits",
                        student_softcap=9.0 if form != "logits" else None,
                        teacher_softcap=11.0 if form == "linear" else None)
    labels = kd.make_labels(case.n, case.v, "some")
    for mu, head_max in ((0.5, 256), (0.9, 3), (0.3, 1)):
        kd.check(case, _api(temperature=1.3, mu=mu, akl_head_max=head_max, labels=labels, ce_weight=0.2,
                            chunk_bytes=15 * 4 * 64), kd.upstream("mean", ()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["logits", "linear", "sparse:logprobs:bucket", "sparse:weights:renorm_both"])
def test_low_precision(native, kd, form, dtype):
    case = kd.make_case(form, n=29, v=263, dtype=dtype, seed=5, bias=form != "logits")
    labels = kd.make_labels(case.n, case.v, "some")
    kd.check(case, _api(temperature=2.0, labels=labels, ce_weight=0.5, mu=_mu(form), chunk_bytes=29 * 2 * 64),
             kd.upstream("mean", ()))


@pytest.mark.parametrize("form", ["logits", "linear", "sparse:logprobs:bucket"])
def test_gpt2_vocab(native, kd, form):
    """V = 50257 (GPT-2), a few rows, the fused ops in several vocabulary chunks."""
    case = kd.make_case(form, n=3, v=50257, k=32, seed=8)
    kd.check(case, _api(temperature=1.0, labels=kd.make_labels(3, 50257, "none"),
                        chunk_bytes=3 * 4 * 8192), kd.upstream("sum", ()))


def test_extreme_logits(native, kd):
    """Logits ~1e3, +-1e4 entries, tokens of probability 0 for both (-inf), a NaN in an ignored row."""
    import kdkernels
    case = kd.make_case("logits", n=11, v=1031, scale=300.0, seed=9)
    zs, zt = case.tensors["student_logits"], case.tensors["teacher_logits"]
    zt[:, ::7] = float("-inf")
    zs[:, ::7] = float("-inf")      # KL(q || p) stays finite: q = 0 wherever p = 0
    zs[0, 1:3] = torch.tensor([1e4, -1e4])
    zt[2, 1:4] = 1e4                # a three-way tie at the top (p = 1/3 each, away from mu's cut)
    kd.check(case, _api(), kd.upstream("sum", ()))
    labels = kd.make_labels(11, 1031, "some")
    labels[labels % 7 == 0] += 1    # no CE label on a -inf student logit
    assert labels[1] == -100
    zs = zs.clone()
    zs[1, 3] = float("nan")
    zs.requires_grad_(True)
    loss = kdkernels.kd_loss(zs, zt, labels=labels, ce_weight=0.2, **_api())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all() and (zs.grad[1] == 0).all()


def test_equal_distributions_give_zero(native):
    import kdkernels
    z = torch.randn(7, 1031, generator=torch.Generator().manual_seed(1)) * 3
    zs = z.clone().requires_grad_(True)
    loss = kdkernels.kd_loss(zs, z, **_api())
    loss.backward()
    assert abs(float(loss.detach())) < 1e-5 and float(zs.grad.abs().max()) < 1e-6


# --------------------------------------------------------------------------------------------------
# contract functions: stats and weighted backward against float64, and against the torch backend


def _weights(n, g):
    w_h = torch.rand(n, generator=g)
    w_h[0], w_h[1] = 1.0, 0.0          # the pure forward / reverse KL rows
    return torch.stack([w_h, 1 - w_h], 1)


def _rows_and_stats(lp, lq, w, zs, labels, kd_scale, ce_weight):
    """(loss rows with the weights, [fkl, rkl, tv]) from log-probs over the outcomes (reference.py)."""
    fkl = R.divergence(lp, lq, "forward_kl")
    rkl = R.divergence(lp, lq, "reverse_kl")
    tv = 2 * R.divergence(lp, lq, "tvd")
    ce = torch.where(labels >= 0, R.cross_entropy_rows(zs, labels.clamp_min(0)), 0.0)
    rows = kd_scale * (w[:, 0].to(fkl.dtype) * fkl + w[:, 1].to(fkl.dtype) * rkl) + ce_weight * ce
    return rows, torch.stack([fkl, rkl, tv], 1)


def _oracle(fn, leaves, grad_rows, compute):
    """fn(*leaves as `compute`) -> (rows, stats); returns (stats, [d leaf]) of sum(grad_rows * rows)."""
    xs = [x.detach().to(compute).requires_grad_(True) for x in leaves]
    rows, stats = fn(*xs)
    (rows * grad_rows.to(compute)).sum().backward()
    return stats.detach(), [x.grad for x in xs]


def _compare(what, got_stats, got_grads, fn, leaves, grad_rows, scale):
    truth = _oracle(fn, leaves, grad_rows, torch.float64)
    naive = _oracle(fn, leaves, grad_rows, torch.float32)
    for c, name in enumerate(("lse_p", "lse_q", "fkl", "rkl", "tv")):
        R.assert_like_naive(f"{what} {name}", got_stats[:, c], truth[0][:, c], naive[0][:, c], scale)
    for i, (g, t, nv) in enumerate(zip(got_grads, truth[1], naive[1])):
        R.assert_like_naive(f"{what} grad {i}", g, t, nv, scale)


def _vs_torch(what, nat_out, tb_out, nat_grads, tb_grads):
    """Native and torch backends: same formulas in fp32 (different exp and summation order)."""
    torch.testing.assert_close(nat_out[1][:, -5:], tb_out[1][:, -5:], rtol=2e-5, atol=2e-5, msg=what)
    torch.testing.assert_close(nat_out[0], tb_out[0], rtol=2e-5, atol=2e-5, msg=what)
    for a, b in zip(nat_grads, tb_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=64 * 2**-23 * 8 * max(float(b.abs().max()), 1e-3),
                                   msg=what)


def _scale(*logits, T):
    return max(float(z.abs().max()) for z in logits) / T


@pytest.mark.parametrize("T, cap", [(1.0, None), (0.6, 7.0)])
def test_contract_dense(native, T, cap):
    """kd_forward/backward and linear_kd_* (V = 1031, many chunks): public stats, CE-only loss and the
    gradient of kd_scale (w_h fkl + w_t rkl) + ce with given weights; rows with grad_rows = 0 are 0."""
    import kdkernels.backends.native as nat
    import kdkernels.backends.torch as tb
    from kdkernels.options import KDOptions
    g = torch.Generator().manual_seed(11)
    n, v = 21, 1031
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -1
    gr = torch.randn(n, generator=g)
    gr[2::5] = 0
    w = _weights(n, g)
    o = KDOptions(divergence="akl", ce_weight=0.25, temperature=T, chunk_bytes=n * 4 * 3 * 96)

    def dense(zs_, zt_):
        lq, lp = torch.log_softmax(zs_ / T, -1), torch.log_softmax(zt_ / T, -1)
        rows, st = _rows_and_stats(lp, lq, w, zs_, labels, o.kd_scale, o.ce_weight)
        return rows, torch.cat([torch.logsumexp(zt_ / T, -1, keepdim=True),
                                torch.logsumexp(zs_ / T, -1, keepdim=True), st], 1)

    zs = torch.randn(n, v, generator=g) * 4
    zt = 0.5 * zs + torch.randn(n, v, generator=g) * 3
    out = nat.kd_forward(zs, zt, labels, o)
    assert out[1].shape == (n, 7) and out[1].dtype == torch.float32
    gz = nat.kd_backward(zs, zt, labels, out[1], gr, o, akl_weights=w)
    _compare("kd", out[1][:, -5:], [gz], dense, [zs, zt], gr, _scale(zs, zt, T=T))
    tb_out = tb.kd_forward(zs, zt, labels, o)
    _vs_torch("kd", out, tb_out, [gz], [tb.kd_backward(zs, zt, labels, tb_out[1], gr, o, akl_weights=w)])
    # a NaN in a row with grad_rows = 0: that row's gradient is exactly 0, the others unchanged
    zs_nan = zs.clone()
    zs_nan[2, 5] = float("nan")
    assert gr[2] == 0
    g_nan = nat.kd_backward(zs_nan, zt, labels, nat.kd_forward(zs_nan, zt, labels, o)[1], gr, o,
                            akl_weights=w)
    assert (g_nan[2] == 0).all() and torch.equal(g_nan[3:], gz[3:]) and (gz[gr == 0] == 0).all()

    oc = KDOptions(divergence="akl", ce_weight=0.25, temperature=T, student_softcap=cap,
                   chunk_bytes=n * 4 * 3 * 96)
    hs, ws = torch.randn(n, 16, generator=g), torch.randn(v, 16, generator=g) * 0.8
    ht, wt = torch.randn(n, 8, generator=g), torch.randn(v, 8, generator=g)
    bs = torch.randn(v, generator=g) * 0.3

    def linear(hs_, ws_, bs_):
        zs_ = R.head_logits(hs_, ws_, bs_, cap, hs_.dtype)
        zt_ = R.head_logits(ht.to(hs_.dtype), wt.to(hs_.dtype), None, None, hs_.dtype)
        return dense(zs_, zt_)

    out = nat.linear_kd_forward(hs, ws, bs, ht, wt, None, labels, oc)
    need = (True, True, True)
    grads = nat.linear_kd_backward(hs, ws, bs, ht, wt, None, labels, out[1], gr, oc, need, akl_weights=w)
    _compare("linear", out[1][:, -5:], grads, linear, [hs, ws, bs], gr,
             _scale(R.head_logits(hs, ws, bs), R.head_logits(ht, wt), T=T))
    tb_out = tb.linear_kd_forward(hs, ws, bs, ht, wt, None, labels, oc)
    _vs_torch("linear", out, tb_out, grads,
              tb.linear_kd_backward(hs, ws, bs, ht, wt, None, labels, tb_out[1], gr, oc, need, akl_weights=w))
    frozen = nat.linear_kd_backward(hs, ws, bs, ht, wt, None, labels, out[1], gr, oc, (True, False, False),
                                    akl_weights=w)
    assert frozen[1] is None and frozen[2] is None
    torch.testing.assert_close(frozen[0], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize("values, tail", SPARSE_MODES)
def test_contract_sparse(native, kd, values, tail):
    """linear_sparse_kd_* in every tail mode AKL allows: the tail outcome of the mode in fkl, rkl and
    tv, lse_p as the mode defines it, the weighted h_Q and S; V = 1031 in many chunks, empty slots."""
    import kdkernels.backends.native as nat
    import kdkernels.backends.torch as tb
    from kdkernels.options import KDOptions
    g = torch.Generator().manual_seed(12)
    n, v, k, T = 19, 1031, 24, 1.7
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1::3] = -1
    gr = torch.randn(n, generator=g)
    gr[4::6] = 0
    w = _weights(n, g)
    hs, ws = torch.randn(n, 16, generator=g), torch.randn(v, 16, generator=g) * 0.8
    zt64 = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    ids, vals = kd.sparse_teacher(zt64, values, k, T, g)
    o = KDOptions(divergence="akl", ce_weight=0.4, temperature=T, values=values, tail=tail,
                  chunk_bytes=n * 4 * 2 * 64)

    def sparse(hs_, ws_):
        zs_ = R.head_logits(hs_, ws_, None, None, hs_.dtype)
        parts = {d: R.sparse_rows(zs_, ids, vals, values=values, tail=tail, divergence_name=d,
                                  temperature=T, scale_by_temperature_squared=False)
                 for d in ("forward_kl", "reverse_kl", "tvd")}
        ce = torch.where(labels >= 0, R.cross_entropy_rows(zs_, labels.clamp_min(0)), 0.0)
        rows = o.kd_scale * (w[:, 0].to(zs_.dtype) * parts["forward_kl"]
                             + w[:, 1].to(zs_.dtype) * parts["reverse_kl"]) + o.ce_weight * ce
        valid = ids >= 0
        u = vals.to(zs_.dtype)
        u = torch.where(valid, torch.log(u) if values == "weights" else u, -math.inf)
        lse_p = torch.zeros(n, dtype=zs_.dtype) if tail == "bucket" else torch.logsumexp(u, 1)
        b = zs_ / T
        lse_q = (torch.logsumexp(b, 1) if tail != "renorm_both"
                 else torch.logsumexp(torch.where(valid, b.gather(1, ids.clamp_min(0)), -math.inf), 1))
        return rows, torch.stack([lse_p, lse_q, parts["forward_kl"], parts["reverse_kl"], 2 * parts["tvd"]], 1)

    out = nat.linear_sparse_kd_forward(hs, ws, None, ids, vals, labels, o)
    assert out[1].shape == (n, 9)
    need = (True, True, False)
    grads = nat.linear_sparse_kd_backward(hs, ws, None, ids, vals, labels, out[1], gr, o, need,
                                          akl_weights=w)
    assert grads[2] is None and (grads[0][gr == 0] == 0).all()
    _compare(f"sparse {values} {tail}", out[1][:, -5:], grads[:2], sparse, [hs, ws], gr,
             _scale(R.head_logits(hs, ws), T=T))
    tb_out = tb.linear_sparse_kd_forward(hs, ws, None, ids, vals, labels, o)
    tb_grads = tb.linear_sparse_kd_backward(hs, ws, None, ids, vals, labels, tb_out[1], gr, o, need,
                                            akl_weights=w)
    _vs_torch(f"sparse {values} {tail}", out, tb_out, grads[:2], tb_grads[:2])


def test_weights_mix_the_two_kls(native):
    """Backward with weights [1, 0] is the forward-KL gradient, [0, 1] the reverse-KL gradient, and
    any weights their mixture (the native forward_kl / reverse_kl ops as the other side)."""
    import kdkernels.backends.native as nat
    from kdkernels.options import KDOptions
    g = torch.Generator().manual_seed(13)
    n, v = 9, 517
    zs, zt = torch.randn(n, v, generator=g) * 3, torch.randn(n, v, generator=g) * 3
    labels = torch.full((n,), -1)
    gr = torch.rand(n, generator=g) + 0.5
    o = KDOptions(divergence="akl", temperature=1.4)
    st = nat.kd_forward(zs, zt, labels, o)[1]
    ref = {}
    for d in ("forward_kl", "reverse_kl"):
        od = KDOptions(divergence=d, temperature=1.4)
        loss, s = nat.kd_forward(zs, zt, labels, od)
        ref[d] = nat.kd_backward(zs, zt, labels, s, gr, od)
        torch.testing.assert_close(st[:, -3 if d == "forward_kl" else -2] * od.kd_scale, loss, rtol=1e-6,
                                   atol=1e-6)
    w = torch.rand(n, generator=g)
    for wh in (torch.ones(n), torch.zeros(n), w):
        got = nat.kd_backward(zs, zt, labels, st, gr, o, akl_weights=torch.stack([wh, 1 - wh], 1))
        want = wh[:, None] * ref["forward_kl"] + (1 - wh[:, None]) * ref["reverse_kl"]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))


def test_float64_vs_torch(native):
    """float64 inputs end to end (dense and sparse): native and torch agree to ~1e-10."""
    import kdkernels.backends.native as nat
    import kdkernels.backends.torch as tb
    from kdkernels.options import KDOptions
    g = torch.Generator().manual_seed(14)
    n, v, k = 7, 53, 9
    zs, zt = torch.randn(n, v, generator=g, dtype=torch.float64) * 3, torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, v, (n,), generator=g)
    gr = torch.rand(n, generator=g)
    w = _weights(n, g).double()
    o = KDOptions(divergence="akl", ce_weight=0.3, temperature=0.8)
    a, b = tb.kd_forward(zs, zt, labels, o), nat.kd_forward(zs, zt, labels, o)
    assert b[1].dtype == torch.float64
    torch.testing.assert_close(b[1][:, -5:], a[1][:, -5:], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(nat.kd_backward(zs, zt, labels, b[1], gr, o, akl_weights=w),
                               tb.kd_backward(zs, zt, labels, a[1], gr, o, akl_weights=w), rtol=1e-6, atol=1e-9)
    hs, ws = torch.randn(n, 12, generator=g, dtype=torch.float64), torch.randn(v, 12, generator=g, dtype=torch.float64)
    lp = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, -1)
    ids = torch.topk(lp, k, 1).indices
    vals = lp.gather(1, ids)
    for tail in ("bucket", "renorm_both"):
        o = KDOptions(divergence="akl", tail=tail, ce_weight=0.3, temperature=0.8)
        a = tb.linear_sparse_kd_forward(hs, ws, None, ids, vals, labels, o)
        b = nat.linear_sparse_kd_forward(hs, ws, None, ids, vals, labels, o)
        torch.testing.assert_close(b[1][:, -5:], a[1][:, -5:], rtol=1e-10, atol=1e-10)
        need = (True, True, False)
        ga = tb.linear_sparse_kd_backward(hs, ws, None, ids, vals, labels, a[1], gr, o, need, akl_weights=w)
        gb = nat.linear_sparse_kd_backward(hs, ws, None, ids, vals, labels, b[1], gr, o, need, akl_weights=w)
        for x, y in zip(gb[:2], ga[:2]):
            # far below fp32 rounding; the two backends' float64 sparse gradients already differ at
            # ~1e-9 of their scale for forward_kl (summation order in the head GEMMs' cancellations)
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7 * float(y.abs().max()))


# --------------------------------------------------------------------------------------------------
# ops: schema, meta kernels, errors, inputs untouched


def _akl_args(native):
    from kdkernels.backends.native._ops import options_lists
    from kdkernels.options import KDOptions
    g = torch.Generator().manual_seed(0)
    n, v, h, k = 5, 67, 8, 4
    f, i = options_lists(KDOptions(divergence="akl", temperature=1.5, ce_weight=0.2))
    assert i[0] == 6
    zs, zt = torch.randn(n, v, generator=g), torch.randn(n, v, generator=g)
    lab = torch.randint(0, v, (n,), generator=g)
    hs, ws, bs = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g), torch.randn(v, generator=g)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    vals = torch.log_softmax(torch.randn(n, v, generator=g), -1).gather(1, ids)
    _, st = native.kd_forward(zs, zt, lab, f, i)
    _, st_l = native.linear_kd_forward(hs, ws, bs, hs, ws, None, lab, f, i)
    _, st_s = native.linear_sparse_kd_forward(hs, ws, bs, ids, vals, lab, f, i)
    gr = torch.rand(n, generator=g)
    w = _weights(n, g)
    need = [True, True, True]
    return {
        "kd_forward": (zs, zt, lab, f, i),
        "kd_backward": (zs, zt, lab, st, gr, f, i, w),
        "linear_kd_forward": (hs, ws, bs, hs, ws, None, lab, f, i),
        "linear_kd_backward": (hs, ws, bs, hs, ws, None, lab, st_l, gr, f, i, need, w),
        "linear_sparse_kd_forward": (hs, ws, bs, ids, vals, lab, f, i),
        "linear_sparse_kd_backward": (hs, ws, bs, ids, vals, lab, st_s, gr, f, i, need, w),
    }


def test_opcheck(native):
    """The akl_weights argument in the schemas, AKL's stats widths in the Meta kernels."""
    opcheck = getattr(torch.library, "opcheck", None)
    if opcheck is None:
        pytest.skip("torch.library.opcheck needs torch >= 2.4")
    for name, args in _akl_args(native).items():
        opcheck(getattr(native, name).default, args)


def test_errors(native):
    args = _akl_args(native)
    zs, zt, lab, st, gr, f, i, w = args["kd_backward"]
    with pytest.raises(RuntimeError, match="akl_weights"):
        native.kd_backward(zs, zt, lab, st, gr, f, i)
    with pytest.raises(RuntimeError, match="akl_weights"):
        native.kd_backward(zs, zt, lab, st, gr, f, i, w[:, :1])
    with pytest.raises(RuntimeError, match="stats"):
        native.kd_backward(zs, zt, lab, st[:, :4], gr, f, i, w)
    a = list(args["linear_sparse_kd_backward"])
    with pytest.raises(RuntimeError, match="akl_weights"):
        native.linear_sparse_kd_backward(*a[:-1])
    with pytest.raises(RuntimeError, match="bad divergence"):
        native.kd_forward(zs, zt, lab, f, [7] + list(i[1:]))


def test_inputs_untouched(native, kd):
    for form in ("linear", "sparse:logprobs:bucket"):
        case = kd.make_case(form, n=13, v=301, seed=1, bias=True)
        before = {k: t.clone() for k, t in case.tensors.items()}
        kd.run(case, "kd", _api(ce_weight=0.2, labels=kd.make_labels(13, 301, "some")))
        for k, t in case.tensors.items():
            assert torch.equal(t, before[k]), (form, k)
