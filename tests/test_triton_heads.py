"""backend="triton" linear_topk and linear_sample in the CPU interpreter, against float64 truth
and the torch backend: k in {1, 7, 64}, V in {1031, 4099}, bias, softcap, temperature, exact ties
(smaller id first), tokens of probability 0, draws consistent with the fp64 CDF."""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before the backend's kernels load (see _triton_util)

import pytest  # noqa: E402
import torch  # noqa: E402

import _triton_util as U  # noqa: E402
import kdkernels  # noqa: E402
from kdkernels.options import KDOptions  # noqa: E402

pytestmark = [pytest.mark.interpreter,
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]  # numpy log(0) in the interpreter


def _head(n, v, h, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * (3.0 / h ** 0.5)
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    return hid, w, b


def _truth_logits(h, w, b, cap, T):
    z = h.double() @ w.double().T + (b.double() if b is not None else 0)
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    return z / T


@pytest.mark.parametrize("k,v,cap,T", [(1, 1031, None, 1.0), (7, 1031, 5.0, 1.5), (64, 4099, 20.0, 0.7)])
def test_topk_against_truth(k, v, cap, T):
    h, w, b = _head(37, v, 48, seed=k)
    top = kdkernels.linear_topk(h, w, k, temperature=T, bias=b, softcap=cap, backend="triton")
    ref = kdkernels.linear_topk(h, w, k, temperature=T, bias=b, softcap=cap, backend="torch")
    lp64 = torch.log_softmax(_truth_logits(h, w, b, cap, T), 1)
    lse64 = torch.logsumexp(_truth_logits(h, w, b, cap, T), 1)
    assert top.logprobs.dtype == torch.float32 and top.ids.dtype == torch.int64
    U.assert_close_to_reference("lse", top.logsumexp, ref.logsumexp, lse64.float())
    # tie-robust: values equal the truth gathered at the returned ids, sorted descending, and
    # every returned value clears the true k-th largest (up to rounding)
    gathered = lp64.gather(1, top.ids)
    U.assert_close_to_reference("logprobs", top.logprobs, ref.logprobs, gathered.float())
    assert (top.logprobs[:, :-1] >= top.logprobs[:, 1:]).all()
    kth = lp64.topk(k, 1).values[:, -1:]
    assert (gathered >= kth - 1e-5).all()
    assert all(len(set(r.tolist())) == k for r in top.ids), "duplicate ids"
    # ids agree with the torch backend except among near-ties
    differ = top.ids != ref.ids
    if differ.any():
        assert (top.logprobs[differ] - ref.logprobs[differ]).abs().max() < 1e-5


def test_topk_exact_ties_smaller_id_first():
    """Integer-valued logits are exact in fp32: ties must come out by increasing id."""
    g = torch.Generator().manual_seed(1)
    v, h = 1031, 16
    w = torch.randint(-2, 3, (v, h), generator=g).float()
    w[300:400] = w[3]                     # 101 identical rows: massive ties
    hid = torch.randint(-1, 2, (13, h), generator=g).float()
    for k in (1, 7, 64):
        got = U.TRITON.linear_topk(hid, w, None, k, KDOptions())
        ref = U.TORCH.linear_topk(hid, w, None, k, KDOptions())
        assert torch.equal(got[1], ref[1]), f"k={k}: tie order differs"
        # the values are exact integers; only LSE's rounding (split merge vs one pass) may differ
        ulp = 4 * 2.0 ** -23 * float(ref[2].abs().max())
        assert (got[0] - ref[0]).abs().max() <= ulp


def test_topk_minus_inf_logits():
    """-inf logits (a bias of -inf) rank last and never outrank real ones."""
    h, w, b = _head(13, 1031, 16, seed=4)
    b[::2] = -float("inf")
    got = U.TRITON.linear_topk(h, w, b, 64, KDOptions())
    assert (got[1] % 2 == 1).all()
    assert torch.isfinite(got[0]).all()


def test_sample_matches_fp64_cdf():
    n, v, d = 37, 1031, 50
    h, w, b = _head(n, v, 48, seed=9)
    b[::3] = -float("inf")                # probability-0 tokens: never drawn
    T = 1.3
    g = torch.Generator().manual_seed(0)
    u = torch.rand(n, d, generator=g, dtype=torch.float64).sort(1).values
    opts = KDOptions(temperature=T)
    draws, lse = U.TRITON.linear_sample(h, w, b, u, opts)
    ref_draws, ref_lse = U.TORCH.linear_sample(h, w, b, u, opts)
    z64 = _truth_logits(h, w, b, None, T)
    U.assert_close_to_reference("lse", lse, ref_lse, torch.logsumexp(z64, 1).float())
    assert draws.dtype == torch.int64 and draws.shape == (n, d)
    assert (draws[:, 1:] >= draws[:, :-1]).all(), "draws must be nondecreasing per row"
    assert (draws % 3 != 0).all(), "a token of probability 0 was drawn"
    cdf = torch.softmax(z64, 1).cumsum(1)
    hi = cdf.gather(1, draws)
    lo = torch.where(draws > 0, cdf.gather(1, (draws - 1).clamp_min(0)), 0.0)
    tol = 1e-5                            # fp32 logits vs fp64: boundaries move by ~1e-6
    assert ((lo <= u + tol) & (u <= hi + tol)).all(), "a draw is not where the CDF puts it"
    # identical to the torch backend except for uniforms within tol of a CDF boundary
    differ = draws != ref_draws
    assert differ.float().mean() < 0.02


def test_sample_public_api_same_as_torch_backend():
    h, w, b = _head(13, 4099, 32, seed=2)
    out = {}
    for backend in ("torch", "triton"):
        g = torch.Generator().manual_seed(11)
        out[backend] = kdkernels.linear_sample(h, w, 40, temperature=0.8, generator=g, bias=b,
                                               backend=backend)
    assert torch.equal(out["triton"].ids, out["torch"].ids)
    assert torch.equal(out["triton"].weights, out["torch"].weights)
    assert torch.allclose(out["triton"].logsumexp, out["torch"].logsumexp, rtol=0, atol=1e-5)


def test_topk_k_limit():
    h, w, b = _head(3, 1031, 16, seed=0)
    with pytest.raises(ValueError, match="k <= 256"):
        U.TRITON.linear_topk(h, w, b, 300, KDOptions())
