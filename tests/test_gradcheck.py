"""torch.autograd.gradcheck in float64 on tiny shapes (the torch backend keeps float64 inputs in
float64): every divergence x every teacher form, with softcap, bias, CE and ignored rows, through
the public API with several row blocks."""
import pytest
import torch
from torch.autograd import gradcheck

import kdkernels
import reference as R

N, V, HS, HT, K = 5, 11, 4, 3, 4


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    labels = torch.tensor([3, -100, 0, 7, 10])
    return g, r, labels


@pytest.mark.parametrize("divergence", R.DIVERGENCES)
def test_gradcheck_kd_loss(divergence):
    g, r, labels = _inputs(0)
    zs, zt = (2 * r(N, V)).requires_grad_(), 2 * r(N, V)
    fn = lambda x: kdkernels.kd_loss(x, zt, divergence=divergence, temperature=1.7, labels=labels,
                                     ce_weight=0.3, reduction="none", backend="torch",
                                     chunk_bytes=2 * V * 4 * 12)
    assert gradcheck(fn, (zs,))


@pytest.mark.parametrize("divergence", R.DIVERGENCES)
def test_gradcheck_fused_linear(divergence):
    g, r, labels = _inputs(1)
    hs, ws, bs = r(N, HS).requires_grad_(), r(V, HS).requires_grad_(), r(V).requires_grad_()
    ht, wt, bt = r(N, HT), r(V, HT), r(V)
    fn = lambda h, w, b: kdkernels.fused_linear_kd_loss(
        h, w, ht, wt, student_bias=b, teacher_bias=bt, student_softcap=3.0, teacher_softcap=4.0,
        divergence=divergence, temperature=0.8, labels=labels, ce_weight=0.5, backend="torch",
        chunk_bytes=2 * V * 4 * 12)
    assert gradcheck(fn, (hs, ws, bs))


@pytest.mark.parametrize("divergence", R.DIVERGENCES)
@pytest.mark.parametrize("form", R.SPARSE_FORMS)
def test_gradcheck_sparse(form, divergence):
    if R.rejected(form, divergence):
        pytest.skip("rejected combination")
    _, values, tail = form.split(":")
    g, r, labels = _inputs(2)
    hs, ws, bs = r(N, HS).requires_grad_(), r(V, HS).requires_grad_(), r(V).requires_grad_()
    ids, vals = _cache(values, r, g)
    fn = lambda h, w, b: kdkernels.fused_linear_sparse_kd_loss(
        h, w, ids, vals, values=values, tail=tail, student_bias=b, student_softcap=5.0,
        divergence=divergence, temperature=1.3, labels=labels, ce_weight=0.2, reduction="sum",
        backend="torch", chunk_bytes=2 * V * 4 * 6)
    assert gradcheck(fn, (hs, ws, bs))


def _cache(values, r, g):
    """K = 4 slots per row, one row with an empty slot; log-probs of a float64 teacher at T = 1.3,
    or weights count / 8."""
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
    if values == "logprobs":
        vals = (2 * r(N, V) / 1.3).log_softmax(-1).gather(1, ids)
    else:
        counts = torch.randint(1, 4, (N, K), generator=g).double()
        vals = counts / counts.sum(1, keepdim=True)
    ids[1, 2] = -1
    vals = vals.clone()
    vals[1, 2] = 0.0
    if values == "weights":
        vals[1] = vals[1] / vals[1].sum()
    return ids, vals
