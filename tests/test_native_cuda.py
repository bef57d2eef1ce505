"""The native backend's CUDA kernels (csrc/cuda/) on a GPU: the public API with backend="native" on
CUDA tensors against the float64 formulas (conftest `kd.check`, bound 2x naive + floor) and against
the torch backend. Every test skips without a CUDA device (checked inside the test, never at
collection). The first test that runs builds the CUDA extension (a few minutes) unless it is cached.
"""
from __future__ import annotations

import pytest
import torch

import reference as R

pytestmark = [pytest.mark.gpu, pytest.mark.native]


def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from kdkernels.backends import native
    why = native.availability("cuda")
    if why is not None:
        pytest.skip(f"native CUDA build unavailable: {why}")


def _to_cuda(case):
    case.tensors = {k: t.cuda() for k, t in case.tensors.items()}
    return case


@pytest.mark.parametrize("form", R.FORMS)
def test_forms_fp32(kd, form):
    _need_cuda()
    for div in R.DIVERGENCES:
        if R.rejected(form, div):
            continue
        case = _to_cuda(kd.make_case(form, n=37, v=1031, k=16, temperature=1.5, seed=11,
                                     bias=form != "logits",
                                     student_softcap=20.0 if form != "logits" else None))
        labels = kd.make_labels(case.n, case.v, "some").cuda()
        opts = dict(divergence=div, temperature=1.5, labels=labels, backend="native", reduction="none",
                    ce_weight=0.2, chunk_bytes=37 * 4 * 96)
        go = kd.upstream("none", (case.n,)).cuda()
        try:
            kd.check(case, opts, go)
        except AssertionError as e:
            raise AssertionError(f"{div}: {e}") from None


@pytest.mark.parametrize("form", ["logits", "linear", "sparse:logprobs:bucket", "sparse:weights:renorm_both"])
def test_bf16(kd, form):
    _need_cuda()
    case = _to_cuda(kd.make_case(form, n=64, v=4099, h_s=64, h_t=96, k=32, dtype=torch.bfloat16, seed=2))
    labels = kd.make_labels(case.n, case.v, "some").cuda()
    for div in ("forward_kl", "jsd"):
        kd.check(case, dict(divergence=div, labels=labels, backend="native", ce_weight=0.1,
                            chunk_bytes=64 * 2 * 512), kd.upstream("mean", ()).cuda())


def test_all_ignored_and_nan_rows(kd):
    _need_cuda()
    import kdkernels
    zs = (torch.randn(8, 513, device="cuda") * 3).requires_grad_(True)
    zt = torch.randn(8, 513, device="cuda")
    labels = torch.full((8,), -100, device="cuda")
    loss = kdkernels.kd_loss(zs, zt, labels=labels, backend="native")
    loss.backward()
    assert loss.item() == 0 and (zs.grad == 0).all()


def test_topk_matches_torch():
    _need_cuda()
    import kdkernels
    g = torch.Generator().manual_seed(1)
    h = torch.randn(33, 64, generator=g).cuda()
    w = torch.randn(5003, 64, generator=g).cuda()
    w[4000:4010] = w[7]
    for k in (1, 17, 64):
        ref = kdkernels.linear_topk(h, w, k, temperature=0.8, backend="torch")
        got = kdkernels.linear_topk(h, w, k, temperature=0.8, backend="native", chunk_bytes=33 * 4 * 700)
        torch.testing.assert_close(got.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.logsumexp, ref.logsumexp, rtol=1e-5, atol=1e-5)
        lp = torch.log_softmax((h @ w.T) / 0.8, -1)
        torch.testing.assert_close(got.logprobs, lp.gather(1, got.ids), rtol=1e-5, atol=1e-5)


def test_opcheck_cuda():
    _need_cuda()
    opcheck = getattr(torch.library, "opcheck", None)
    if opcheck is None:
        pytest.skip("torch.library.opcheck needs torch >= 2.4")
    from test_native_cpu import _sample_args
    from kdkernels.backends.native import _loader
    _loader.load(cuda=True)
    ops = torch.ops.kdkernels_native
    for name, args in _sample_args(ops).items():
        cuda_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        opcheck(getattr(ops, name).default, cuda_args)


# --------------------------------------------------------------------------------------------------
# divergence="akl" (tests/test_native_akl.py holds the CPU build's cases)


def _akl_mu(form):
    from test_native_akl import _mu   # sampled caches: keep H's cut away from p = count / 48 sums
    return _mu(form)


