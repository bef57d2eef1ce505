"""backend="triton" on a CUDA GPU: bf16 (wrong in the interpreter), larger odd shapes, the memory
bound of docs/triton.md, determinism and backend="auto".

Every test skips itself without CUDA. Triton fixes the interpreter/compiled choice per process, and
the interpreter tests (tests/test_triton_losses.py, test_triton_heads.py) set TRITON_INTERPRET=1, so
on a GPU machine run this file in its own process:  pytest tests/test_triton_gpu.py
"""
import pytest
import torch

import kdkernels

pytestmark = pytest.mark.gpu


def _cuda_triton():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from kdkernels.backends import triton as T
    why = T.availability("cuda")
    if why is not None:
        pytest.skip(f"triton backend unavailable on cuda: {why} (run this file in its own process)")


def _to(case, device):
    case = case.clone()
    case.tensors = {k: v.to(device) for k, v in case.tensors.items()}
    return case


@pytest.mark.parametrize("form", ["logits", "linear", "sparse:logprobs:bucket", "sparse:weights:renorm_both"])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_bf16_against_float64(kd, form, divergence):
    _cuda_triton()
    if kd.rejected(form, divergence):
        pytest.skip("rejected combination")
    case = _to(kd.make_case(form, n=1029, v=32007, h_s=512, h_t=768, k=64, dtype=torch.bfloat16,
                            temperature=2.0, bias=form != "logits"), "cuda")
    labels = kd.make_labels(case.n, case.v, "some").cuda()
    opts = dict(divergence=divergence, temperature=2.0, labels=labels, ce_weight=0.2, backend="triton")
    kd.check(case, opts, kd.upstream("mean", (case.n,)).cuda())


@pytest.mark.parametrize("form", ["logits", "linear", "sparse:logprobs:bucket", "sparse:logprobs:renorm_both",
                                  "sparse:weights:renorm_both"])
def test_akl_bf16_against_float64_and_torch(kd, form):
    """divergence='akl' in bf16 (the interpreter's bf16 tl.dot is wrong, so only here): vs float64
    (2x naive) and vs backend='torch' (2x its error against float64)."""
    _cuda_triton()
    import reference as R      # not _triton_util: importing it turns on the interpreter
    case = _to(kd.make_case(form, n=1029, v=32007, h_s=512, h_t=768, k=64, dtype=torch.bfloat16,
                            temperature=2.0, bias=form != "logits",
                            student_softcap=30.0 if form != "logits" else None), "cuda")
    labels = kd.make_labels(case.n, case.v, "some").cuda()
    opts = dict(divergence="akl", temperature=2.0, labels=labels, ce_weight=0.2)
    go = kd.upstream("mean", (case.n,)).cuda()
    got = kd.check(case, dict(opts, backend="triton"), go)
    ref = kd.run(case, "kd", dict(opts, backend="torch"), go)
    truth = kd.run(case, "truth", opts, go)
    scale = kd.logit_scale(case, 2.0)
    R.assert_like_naive("loss vs torch backend", got[0], truth[0], ref[0], logit_scale=scale)
    for name in case.grads:
        R.assert_like_naive(f"d {name} vs torch backend", got[1][name], truth[1][name], ref[1][name],
                            logit_scale=scale)


def test_fp32_and_fp16_large(kd):
    _cuda_triton()
    for dtype in (torch.float32, torch.float16):
        case = _to(kd.make_case("sparse:logprobs:bucket", n=2050, v=50257, h_s=256, k=64, dtype=dtype,
                                student_softcap=30.0), "cuda")
        kd.check(case, dict(divergence="forward_kl", backend="triton"))


def test_topk_and_sample_bf16():
    _cuda_triton()
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(1000, 1024, device="cuda", generator=g).bfloat16()
    w = (torch.randn(50257, 1024, device="cuda", generator=g) / 16).bfloat16()
    for k in (1, 7, 64, 256):
        got = kdkernels.linear_topk(h, w, k, backend="triton")
        ref = kdkernels.linear_topk(h, w, k, backend="torch")
        z = (h.float() @ w.float().T)
        lp = torch.log_softmax(z, -1)
        assert (lp.gather(1, got.ids) >= lp.topk(k, -1).values[:, -1:] - 0.05).all()
        assert torch.allclose(got.logsumexp, ref.logsumexp, atol=0.05)
    s = kdkernels.linear_sample(h, w, 64, backend="triton", generator=torch.Generator(device="cuda").manual_seed(1))
    assert (s.weights.sum(1) - 1).abs().max() < 1e-6


