"""Invariants of docs/semantics.md: divergences >= 0 and 0 when teacher = student; a sparse teacher
holding every id equals the dense teacher (bucket, renorm_teacher, renorm_both); underflowing tails,
extreme logits (+-1e4, -inf) and NaN in ignored rows give finite, correct results; the teacher never
gets a gradient. Also sanity checks of tests/reference.py itself against torch's own losses."""
import math

import pytest
import torch
import torch.nn.functional as F

import kdkernels
import reference as R


# ------------------------------------------------------------------------------------------------
# the reference itself


def test_reference_matches_torch_losses():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(5, 11, generator=g, dtype=torch.float64), torch.randn(5, 11, generator=g, dtype=torch.float64)
    lq, lp = zs.log_softmax(-1), zt.log_softmax(-1)
    kl = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(R.divergence(lp, lq, "forward_kl"), kl, rtol=1e-12, atol=0)
    assert torch.allclose(R.divergence(lp, lq, "reverse_kl"),
                          F.kl_div(lp, lq, log_target=True, reduction="none").sum(-1), rtol=1e-12)
    # jsd at beta = 1/2 is symmetric; skew KL at alpha -> 0 tends to KL; tvd in [0, 1].
    assert torch.allclose(R.divergence(lp, lq, "jsd"), R.divergence(lq, lp, "jsd"), rtol=1e-12)
    assert torch.allclose(R.divergence(lp, lq, "skew_forward_kl", alpha=1e-9), kl, rtol=1e-6)
    tvd = R.divergence(lp, lq, "tvd")
    assert ((tvd > 0) & (tvd < 1)).all()
    assert torch.allclose(R.dense_rows(zs, zt, ce_weight=1.0, kd_weight=0.0, labels=torch.arange(5)),
                          F.cross_entropy(zs, torch.arange(5), reduction="none"), rtol=1e-12)


@pytest.mark.parametrize("tail", ("bucket", "renorm_teacher", "renorm_both"))
def test_reference_sparse_all_ids_is_dense(tail):
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(4, 9, generator=g, dtype=torch.float64), torch.randn(4, 9, generator=g, dtype=torch.float64)
    ids = torch.argsort(torch.rand(4, 9, generator=g), 1)
    vals = (zt / 2).log_softmax(-1).gather(1, ids)
    for d in R.DIVERGENCES:
        if d == "reverse_kl" and tail == "renorm_teacher":
            continue
        dense = R.dense_rows(zs, zt, divergence_name=d, temperature=2.0)
        sparse = R.sparse_rows(zs, ids, vals, tail=tail, divergence_name=d, temperature=2.0)
        assert torch.allclose(sparse, dense, rtol=1e-10, atol=1e-12), d


# ------------------------------------------------------------------------------------------------
# divergence >= 0, and 0 at teacher = student


@pytest.mark.parametrize("form", R.FORMS)
def test_nonnegative(kd, form):
    for d in R.DIVERGENCES:
        if R.rejected(form, d):
            continue
        for T in (0.5, 2.0):
            case = kd.make_case(form, temperature=T, seed=5)
            loss, _ = kd.run(case, "kd", dict(divergence=d, temperature=T, reduction="none"))
            assert (loss > 0).all(), (d, T, loss.min())


@pytest.mark.parametrize("form", ("logits", "linear", "sparse:logprobs:bucket",
                                  "sparse:logprobs:renorm_both"))
def test_zero_when_teacher_is_student(kd, form):
    """Teacher = student: every divergence is 0 (dense: bitwise the same logits; sparse: the cache is
    the student's own log-probs at T, top-k; renorm_teacher is not 0 there by definition) and so is
    its gradient, up to fp32 rounding -- except tvd's through a cache, whose subgradient
    0.5 q sign(q - p) sees the cache's rounding of p."""
    n, v, h, T = 9, 53, 12, 2.0
    g = torch.Generator().manual_seed(2)
    hs, ws = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    zs = hs @ ws.T
    for d in R.DIVERGENCES:
        if R.rejected(form, d):
            continue
        hs_ = hs.clone().requires_grad_()
        zs_ = zs.clone().requires_grad_()
        opts = dict(divergence=d, temperature=T, reduction="none", backend="torch")
        if form == "logits":
            loss, leaf = kdkernels.kd_loss(zs_, zs.clone(), **opts), zs_
        elif form == "linear":
            loss, leaf = kdkernels.fused_linear_kd_loss(hs_, ws, hs, ws, **opts), hs_
        else:
            _, values, tail = form.split(":")
            lp = ((hs.double() @ ws.double().T) / T).log_softmax(-1)
            top = torch.topk(lp, 10, dim=1)
            loss = kdkernels.fused_linear_sparse_kd_loss(hs_, ws, top.indices, top.values.float(),
                                                         tail=tail, **opts)
            leaf = hs_
        loss.sum().backward()
        scale = float(zs.abs().max()) / T
        assert loss.abs().max() <= 8 * 2.0 ** -23 * scale, (d, loss)
        if not (d == "tvd" and form.startswith("sparse")):
            assert leaf.grad.abs().max() <= 8 * 2.0 ** -23 * scale * float(ws.abs().max()), d


