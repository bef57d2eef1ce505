"""linear_topk and linear_sample against float64 softmax (docs/semantics.md): tie-robust top-k
checks, the tie order (smaller id first) on deliberately tied logits, the log-sum-exp; the sampler's
raw draws against a float64 inverse CDF on the same uniforms (torch and native backends), a
chi-square test against the softmax with a seeded generator, weights/padding/ordering rules."""
import pytest
import torch
from scipy import stats

import kdkernels
import reference as R
from kdkernels.heads import _head_opts


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


SAMPLERS = ["torch", pytest.param("native", marks=pytest.mark.native)]


def _sampler(name):
    if name == "torch":
        from kdkernels.backends.torch import topk
        return topk.linear_sample
    from kdkernels.backends.native import _loader, _ops
    if _loader.missing_tools(False) is not None and not _loader.is_loaded_or_prebuilt(False):
        pytest.skip(f"native CPU extension cannot be built here: {_loader.missing_tools(False)}")
    _loader.load(False)
    return _ops.linear_sample



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


@pytest.mark.parametrize("backend", SAMPLERS)
@pytest.mark.parametrize("T,cap", ((1.0, None), (2.0, 4.0)))
def test_sample_chi_square(T, cap, backend):
    """200000 draws per row from V = 23: counts vs the float64 softmax, chi-square p-value > 1e-4
    on every row (seeded, so deterministic). Power: one token of mass ~4% drawn 10% too often adds
    ~80 to the statistic (the 1e-4 threshold at 22 dof is ~52); distortions of a few % go unseen."""
    n, v, draws = 4, 23, 200000
    hid, w, b = _head(n, v, 8, seed=9, scale=1.5)
    gen = torch.Generator().manual_seed(1234)
    _sampler(backend)
    s = kdkernels.linear_sample(hid, w, draws, temperature=T, bias=b, softcap=cap, generator=gen,
                                backend=backend, chunk_bytes=v * 4 * 6)
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


@pytest.mark.parametrize("backend", SAMPLERS)
def test_sample_determinism_zero_probability_and_shapes(backend):
    _sampler(backend)
    v = 50
    hid, w, b = _head(6, v, 8, seed=3)
    b = b.clone()
    b[::3] = float("-inf")                      # tokens of probability 0 are never drawn
    a = kdkernels.linear_sample(hid, w, 64, bias=b, generator=torch.Generator().manual_seed(5),
                                backend=backend)
    c = kdkernels.linear_sample(hid, w, 64, bias=b, generator=torch.Generator().manual_seed(5),
                                backend=backend, chunk_bytes=v * 4 * 6)
    assert torch.equal(a.ids, c.ids) and torch.equal(a.weights, c.weights)
    _check_sample_layout(a, 64)
    live = a.ids[a.ids >= 0]
    assert (live % 3 != 0).all()
    one = kdkernels.linear_sample(hid.reshape(2, 3, 8), w, 1, backend=backend,
                                  generator=torch.Generator().manual_seed(0))
    assert one.ids.shape == (2, 3, 1) and (one.weights == 1).all()
    _check_sample_layout(one, 1)
    empty = kdkernels.linear_sample(hid[:0].reshape(2, 0, 8), w, 4, backend=backend)
    assert empty.ids.shape == empty.weights.shape == (2, 0, 0) and empty.logsumexp.shape == (2, 0)


# Raw draws (the backend contract, docs/backends.md) against the float64 inverse CDF.
#
# A backend's CDF differs from the float64 one on the same inputs by (a) the fp32 logits, which move
# every CDF value by at most sum_i p_i |d log p_i| <= 2 max |dz / T|, measured here from what naive
# fp32 PyTorch computes, and (b) the sampler's own fp32 rounding of e_j and of its block sums
# (~1e-7 relative; 2^-20 allowed). A draw may differ from the reference only when its threshold
# u Z lies within that bound of every CDF step between the two ids, and such draws must be rare.