def check_draws_against_cdf(draws: torch.Tensor, u: torch.Tensor, z64: torch.Tensor, tol: float) -> None:
    """Raw draws of linear_sample against the float64 CDF of float64 logits z64: draw r is the
    smallest j with CDF(j) > u_r, up to `tol` (the logits' rounding), and never a token of
    probability 0."""
    p = torch.softmax(z64, 1)
    cdf = p.cumsum(1)
    j = draws.long()
    assert ((j >= 0) & (j < z64.shape[1])).all()
    assert (p.gather(1, j) > 0).all(), "a token of probability 0 was drawn"
    before = torch.where(j > 0, cdf.gather(1, (j - 1).clamp_min(0)), 0.0)
    assert (before <= u + tol).all(), "a draw lies past its threshold"
    assert (cdf.gather(1, j) > u - tol).all(), "a draw stops short of its threshold"
    assert (draws[:, 1:] >= draws[:, :-1]).all(), "draws not nondecreasing"


def test_sample_draws_against_float64_cdf():
    """The draw cursor of _sample_kernel (docs/triton.md) on CUDA: peaked rows (most draws in one
    tile), flat rows, -inf logits, thresholds at 0 and 1; fp32 inputs so the CDF differs from
    float64's by rounding only."""
    _cuda_triton()
    from kdkernels.backends import triton as T
    from kdkernels.options import KDOptions
    g = torch.Generator(device="cuda").manual_seed(3)
    n, h, v, d = 257, 256, 50257, 64
    hs = torch.randn(n, h, device="cuda", generator=g)
    hs[::2] *= 8                                   # peaked rows
    ws = torch.randn(v, h, device="cuda", generator=g) / 16
    bias = torch.zeros(v, device="cuda")
    bias[1::7] = -float("inf")
    u = torch.rand(n, d, device="cuda", generator=g, dtype=torch.float64).sort(1).values
    u[0, 0], u[1, -1] = 0.0, 1.0
    opts = KDOptions(temperature=0.7)
    draws, lse = T.linear_sample(hs, ws, bias, u, opts)
    z64 = (hs.double() @ ws.double().T + bias.double()) / 0.7
    check_draws_against_cdf(draws, u, z64, tol=1e-4)   # fp32 logits: CDF rounding ~1e-6
    assert torch.allclose(lse.double(), torch.logsumexp(z64, 1), rtol=0, atol=1e-4)


def test_memory_bound_and_determinism():
    """Extra memory of the sparse fused loss (fwd + bwd) stays within chunk_bytes + the fp32 dh
    accumulator (4 N H) + the masked hidden copy (2 N H) + O(N (k + splits)) (docs/triton.md), far
    below the (N, V) logits, and two
    runs give bit-identical gradients (no atomics)."""
    _cuda_triton()
    n, h, v, k = 4096, 2048, 128256, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    hs = torch.randn(n, h, device="cuda", generator=g).bfloat16().requires_grad_(True)
    ws = (torch.randn(v, h, device="cuda", generator=g) / 20).bfloat16().requires_grad_(True)
    ids = torch.randint(0, v, (n, k), device="cuda", generator=g).sort(1).values
    ids = torch.where(ids[:, 1:] == ids[:, :-1], -1, ids[:, 1:])
    vals = torch.full(ids.shape, -8.0, device="cuda")
    chunk = 64 * 2**20
    grads = []
    for _ in range(2):
        hs.grad = ws.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = kdkernels.fused_linear_sparse_kd_loss(hs, ws, ids, vals, backend="triton", chunk_bytes=chunk)
        loss.backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base - (hs.numel() + ws.numel()) * 2
        bound = chunk + 6 * n * h + 64 * n * (k + 64) + 32 * 2**20   # dh32, masked h copy, slack
        assert extra <= bound, f"extra memory {extra / 2**20:.0f} MiB > bound {bound / 2**20:.0f} MiB"
        assert extra < n * v * 2 / 4, "a quarter of the bf16 logits: something materialized N x V"
        grads.append((hs.grad.clone(), ws.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_auto_picks_triton_on_cuda():
    _cuda_triton()
    from kdkernels.dispatch import resolve
    assert resolve("auto", "cuda", "kd_loss").NAME == "triton"
