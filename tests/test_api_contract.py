"""The public API's contract beyond the numbers: caller tensors are never written to, a frozen head
costs no weight-gradient work, gradient accumulation with `normalizer` reproduces the full-batch
mean, and the nn.Module wrappers equal the functions."""
import pytest
import torch

import kdkernels
import kdkernels.backends.torch as torch_backend
import reference as R

pytestmark = pytest.mark.usefixtures("clean_env")


def _snapshot(tensors):
    return {k: t.detach().clone() for k, t in tensors.items()}


def _unchanged(before, tensors):
    for k, t in tensors.items():
        assert torch.equal(before[k].isnan(), t.detach().isnan()), k
        assert torch.equal(torch.nan_to_num(before[k]), torch.nan_to_num(t.detach())), f"{k} was mutated"


def test_caller_tensors_not_mutated(kd):
    for form in R.FORMS:
        case = kd.make_case(form, bias=True, student_softcap=10.0, teacher_softcap=12.0,
                            student_extra=3, seed=1)
        labels = kd.make_labels(case.n, case.v, "some")
        if "student_logits" in case.tensors:          # NaN in an ignored row must stay NaN too
            case.tensors["student_logits"][labels == -100, 0] = float("nan")
        tensors = dict(case.tensors, labels=labels)
        before = _snapshot(tensors)
        kd.run(case, "kd", dict(labels=labels, ce_weight=0.3, divergence="jsd",
                                reduction="none"), torch.randn(case.n))
        _unchanged(before, tensors)
    hid, w, b = torch.randn(6, 8), torch.randn(50, 8), torch.randn(50)
    tensors = {"hid": hid, "w": w, "b": b}
    before = _snapshot(tensors)
    kdkernels.linear_topk(hid, w, 5, bias=b, softcap=3.0, backend="torch")
    kdkernels.linear_sample(hid, w, 9, bias=b, temperature=2.0, backend="torch")
    _unchanged(before, tensors)


def _record_need(monkeypatch, name):
    seen = []
    real = getattr(torch_backend, name)

    def wrapped(*args):
        seen.append(args[-1])
        out = real(*args)
        grads = out[1:] if name.endswith("_fused") else out      # the fused piece returns the loss first
        assert all((g is None) == (not n) for g, n in zip(grads, args[-1])), "computed an unneeded grad"
        return out
    monkeypatch.setattr(torch_backend, name, wrapped)
    return seen


def test_frozen_weight_costs_no_weight_gradient(kd, monkeypatch):
    """requires_grad=False on the head: the backend is asked for dh only and returns None for dW
    and db; dh is unchanged. A scalar loss takes the fused piece, reduction="none" the backward piece."""
    cases = [(form, f"{op}_{piece}") for form, op in (("linear", "linear_kd"),
                                                      ("sparse:logprobs:bucket", "linear_sparse_kd"))
             for piece in ("fused", "backward")]
    for form, fn in cases:
        opts = {"reduction": "none"} if fn.endswith("_backward") else {}
        seen = _record_need(monkeypatch, fn)
        case = kd.make_case(form, bias=True)
        _, full = kd.run(case, "kd", opts)
        frozen = case.clone()
        frozen.grads = ("student_hidden",)
        _, grads = kd.run(frozen, "kd", opts)
        assert seen[-1] == (True, False, False), seen
        assert torch.equal(grads["student_hidden"], full["student_hidden"])
        assert seen[0] == (True, True, True)
        # and a frozen hidden (e.g. a linear probe): weight grads only
        probe = case.clone()
        probe.grads = ("student_weight",)
        _, grads = kd.run(probe, "kd", opts)
        assert seen[-1] == (False, True, False)
        assert torch.equal(grads["student_weight"], full["student_weight"])


def test_normalizer_accumulates_to_full_batch_mean(kd):
    """Two micro-batches with normalizer = counted tokens of the whole batch sum to the full-batch
    mean, and so do their gradients (gradient accumulation)."""
    for form in ("logits", "linear", "sparse:logprobs:renorm_both"):
        case = kd.make_case(form, n=16, seed=2)
        labels = kd.make_labels(case.n, case.v, "some")
        n_counted = torch.tensor(float((labels != -100).sum()))
        full_loss, full_grads = kd.run(case, "kd", dict(labels=labels))
        total, acc = 0.0, None
        for half in (slice(0, 7), slice(7, 16)):
            part = case.clone()
            for k in part.tensors:
                if part.tensors[k].shape[0] == case.n and not k.endswith("weight"):
                    part.tensors[k] = part.tensors[k][half]
            part.n = half.stop - half.start
            loss, grads = kd.run(part, "kd", dict(labels=labels[half], normalizer=n_counted))
            total += float(loss)
            if "student_weight" in grads:
                acc = grads["student_weight"] if acc is None else acc + grads["student_weight"]
        assert abs(total - float(full_loss)) <= 1e-6 * abs(float(full_loss))
        if acc is not None:
            err = (acc - full_grads["student_weight"]).abs().max()
            assert err <= 1e-6 * full_grads["student_weight"].abs().max()