def check_draws(draws, z64, u, tol, max_frac):
    """draws (N, D) vs the smallest j with CDF64(j) > u CDF64(V-1); returns the mismatch count."""
    cdf = torch.softmax(z64, 1).cumsum(1)
    t = u * cdf[:, -1:]
    ref = torch.searchsorted(cdf, t, right=True).clamp_max(z64.shape[1] - 1)
    assert draws.dtype == torch.int64 and draws.shape == u.shape
    assert (draws[:, 1:] >= draws[:, :-1]).all(), "draws must be nondecreasing per row"
    assert (torch.softmax(z64, 1).gather(1, draws) > 0).all(), "a token of probability 0 was drawn"
    bad = (draws != ref).nonzero().tolist()
    for i, r in bad:
        lo, hi = sorted((int(draws[i, r]), int(ref[i, r])))
        gap = float((cdf[i, lo:hi] - t[i, r]).abs().max())
        assert gap <= tol, f"row {i} draw {r}: {int(draws[i, r])} vs {int(ref[i, r])}, step {gap:.3g} away"
    assert len(bad) <= max(2, max_frac * u.numel()), f"{len(bad)} of {u.numel()} draws differ"
    return len(bad)


def _uniforms(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=g, dtype=torch.float64).sort(1).values


@pytest.mark.parametrize("backend", SAMPLERS)
@pytest.mark.parametrize("v,n", ((1031, 37), (4099, 9), (50257, 4)))
@pytest.mark.parametrize("T,cap,bias", ((1.0, None, False), (0.7, 20.0, True), (2.0, None, True)))
def test_sample_draws_vs_float64(backend, v, n, T, cap, bias):
    """fp32 inputs, 256 draws per row, row blocks of a few rows: mismatches only within the bound
    above, in at most 0.5% of draws (observed: 0-3 of ~2,000-9,000)."""
    sample = _sampler(backend)
    hid, w, b = _head(n, v, 32, seed=v + n, scale=4.0)
    b = b if bias else None
    u = _uniforms(n, 256, seed=v)
    draws, lse = sample(hid, w, b, u, _head_opts(T, cap, 3 * v * 4 * 6))
    z64 = R.head_logits(hid, w, b, cap) / T
    z32 = R.head_logits(hid, w, b, cap, compute=torch.float32).double() / T
    tol = 2 * float((z32 - z64).abs().max()) + 2.0 ** -20
    check_draws(draws, z64, u, tol, 0.005)
    lse64 = torch.logsumexp(z64, 1)
    assert lse.dtype == torch.float32
    assert (lse.double() - lse64).abs().max() <= 2 * (torch.logsumexp(z32, 1).float().double() - lse64).abs().max() + 1e-6


@pytest.mark.parametrize("backend", SAMPLERS)
def test_sample_draws_float64_inputs_exact(backend):
    """float64 inputs run in float64 end to end: draws equal the reference up to float64 rounding."""
    sample = _sampler(backend)
    n, v = 11, 4099
    hid, w, b = _head(n, v, 16, seed=5, scale=4.0, dtype=torch.float64)
    u = _uniforms(n, 300, seed=6)
    draws, lse = sample(hid, w, b, u, _head_opts(0.8, None, None))
    z64 = R.head_logits(hid, w, b) / 0.8
    assert check_draws(draws, z64, u, 1e-12, 0.001) <= 1
    assert (lse.double() - torch.logsumexp(z64, 1)).abs().max() <= 1e-6


