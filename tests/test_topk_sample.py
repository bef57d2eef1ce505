"""linear_topk and linear_sample against float64 softmax (docs/semantics.md): tie-robust top-k
checks, the tie order (smaller id first) on deliberately tied logits, the log-sum-exp; a chi-square
test of the sampler against the softmax with a seeded generator, weights/padding/ordering rules."""
import pytest
import torch
from scipy import stats

import kdkernels
import reference as R


def _head(n, v, h, seed, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * scale / h ** 0.5
    return hid.to(dtype), w.to(dtype), torch.randn(v, generator=g).to(dtype)


def _lp64(hid, w, b, T, cap):
    z = R.head_logits(hid, w, b, cap) / T
    return z.log_softmax(-1), torch.logsumexp(z, -1)


# ------------------------------------------------------------------------------------------------
# linear_topk


@pytest.mark.parametrize("v,k", ((1031, 17), (37, 37), (37, 1), (50257, 64)))
@pytest.mark.parametrize("T,cap,bias", ((1.0, None, False), (0.5, 20.0, True), (2.0, None, True)))
def test_topk_vs_float64(v, k, T, cap, bias):
    n = 5 if v == 50257 else 37
    hid, w, b = _head(n, v, 16, seed=v + k)
    b = b if bias else None
    out = kdkernels.linear_topk(hid, w, k, temperature=T, bias=b, softcap=cap, backend="torch",
                                chunk_bytes=3 * v * 4 * 6)
    lp, lse = _lp64(hid, w, b, T, cap)
    assert out.logprobs.shape == out.ids.shape == (n, k) and out.logsumexp.shape == (n,)
    assert out.logprobs.dtype == torch.float32 and out.ids.dtype == torch.int64
    tol = 8 * 2.0 ** -23 * float(lse.abs().max() + 1)   # fp32 rounding of z/T - LSE
    # values are the log-probs at the returned ids, sorted descending, ids distinct and in range
    assert ((out.ids >= 0) & (out.ids < v)).all()
    assert all(len(set(r.tolist())) == k for r in out.ids)
    assert (out.logprobs.double() - lp.gather(1, out.ids)).abs().max() <= tol
    assert (out.logprobs[:, 1:] <= out.logprobs[:, :-1]).all()
    # every value clears the true k-th largest, and the id sets agree except within ties
    kth = torch.topk(lp, k, 1).values[:, -1:]
    assert (lp.gather(1, out.ids) >= kth - tol).all()
    true_ids = torch.topk(lp, k, 1).indices
    for i in range(n):
        diff = set(true_ids[i].tolist()) ^ set(out.ids[i].tolist())
        assert all(abs(float(lp[i, j] - kth[i])) <= tol for j in diff), "ids differ beyond ties"
    assert (out.logsumexp.double() - lse).abs().max() <= tol


def test_topk_ties_by_smaller_id():
    """Duplicated weight rows give bitwise-equal logits: within a tie the smaller ids come first,
    and a tie straddling the k-th place keeps the smallest ids."""
    v, h = 40, 8
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, h, generator=g)
    w = base[torch.arange(v) % 5]                 # ids j and j + 5m share a row: 8 ids per value
    hid = torch.randn(3, h, generator=g)
    z = (hid @ w.T).double()
    for k in (3, 8, 12, 40):
        out = kdkernels.linear_topk(hid, w, k, backend="torch", chunk_bytes=2 * v * 4 * 6)
        order = sorted(range(v), key=lambda j: (-float(z[0, j]), j))   # value desc, then id asc
        for i in range(3):
            order = sorted(range(v), key=lambda j: (-float(z[i, j]), j))
            assert out.ids[i].tolist() == order[:k], (k, i)


def test_topk_leading_shape_and_fp16():
    hid, w, b = _head(12, 301, 16, seed=4, dtype=torch.float16)
    out = kdkernels.linear_topk(hid.reshape(3, 4, 16), w, 7, bias=b, backend="torch")
    assert out.ids.shape == (3, 4, 7) and out.logsumexp.shape == (3, 4)
    # against the fp16 GEMM upcast to float64 (what the backend sees), not an fp64 GEMM
    z = (hid @ w.T + b).double()
    lp = z.log_softmax(-1)
    got = out.logprobs.reshape(12, 7).double()
    assert (got - lp.gather(1, out.ids.reshape(12, 7))).abs().max() <= 1e-5 * float(z.abs().max() + 1)