@pytest.mark.parametrize("form", [f for f in R.FORMS if not R.rejected(f, "akl")])
def test_akl_forms_fp32(kd, form):
    _need_cuda()
    case = _to_cuda(kd.make_case(form, n=37, v=1031, k=16, temperature=1.5, seed=12, bias=form != "logits",
                                 student_softcap=20.0 if form != "logits" else None))
    labels = kd.make_labels(case.n, case.v, "some").cuda()
    opts = dict(divergence="akl", temperature=1.5, labels=labels, backend="native", reduction="none",
                ce_weight=0.2, chunk_bytes=37 * 4 * 96, mu=_akl_mu(form))
    kd.check(case, opts, kd.upstream("none", (case.n,)).cuda())


@pytest.mark.parametrize("form", ["logits", "linear", "sparse:logprobs:bucket", "sparse:weights:renorm_both"])
def test_akl_bf16_and_all_ignored(kd, form):
    _need_cuda()
    case = _to_cuda(kd.make_case(form, n=64, v=4099, h_s=64, h_t=96, k=32, dtype=torch.bfloat16, seed=3))
    for pattern in ("some", "all"):
        labels = kd.make_labels(case.n, case.v, pattern).cuda()
        loss, grads = kd.check(case, dict(divergence="akl", labels=labels, backend="native", ce_weight=0.1,
                                          chunk_bytes=64 * 2 * 512, mu=_akl_mu(form)),
                               kd.upstream("mean", ()).cuda())
        if pattern == "all":
            assert (loss == 0).all() and all((g == 0).all() for g in grads.values())


def test_akl_contract_vs_cpu_build():
    """The CUDA kernels against the CPU build (same shared math): public stats and the weighted
    backward, dense (kd_*) and sparse bucket (linear_sparse_kd_*), V = 1031 in several chunks."""
    _need_cuda()
    import kdkernels.backends.native as nat
    from kdkernels.options import KDOptions
    g = torch.Generator().manual_seed(5)
    n, v, k = 33, 1031, 16
    zs, zt = torch.randn(n, v, generator=g) * 4, torch.randn(n, v, generator=g) * 4
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::3] = -1
    gr = torch.randn(n, generator=g)
    gr[::4] = 0
    wh = torch.rand(n, generator=g)
    w = torch.stack([wh, 1 - wh], 1)
    o = KDOptions(divergence="akl", ce_weight=0.3, temperature=1.2, chunk_bytes=n * 4 * 2 * 128)
    cpu = nat.kd_forward(zs, zt, labels, o)
    dev = nat.kd_forward(zs.cuda(), zt.cuda(), labels.cuda(), o)
    torch.testing.assert_close(dev[1][:, -5:].cpu(), cpu[1][:, -5:], rtol=1e-5, atol=1e-5)
    g_cpu = nat.kd_backward(zs, zt, labels, cpu[1], gr, o, akl_weights=w)
    g_dev = nat.kd_backward(zs.cuda(), zt.cuda(), labels.cuda(), dev[1], gr.cuda(), o, akl_weights=w.cuda())
    torch.testing.assert_close(g_dev.cpu(), g_cpu, rtol=0, atol=1e-6 * float(g_cpu.abs().max()) + 1e-9)
    assert (g_dev[gr.cuda() == 0] == 0).all()
    hs, ws = torch.randn(n, 16, generator=g), torch.randn(v, 16, generator=g)
    lp = torch.log_softmax(torch.randn(n, v, generator=g) * 3, -1)
    ids = torch.topk(lp, k, 1).indices
    vals = lp.gather(1, ids)
    ids[::5, -1] = -1
    for tail in ("bucket", "renorm_both"):
        os_ = KDOptions(divergence="akl", tail=tail, ce_weight=0.3, temperature=1.2, chunk_bytes=n * 4 * 2 * 128)
        c = nat.linear_sparse_kd_forward(hs, ws, None, ids, vals, labels, os_)
        d = nat.linear_sparse_kd_forward(hs.cuda(), ws.cuda(), None, ids.cuda(), vals.cuda(), labels.cuda(), os_)
        torch.testing.assert_close(d[1][:, -5:].cpu(), c[1][:, -5:], rtol=1e-5, atol=1e-5)
        need = (True, True, False)
        gc = nat.linear_sparse_kd_backward(hs, ws, None, ids, vals, labels, c[1], gr, os_, need, akl_weights=w)
        gd = nat.linear_sparse_kd_backward(hs.cuda(), ws.cuda(), None, ids.cuda(), vals.cuda(), labels.cuda(),
                                           d[1], gr.cuda(), os_, need, akl_weights=w.cuda())
        for x, y in zip(gd[:2], gc[:2]):
            torch.testing.assert_close(x.cpu(), y, rtol=1e-4, atol=1e-5 * float(y.abs().max()))