@pytest.mark.parametrize("backend", SAMPLERS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_sample_half_inputs(backend, dtype):
    """16-bit inputs: the GEMM and bias add run in the inputs' dtype (as naive PyTorch does); against
    the float64 CDF of exactly those logits, only the sampler's own fp32 rounding remains."""
    sample = _sampler(backend)
    n, v = 13, 4099
    hid, w, b = _head(n, v, 32, seed=21, scale=4.0, dtype=dtype)
    u = _uniforms(n, 256, seed=22)
    draws, lse = sample(hid, w, b, u, _head_opts(1.0, None, 5 * v * 4 * 6))
    z = R.head_logits(hid, w, b, compute=torch.float32).double()
    check_draws(draws, z, u, 2.0 ** -20, 0.005)
    assert (lse.double() - torch.logsumexp(z, 1)).abs().max() <= 1e-6 * float(z.abs().max() + 1)


@pytest.mark.parametrize("backend", SAMPLERS)
def test_sample_thresholds_on_block_edges_and_zero_probability(backend):
    """Thresholds placed exactly on the float64 CDF at every 16th id (block edges of the 64-column
    partial sums included) with probability-0 tokens (-inf bias) just before each edge: rounding can
    put u Z on either side of a step, but never on a token of probability 0."""
    sample = _sampler(backend)
    n, v = 6, 1031
    hid, w, b = _head(n, v, 16, seed=12, scale=3.0)
    b = b.clone()
    b[(torch.arange(v) % 16) >= 13] = float("-inf")
    z64 = R.head_logits(hid, w, b) / 1.0
    cdf = torch.softmax(z64, 1).cumsum(1)
    edges = torch.arange(15, v, 16)
    u = (cdf[:, edges] / cdf[:, -1:]).clamp_max(1 - 2.0 ** -53)
    u = torch.cat([u, u * (1 - 2.0 ** -40), u * (1 + 2.0 ** -40)], 1).clamp_max(1 - 2.0 ** -53).sort(1).values
    draws, _ = sample(hid, w, b, u, _head_opts(1.0, None, None))
    z32 = R.head_logits(hid, w, b, compute=torch.float32).double()
    fin = torch.isfinite(z64)
    tol = 2 * float((z32 - z64)[fin].abs().max()) + 2.0 ** -20
    check_draws(draws, z64, u, tol, 1.0)          # every threshold sits on a step: any side is fine
    assert ((draws % 16) < 13).all()


@pytest.mark.parametrize("backend", SAMPLERS)
def test_sample_extreme_logits(backend):
    """Logits of size ~3e3 (one token holds nearly all mass), and rows with only three finite logits
    (0, 1, -50: one of mass ~2e-22): the draws still follow the float64 CDF."""
    sample = _sampler(backend)
    n, v = 5, 517
    u = _uniforms(n, 200, seed=3)
    hid, w, _ = _head(n, v, 16, seed=2, scale=3000.0)
    b = torch.full((v,), float("-inf"))
    b[[7, 300, 516]] = torch.tensor([0.0, 1.0, -50.0])
    for hid, bias in ((hid, None), (torch.zeros(n, 16), b)):
        draws, lse = sample(hid, w, bias, u, _head_opts(1.0, None, None))
        z64 = R.head_logits(hid, w, bias)
        z32 = R.head_logits(hid, w, bias, compute=torch.float32).double()
        fin = torch.isfinite(z64)
        tol = 2 * float((z32 - z64)[fin].abs().max()) + 2.0 ** -20
        check_draws(draws, z64, u, tol, 0.005)
        assert (lse.double() - torch.logsumexp(z64, 1)).abs().max() <= 1e-6 * float(z64[fin].abs().max() + 1)


def test_sample_feeds_sparse_loss():
    """A sampled cache is a valid values='weights' teacher (padding -1 / 0 included)."""
    hid, w, b = _head(8, 97, 8, seed=6)
    s = kdkernels.linear_sample(hid, w, 32, generator=torch.Generator().manual_seed(0), backend="torch")
    hs = torch.randn(8, 8, requires_grad=True)
    loss = kdkernels.fused_linear_sparse_kd_loss(hs, w, s.ids, s.weights, values="weights",
                                                 backend="torch")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hs.grad).all()