# ------------------------------------------------------------------------------------------------
# linear_sample


def _check_sample_layout(s, draws):
    ids, w = s.ids, s.weights
    pad = ids < 0
    assert (ids[pad] == -1).all() and (w[pad] == 0).all()
    assert (w[~pad] > 0).all()
    assert torch.allclose(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-6)
    assert ((w * draws - (w * draws).round()).abs() <= 4 * 2.0 ** -23 * draws).all(), "count / draws"
    for r_ids, r_pad in zip(ids.reshape(-1, ids.shape[-1]), pad.reshape(-1, ids.shape[-1])):
        live = r_ids[~r_pad]
        assert (live[1:] > live[:-1]).all(), "unique ids in increasing order"
        assert (~r_pad[:len(live)]).all(), "padding only at the end"
    assert ids.shape[-1] <= draws
    assert (~pad).sum(-1).max() == ids.shape[-1], "padded to the largest number of unique ids"


@pytest.mark.parametrize("T,cap", ((1.0, None), (2.0, 4.0)))
def test_sample_chi_square(T, cap):
    """200000 draws per row from V = 23: counts vs the float64 softmax, chi-square p-value > 1e-4
    on every row (seeded, so deterministic). Power: one token of mass ~4% drawn 10% too often adds
    ~80 to the statistic (the 1e-4 threshold at 22 dof is ~52); distortions of a few % go unseen."""
    n, v, draws = 4, 23, 200000
    hid, w, b = _head(n, v, 8, seed=9, scale=1.5)
    gen = torch.Generator().manual_seed(1234)
    s = kdkernels.linear_sample(hid, w, draws, temperature=T, bias=b, softcap=cap, generator=gen,
                                backend="torch", chunk_bytes=v * 4 * 6)
    _check_sample_layout(s, draws)
    lp, lse = _lp64(hid, w, b, T, cap)
    assert (s.logsumexp.double() - lse).abs().max() <= 1e-5 * float(lse.abs().max() + 1)
    for i in range(n):
        counts = torch.zeros(v, dtype=torch.float64)
        live = s.ids[i] >= 0
        counts[s.ids[i][live]] = (s.weights[i][live].double() * draws).round()
        assert counts.sum() == draws
        expected = lp[i].exp() * draws
        expected = expected * (draws / expected.sum())
        p = stats.chisquare(counts.numpy(), expected.numpy()).pvalue
        assert p > 1e-4, (i, p)


def test_sample_determinism_zero_probability_and_shapes():
    v = 50
    hid, w, b = _head(6, v, 8, seed=3)
    b = b.clone()
    b[::3] = float("-inf")                      # tokens of probability 0 are never drawn
    a = kdkernels.linear_sample(hid, w, 64, bias=b, generator=torch.Generator().manual_seed(5),
                                backend="torch")
    c = kdkernels.linear_sample(hid, w, 64, bias=b, generator=torch.Generator().manual_seed(5),
                                backend="torch", chunk_bytes=v * 4 * 6)
    assert torch.equal(a.ids, c.ids) and torch.equal(a.weights, c.weights)
    _check_sample_layout(a, 64)
    live = a.ids[a.ids >= 0]
    assert (live % 3 != 0).all()
    one = kdkernels.linear_sample(hid.reshape(2, 3, 8), w, 1, backend="torch",
                                  generator=torch.Generator().manual_seed(0))
    assert one.ids.shape == (2, 3, 1) and (one.weights == 1).all()
    _check_sample_layout(one, 1)


def test_sample_feeds_sparse_loss():
    """A sampled cache is a valid values='weights' teacher (padding -1 / 0 included)."""
    hid, w, b = _head(8, 97, 8, seed=6)
    s = kdkernels.linear_sample(hid, w, 32, generator=torch.Generator().manual_seed(0), backend="torch")
    hs = torch.randn(8, 8, requires_grad=True)
    loss = kdkernels.fused_linear_sparse_kd_loss(hs, w, s.ids, s.weights, values="weights",
                                                 backend="torch")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hs.grad).all()