# ------------------------------------------------------------------------------------------------
# a sparse teacher holding all V ids is the dense teacher


@pytest.mark.parametrize("tail", ("bucket", "renorm_teacher", "renorm_both"))
def test_sparse_all_ids_equals_dense(kd, tail):
    """k = V: the sparse loss (ids permuted, values = the teacher's fp32 log-probs) matches the dense
    fused loss of the teacher head, in value and student gradients, within the oracle bound."""
    for i, d in enumerate(R.DIVERGENCES):
        if d == "reverse_kl" and tail == "renorm_teacher":
            continue
        T = (0.5, 1.0, 2.0)[i % 3]
        dense = kd.make_case("linear", n=11, v=61, temperature=T, seed=20 + i)
        t = dense.tensors
        lp = (R.head_logits(t["teacher_hidden"], t["teacher_weight"]) / T).log_softmax(-1)
        ids = torch.argsort(torch.rand(lp.shape, generator=torch.Generator().manual_seed(i)), 1)
        sparse = dense.clone()
        sparse.form = f"sparse:logprobs:{tail}"
        sparse.tensors = {"student_hidden": t["student_hidden"], "student_weight": t["student_weight"],
                          "teacher_ids": ids, "teacher_values": lp.gather(1, ids).float()}
        sparse.api_opts = dict(values="logprobs", tail=tail)
        opts = dict(divergence=d, temperature=T, labels=kd.make_labels(11, 61, "some"), ce_weight=0.5)
        got = kd.run(sparse, "kd", opts)
        truth, naive = kd.run(dense, "truth", opts), kd.run(dense, "naive", opts)
        scale = kd.logit_scale(dense, T)
        R.assert_like_naive(f"{d} loss", got[0], truth[0], naive[0], logit_scale=scale)
        for name in ("student_hidden", "student_weight"):
            R.assert_like_naive(f"{d} d{name}", got[1][name], truth[1][name], naive[1][name],
                                logit_scale=scale)


# ------------------------------------------------------------------------------------------------
# numerically hard inputs


@pytest.mark.parametrize("tail", ("bucket", "renorm_teacher", "renorm_both"))
def test_tail_underflow_is_finite(kd, tail):
    """Each row's k ids hold all the mass on both sides: student logits 100 at K and ~0 elsewhere
    (Q ~ 1e-43, below fp32's normal range and the 1e-30 clamp), teacher log-probs at K summing to 1
    (P = 0 up to rounding). Loss and gradients are finite and match float64."""
    n, v, k = 6, 37, 8
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    on_k = torch.zeros(n, v).scatter(1, ids, 1.0)
    hs = torch.eye(n)                                           # row i reads column i of the head
    ws = (100.0 * on_k + 0.3 * torch.randn(n, v, generator=g)).T.contiguous()
    for d in R.DIVERGENCES:
        if d == "reverse_kl" and tail == "renorm_teacher":
            continue
        for T in (0.5, 1.0):
            zt = 100.0 * on_k + torch.randn(n, v, generator=g, dtype=torch.float64)
            vals = (zt / T).log_softmax(-1).gather(1, ids).float()
            case = kd.make_case(f"sparse:logprobs:{tail}", n=n, v=v, h_s=n)
            case.tensors.update(student_hidden=hs, student_weight=ws, teacher_ids=ids,
                                teacher_values=vals)
            loss, grads = kd.check(case, dict(divergence=d, temperature=T, reduction="none"))
            assert torch.isfinite(loss).all() and all(torch.isfinite(x).all() for x in grads.values())


@pytest.mark.parametrize("tail", ("bucket", "renorm_teacher"))
def test_student_tail_far_below_teacher_tail(kd, tail):
    """A confident student (mass outside K ~ 1e-13, far below fp32's eps) against a teacher whose
    top-k leaves P ~ 3e-5: Q must come from the tokens outside K, not from 1 - sum_K q (which is
    rounding noise there), and the gradient at K must not go through h_Q = -P/Q (~1e8 for forward
    KL). Found by this test: errors of 1e13 in d hidden before the fix."""
    n, v, k = 6, 37, 8
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    on_k = torch.zeros(n, v).scatter(1, ids, 1.0)
    hs = torch.eye(n)
    ws = (30.0 * on_k + 0.5 * torch.randn(n, v, generator=g)).T.contiguous()
    zt = 12.0 * on_k + torch.randn(n, v, generator=g, dtype=torch.float64)
    vals = zt.log_softmax(-1).gather(1, ids).float()
    case = kd.make_case(f"sparse:logprobs:{tail}", n=n, v=v, h_s=n)
    case.tensors.update(student_hidden=hs, student_weight=ws, teacher_ids=ids, teacher_values=vals)
    for d in R.DIVERGENCES:
        if d == "reverse_kl" and tail == "renorm_teacher":
            continue
        kd.check(case, dict(divergence=d, reduction="none", ce_weight=0.1, labels=ids[:, 0]))