def test_modules_equal_functions(kd):
    opts = dict(divergence="skew_reverse_kl", alpha=0.3, temperature=1.5, ce_weight=0.2,
                backend="torch")
    case = kd.make_case("logits", seed=3)
    labels = kd.make_labels(case.n, case.v, "some")
    t = case.tensors
    m = kdkernels.KDLoss(**opts)
    assert torch.equal(m(t["student_logits"], t["teacher_logits"], labels=labels),
                       kdkernels.kd_loss(t["student_logits"], t["teacher_logits"], labels=labels, **opts))
    case = kd.make_case("linear", bias=True, seed=3)
    t = case.tensors
    m = kdkernels.FusedLinearKDLoss(student_softcap=5.0, **opts)
    a = m(t["student_hidden"], t["student_weight"], t["teacher_hidden"], t["teacher_weight"],
          labels=labels, student_bias=t["student_bias"], teacher_bias=t["teacher_bias"])
    b = kdkernels.fused_linear_kd_loss(t["student_hidden"], t["student_weight"], t["teacher_hidden"],
                                       t["teacher_weight"], labels=labels, student_softcap=5.0,
                                       student_bias=t["student_bias"], teacher_bias=t["teacher_bias"],
                                       **opts)
    assert torch.equal(a, b)
    case = kd.make_case("sparse:weights:renorm_both", seed=3)
    t = case.tensors
    m = kdkernels.FusedLinearSparseKDLoss(values="weights", tail="renorm_both", **opts)
    a = m(t["student_hidden"], t["student_weight"], t["teacher_ids"], t["teacher_values"], labels=labels)
    b = kdkernels.fused_linear_sparse_kd_loss(t["student_hidden"], t["student_weight"], t["teacher_ids"],
                                              t["teacher_values"], values="weights",
                                              tail="renorm_both", labels=labels, **opts)
    assert torch.equal(a, b)
    try:
        kdkernels.KDLoss(divergence="jsd", beta=1.0)
    except ValueError as e:
        assert "beta" in str(e)
    else:
        raise AssertionError("a module with invalid options must fail at construction")


def test_mean_over_a_single_counted_row(kd):
    """mean with exactly one counted row is that row's loss (denominator 1, not clamped higher),
    """
    case = kd.make_case("linear", n=5, seed=4)
    labels = torch.tensor([-100, -100, 7, -100, -100])
    rows, _ = kd.run(case, "kd", dict(labels=labels, reduction="none"))
    mean, g_mean = kd.run(case, "kd", dict(labels=labels))
    _, g_sum = kd.run(case, "kd", dict(labels=labels, reduction="sum"))
    assert torch.equal(mean, rows[2])
    assert torch.equal(g_mean["student_weight"], g_sum["student_weight"])


def test_full_head_gradient_is_not_routed_through_a_slice():
    """Without a vocabulary cut the head reaches the op as itself: a slice `w[:V]` would send dW
    through SliceBackward, which allocates and fills a second (V, H) tensor (500 MiB at V=128k,
    H=2k in bf16) before accumulating it. With a cut, the slice is expected."""
    n, v, h = 6, 53, 8
    hs = torch.randn(n, h, requires_grad=True)
    ws = torch.randn(v, h, requires_grad=True)
    ht, wt = torch.randn(n, h), torch.randn(v, h)
    ids = torch.stack([torch.randperm(v - 3)[:4] for _ in range(n)])    # inside the cut vocabulary
    vals = torch.log_softmax(torch.randn(n, 4), 1) - 1.0

    def weight_edge(loss):
        fn = loss.grad_fn
        while not type(fn).__name__.startswith("KDFunction"):
            fn = fn.next_functions[0][0]
        return type(fn.next_functions[1][0]).__name__

    for cut in (None, v - 3):
        losses = (kdkernels.fused_linear_kd_loss(hs, ws, ht, wt, vocab_size=cut, backend="torch"),
                  kdkernels.fused_linear_sparse_kd_loss(hs, ws, ids, vals, vocab_size=cut,
                                                        backend="torch"))
        for loss in losses:
            assert weight_edge(loss) == ("AccumulateGrad" if cut is None else "SliceBackward0")
