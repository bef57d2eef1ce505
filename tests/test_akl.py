"""divergence="akl" (docs/semantics.md, "Adaptive KL") on the torch backend, against the float64
formulas of tests/reference.py (weights without gradient, bound 2x naive fp32 + floor), plus
hand-computed head sets, the mixture property and the rejected combinations.

The triton and native backends are compared with these semantics in tests/test_triton_akl.py and
tests/test_native_akl.py.
"""
import itertools
import math
import zlib

import pytest
import torch

import kdkernels
import reference as R

AKL_FORMS = [f for f in R.FORMS if not R.rejected(f, "akl")]


@pytest.mark.parametrize("form", AKL_FORMS)
def test_matrix(kd, form):
    """T x reduction x ignore pattern, several row blocks, non-unit upstream gradient."""
    for T, reduction, ignore in itertools.product((0.5, 1.0, 2.0), ("mean", "none", "sum"),
                                                  ("none", "some", "all")):
        case = kd.make_case(form, temperature=T, seed=zlib.crc32(f"akl{form}{T}".encode()) % 1000)
        labels = kd.make_labels(case.n, case.v, ignore)
        opts = dict(divergence="akl", temperature=T, labels=labels, reduction=reduction,
                    chunk_bytes=4096 if reduction != "sum" else None)
        go = kd.upstream(reduction, (case.n,))
        try:
            loss, grads = kd.check(case, opts, go)
        except AssertionError as e:
            raise AssertionError(f"T={T} reduction={reduction} ignore={ignore}: {e}") from None
        if ignore == "all":
            assert (loss == 0).all()
            assert all((g == 0).all() for g in grads.values())


@pytest.mark.parametrize("form", AKL_FORMS)
@pytest.mark.parametrize("mu, head_max", [(0.2, 256), (0.9, 256), (0.9, 2), (0.5, 1)])
def test_mu_and_head_cap(kd, form, mu, head_max):
    """The head set's two knobs, including a cap that binds (the top tokens hold less than mu)."""
    case = kd.make_case(form, temperature=1.0, seed=5)
    labels = kd.make_labels(case.n, case.v, "some")
    kd.check(case, dict(divergence="akl", mu=mu, akl_head_max=head_max, labels=labels,
                        ce_weight=0.3 if labels is not None else 0.0), kd.upstream("mean", ()))


@pytest.mark.parametrize("form", ["logits", "linear", "sparse:logprobs:bucket"])
def test_softcap_bias_and_extreme_logits(kd, form):
    case = kd.make_case(form, temperature=1.5, seed=9, bias=form != "logits",
                        student_softcap=10.0 if form != "logits" else None)
    kd.check(case, dict(divergence="akl", temperature=1.5), kd.upstream("mean", ()))
    if form == "logits":   # +-1e4, and a token of probability 0 for both (-inf logits)
        t = case.tensors
        t["student_logits"][0, :3] = torch.tensor([1e4, -1e4, 0.0])
        t["teacher_logits"][1, 5] = t["student_logits"][1, 5] = float("-inf")
        t["teacher_logits"][2, :2] = torch.tensor([1e4, 1e4])
        kd.check(case, dict(divergence="akl"), kd.upstream("mean", ()))


def test_head_set_by_hand():
    """p = (0.6, 0.3, 0.1): mu = 0.5 gives H = {0}, mu = 0.7 gives H = {0, 1}; weights by hand."""
    p = torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)
    fkl = float((p * (p / q).log()).sum())
    rkl = float((q * (q / p).log()).sum())
    for mu, g_head in ((0.5, 0.4), (0.7, 0.6)):
        w_h = g_head / 0.8                       # sum |p - q| = 0.4 + 0.2 + 0.2
        want = w_h * fkl + (1 - w_h) * rkl
        got = kdkernels.kd_loss(q.log(), p.log(), divergence="akl", mu=mu, backend="torch")
        assert math.isclose(float(got), want, rel_tol=1e-12), (mu, float(got), want)


def test_mixture_of_the_two_kls(kd):
    """Per row, AKL lies between forward and reverse KL (a convex mixture), and differs from both
    on rows where they differ (the weights are not degenerate)."""
    case = kd.make_case("logits", n=40, v=101, seed=3)
    zs, zt = case.tensors["student_logits"], case.tensors["teacher_logits"]
    rows = {d: kdkernels.kd_loss(zs, zt, divergence=d, reduction="none", backend="torch")
            for d in ("akl", "forward_kl", "reverse_kl")}
    lo = torch.minimum(rows["forward_kl"], rows["reverse_kl"])
    hi = torch.maximum(rows["forward_kl"], rows["reverse_kl"])
    assert ((rows["akl"] >= lo - 1e-6) & (rows["akl"] <= hi + 1e-6)).all()
    inner = (rows["akl"] - lo > 1e-4) & (hi - rows["akl"] > 1e-4)
    assert inner.float().mean() > 0.5


def test_equal_distributions_give_zero():
    z = torch.randn(5, 33, dtype=torch.float64, requires_grad=True)
    loss = kdkernels.kd_loss(z, z.detach().clone(), divergence="akl", backend="torch")
    loss.backward()
    assert abs(loss.item()) < 1e-12 and z.grad.abs().max() < 1e-12


def test_fp16_and_bf16(kd):
    for dtype in (torch.float16, torch.bfloat16):
        case = kd.make_case("linear", dtype=dtype, seed=4)
        kd.check(case, dict(divergence="akl"), kd.upstream("mean", ()))


def test_kd_weight_zero_is_ce_only(kd):
    case = kd.make_case("linear", seed=2)
    labels = kd.make_labels(case.n, case.v, "some")
    a = kd.run(case, "kd", dict(divergence="akl", kd_weight=0.0, ce_weight=1.0, labels=labels))
    b = kd.run(case, "kd", dict(divergence="forward_kl", kd_weight=0.0, ce_weight=1.0, labels=labels))
    assert torch.equal(a[0], b[0])


def test_rejections(kd):
    case = kd.make_case("sparse:logprobs:bucket", seed=1)
    t = case.tensors
    args = (t["student_hidden"], t["student_weight"], t["teacher_ids"], t["teacher_values"])
    with pytest.raises(ValueError, match="renorm_teacher"):
        kdkernels.fused_linear_sparse_kd_loss(*args, divergence="akl", tail="renorm_teacher")
    with pytest.raises(ValueError, match="mu must be in the open interval"):
        kdkernels.fused_linear_sparse_kd_loss(*args, divergence="akl", mu=1.0)
    with pytest.raises(ValueError, match="akl_head_max"):
        kdkernels.fused_linear_sparse_kd_loss(*args, divergence="akl", akl_head_max=0)
    with pytest.raises(NotImplementedError, match="process_group"):
        kdkernels.kd_loss(torch.zeros(2, 5), torch.zeros(2, 5), divergence="akl",
                          process_group=object())