def _extreme_logits(n, v, g, inf_teacher_only=False):
    """+-1e4 entries mixed with ordinary ones; -inf at the same positions in both (or teacher only)."""
    zs = torch.randn(n, v, generator=g) * 3
    zt = 0.5 * zs + torch.randn(n, v, generator=g) * 3
    big = torch.rand(n, v, generator=g) < 0.1
    sign = torch.where(torch.rand(n, v, generator=g) < 0.5, -1.0, 1.0)
    zs = torch.where(big, 1e4 * sign, zs)
    zt = torch.where(big & (torch.rand(n, v, generator=g) < 0.7), 1e4 * sign, zt)
    dead = torch.rand(n, v, generator=g) < 0.15
    dead[:, 0] = False
    zt = zt.masked_fill(dead, float("-inf"))
    if not inf_teacher_only:
        zs = zs.masked_fill(dead, float("-inf"))
    return zs, zt, dead


@pytest.mark.parametrize("T", (0.5, 1.0, 2.0))
def test_extreme_logits(kd, T):
    g = torch.Generator().manual_seed(4)
    for d in R.DIVERGENCES:
        zs, zt, dead = _extreme_logits(10, 41, g)
        case = kd.make_case("logits")
        case.tensors.update(student_logits=zs, teacher_logits=zt)
        loss, grads = kd.check(case, dict(divergence=d, temperature=T, ce_weight=0.3,
                                          labels=torch.zeros(10, dtype=torch.long)), kd.upstream("mean", ()))
        assert torch.isfinite(loss).all()
        assert (grads["student_logits"][dead] == 0).all(), "a token of probability 0 gets no gradient"
    zs, zt, dead = _extreme_logits(10, 41, g, inf_teacher_only=True)
    case = kd.make_case("logits")
    case.tensors.update(student_logits=zs, teacher_logits=zt)
    kd.check(case, dict(divergence="forward_kl", temperature=T), kd.upstream("sum", ()))


@pytest.mark.parametrize("form", ("linear", "sparse:logprobs:bucket", "sparse:weights:renorm_both"))
def test_extreme_head_logits(kd, form):
    """Hidden states scaled so that head logits reach ~1e4, with and without a softcap."""
    for d in R.DIVERGENCES:
        if R.rejected(form, d):
            continue
        for cap in (None, 30.0):
            case = kd.make_case(form, scale=3e3, student_softcap=cap, teacher_softcap=cap, seed=6)
            kd.check(case, dict(divergence=d, temperature=1.0))


@pytest.mark.parametrize("form", ("logits", "linear", "sparse:logprobs:bucket"))
def test_nan_in_ignored_rows(kd, form):
    """Ignored rows may hold anything, NaN included: the loss is that of the other rows and the
    ignored rows' gradients are exactly 0."""
    case = kd.make_case(form, seed=8)
    labels = kd.make_labels(case.n, case.v, "some")
    ign = labels == -100
    clean = kd.run(case, "kd", dict(labels=labels, divergence="jsd", reduction="sum"))
    bad = case.clone()
    for name in ("student_logits", "teacher_logits", "student_hidden", "teacher_hidden"):
        if name in bad.tensors:
            bad.tensors[name][ign] = float("nan")
    loss, grads = kd.run(bad, "kd", dict(labels=labels, divergence="jsd", reduction="sum"))
    assert torch.equal(loss, clean[0])
    leaf = "student_logits" if form == "logits" else "student_hidden"
    assert (grads[leaf][ign] == 0).all()
    assert all(torch.isfinite(x).all() for x in grads.values())
    assert torch.equal(grads[leaf][~ign], clean[1][leaf][~ign])


@pytest.mark.parametrize("form", ("logits", "linear"))
def test_teacher_gets_no_gradient(kd, form):
    case = kd.make_case(form, bias=True)
    t = {k: x.clone().requires_grad_(x.is_floating_point()) for k, x in case.tensors.items()}
    if form == "logits":
        loss = kdkernels.kd_loss(t["student_logits"], t["teacher_logits"], backend="torch")
        teacher = ("teacher_logits",)
    else:
        loss = kdkernels.fused_linear_kd_loss(t["student_hidden"], t["student_weight"],
                                              t["teacher_hidden"], t["teacher_weight"],
                                              student_bias=t["student_bias"],
                                              teacher_bias=t["teacher_bias"], backend="torch")
        teacher = ("teacher_hidden", "teacher_weight", "teacher_bias")
    loss.backward()
    for name in teacher:
        assert t[name].grad is None, name