def test_akl_opcheck_cuda():
    _need_cuda()
    opcheck = getattr(torch.library, "opcheck", None)
    if opcheck is None:
        pytest.skip("torch.library.opcheck needs torch >= 2.4")
    from test_native_akl import _akl_args
    from kdkernels.backends.native import _loader
    _loader.load(cuda=True)
    ops = torch.ops.kdkernels_native
    for name, args in _akl_args(ops).items():
        cuda_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        opcheck(getattr(ops, name).default, cuda_args)


# --------------------------------------------------------------------------------------------------
# Vocab-parallel shard passes (tests/test_native_shard.py's cases, on CUDA tensors): the native CUDA
# passes against shard_torch fp64, within 2x shard_torch fp32's error (on the same device) + a floor.

SHARD_DENSE = ("fkl_ce", "rkl_T2_ce_chunks", "skewr_softcap_ce", "tvd_separated", "fkl_bf16_ce", "ce_only")
SHARD_SPARSE = ("bucket_fkl_ce", "bucket_rkl_T2_chunks", "renorm_both_skewr", "weights_fkl_softcap",
                "bucket_skewf_bf16")


@pytest.mark.parametrize("op", ["logits", "linear"])
@pytest.mark.parametrize("case", SHARD_DENSE)
def test_shard_dense_passes_cuda(op, case):
    _need_cuda()
    import test_native_shard as S
    from kdkernels.backends import native
    S.check_dense_case(native, op, case, "cuda")


@pytest.mark.parametrize("case", SHARD_SPARSE)
def test_shard_sparse_passes_cuda(case):
    _need_cuda()
    import test_native_shard as S
    from kdkernels.backends import native
    S.check_sparse_case(native, case, "cuda")


def test_shard_empty_and_opcheck_cuda():
    """An empty shard on CUDA (0 columns) and the schemas / Meta kernels of the shard ops on CUDA."""
    _need_cuda()
    from kdkernels.backends import native
    from kdkernels.backends.native._shard import _lists
    from kdkernels.options import KDOptions
    opts = KDOptions(divergence="jsd", ce_weight=0.5)
    n, h = 9, 16
    hs, ht = torch.randn(n, h, device="cuda"), torch.randn(n, h, device="cuda")
    ws = torch.randn(0, h, device="cuda")
    labels = torch.full((n,), -2, device="cuda")
    lse, picked = native.linear_kd_shard_stats(hs, ws, None, ht, ws, None, labels, opts)
    assert torch.isinf(lse[:, 0]).all() and not picked.any()
    dh, dw, _ = native.linear_kd_shard_backward(hs, ws, None, ht, ws, None, labels, torch.zeros(n, 4, device="cuda"),
                                                torch.ones(n, device="cuda"), opts, (True, True, False))
    assert dh.dtype == torch.float32 and not dh.any() and dw.shape == (0, h)
    f, i = _lists(opts)
    ops = torch.ops.kdkernels_native
    w, wt = torch.randn(40, h, device="cuda"), torch.randn(40, h, device="cuda")
    lab = torch.tensor([0, -1, -2, 39, 7, 1, 2, 3, -1], device="cuda")
    glse = torch.randn(n, 3, device="cuda") + 6
    ids = torch.tensor([[0, 3, -1]] * n, device="cuda")
    for name, args in (("kd_shard_stats", (hs @ w.T, ht @ wt.T, lab, f, i)),
                       ("kd_shard_terms", (hs @ w.T, ht @ wt.T, glse, f, i)),
                       ("linear_kd_shard_stats", (hs, w, None, ht, wt, None, lab, f, i)),
                       ("linear_kd_shard_terms", (hs, w, None, ht, wt, None, glse, f, i)),
                       ("linear_sparse_kd_shard_stats", (hs, w, None, ids, lab, f, i))):
        torch.library.opcheck(getattr(ops, name).default, args, test_utils=("test_schema", "test_faketensor"))
