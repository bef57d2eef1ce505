"""The fused (gradient-in-forward) path of scalar losses against the recompute path and the float64
truth, on every backend that has fused pieces (docs/backends.md, "Fused path").

reduction="sum" / "mean" takes the fused path; reduction="none" followed by a sum outside takes
forward + backward. Both must give the same loss and gradients (the same float32 formulas on the same
blocks of rows: a few ulps), and each must stay within the usual 2 x naive bound of the truth.
Covered: every divergence x teacher form, a non-unit upstream gradient, gradient accumulation over
several calls, a frozen head, a tied head (one weight used twice), ignored rows holding NaN hidden
states, vocab_size cuts, several row blocks. (The chunk budget of the fused path: tests/test_memory.py,
whose scalar losses take it.)
"""
import pytest
import torch

import kdkernels
import reference as R

FUSED = ["torch", pytest.param("native", marks=pytest.mark.native)]


@pytest.fixture
def backend(request):
    name = request.param
    if name not in kdkernels.available_backends("cpu"):
        pytest.skip(f"backend={name!r} cannot run on CPU tensors here")
    return name


def _fn(form):
    return {"logits": kdkernels.kd_loss, "linear": kdkernels.fused_linear_kd_loss}.get(
        form, kdkernels.fused_linear_sparse_kd_loss)


def _paths(case, form, opts, upstream: float):
    """(fused, recompute) results: (loss, {name: grad}) for sum(loss) * upstream."""
    out = []
    for reduction in ("sum", "none"):
        t = {k: v.clone().requires_grad_(k in case.grads) for k, v in case.tensors.items()}
        pos = {"logits": ("student_logits", "teacher_logits"),
               "linear": ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")}.get(
            form, ("student_hidden", "student_weight", "teacher_ids", "teacher_values"))
        kw = {k: v for k, v in t.items() if k not in pos}
        loss = _fn(form)(*(t[k] for k in pos), **kw, **case.api_opts, **opts, reduction=reduction)
        total = loss if reduction == "sum" else loss.sum()
        (total * upstream).backward()
        out.append((total.detach(), {k: t[k].grad for k in case.grads}))
    return out


def _close(what, a, b):
    """Two float32 evaluations of one formula: within a few ulps of the larger magnitude."""
    scale = max(float(b.abs().max()), 1e-6) if b.numel() else 1.0
    err = float((a.double() - b.double()).abs().max()) if b.numel() else 0.0
    assert err <= 64 * 2.0 ** -23 * scale, f"{what}: fused vs recompute differ by {err:.3e} (scale {scale:.3e})"


@pytest.mark.parametrize("backend", FUSED, indirect=True)
@pytest.mark.parametrize("form", R.FORMS[1:])     # kd_loss has no fused path
def test_fused_equals_recompute_and_truth(kd, backend, form):
    for i, divergence in enumerate(R.DIVERGENCES):
        if R.rejected(form, divergence):
            continue
        T = (1.0, 2.0, 0.7)[i % 3]
        case = kd.make_case(form, n=17, v=97, k=9, temperature=T, seed=40 + i, bias=form == "linear",
                            student_extra=5 if i % 2 else 0)
        labels = kd.make_labels(case.n, case.v, "some")
        opts = dict(divergence=divergence, temperature=T, labels=labels, ce_weight=0.3,
                    backend=backend, chunk_bytes=5 * 102 * 4 * 12)   # several blocks of rows
        fused, recompute = _paths(case, form, opts, upstream=3.7)
        _close(f"{divergence} loss", fused[0], recompute[0])
        for name in case.grads:
            _close(f"{divergence} d {name}", fused[1][name], recompute[1][name])
        try:
            kd.check(case, opts, kd.upstream("mean", ()))
        except AssertionError as e:
            raise AssertionError(f"divergence={divergence} T={T}: {e}") from None


@pytest.mark.parametrize("backend", FUSED, indirect=True)
@pytest.mark.parametrize("form", ("linear", "sparse:logprobs:bucket"))
def test_ignored_rows_with_nan_frozen_head_accumulation(kd, backend, form):
    """NaN hidden states at ignored rows contribute exactly 0; a frozen head gets no gradient and the
    same dh; gradients accumulate over micro-batches like one call over the whole batch."""
    case = kd.make_case(form, n=12, v=61, k=6, seed=5)
    labels = kd.make_labels(case.n, case.v, "some")
    ignored = labels == -100
    t = {k: v.clone() for k, v in case.tensors.items()}
    t["student_hidden"][ignored] = float("nan")
    if form == "linear":
        t["teacher_hidden"][ignored] = float("nan")
    opts = dict(labels=labels, ce_weight=0.5, backend=backend, temperature=2.0)
    fn = _fn(form)
    pos = ("student_hidden", "student_weight") + (("teacher_hidden", "teacher_weight") if form == "linear"
                                                  else ("teacher_ids", "teacher_values"))
    sparse_kw = {} if form == "linear" else {k: case.api_opts[k] for k in ("values", "tail")}

    def grads(hid, w, sl=slice(None), normalizer=None):
        args = [t[k][sl] if k not in ("student_weight", "teacher_weight") else t[k] for k in pos]
        args[0], args[1] = hid, w
        loss = fn(*args, **sparse_kw, **{**opts, "labels": labels[sl]}, normalizer=normalizer)
        loss.backward()
        return loss

    h = t["student_hidden"].clone().requires_grad_(True)
    w = t["student_weight"].clone().requires_grad_(True)
    full = grads(h, w)
    assert torch.isfinite(full) and torch.isfinite(h.grad[~ignored]).all()
    assert (h.grad[ignored] == 0).all() and torch.isfinite(w.grad).all()
    # frozen head: dh only, unchanged
    h2 = t["student_hidden"].clone().requires_grad_(True)
    grads(h2, t["student_weight"])
    assert torch.equal(h2.grad, h.grad)
    # two micro-batches with the whole batch's normalizer: the same gradients
    h3 = t["student_hidden"].clone().requires_grad_(True)
    w3 = t["student_weight"].clone().requires_grad_(True)
    count = float((~ignored).sum())
    parts = [grads(h3[sl], w3, sl, normalizer=count) for sl in (slice(0, 5), slice(5, 12))]
    torch.testing.assert_close(sum(p.detach() for p in parts), full.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w3.grad, w.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h3.grad, h.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED, indirect=True)
def test_tied_head_and_double_backward(kd, backend):
    """A tied head (the student's weight used as the teacher's too, detached by the op) gets the
    student-side gradient only; a second-order gradient raises instead of returning a wrong one."""
    case = kd.make_case("linear", n=9, v=41, seed=8)
    t = case.tensors
    ht = t["student_hidden"].flip(0) * 1.5        # the teacher's states, in the student's width
    w = t["student_weight"].clone().requires_grad_(True)
    h = t["student_hidden"].clone().requires_grad_(True)
    loss = kdkernels.fused_linear_kd_loss(h, w, ht, w, backend=backend)
    loss.backward()
    w2 = t["student_weight"].clone().requires_grad_(True)
    kdkernels.fused_linear_kd_loss(h.detach(), w2, ht, w2.detach(), backend=backend).backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=0, atol=0)
    h = t["student_hidden"].clone().requires_grad_(True)
    loss = kdkernels.fused_linear_kd_loss(h, t["student_weight"], t["teacher_hidden"],
                                          t["teacher_weight"], backend=backend)
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad(loss, h, create_graph=True)



def test_no_grad_forms_no_gradient(kd, monkeypatch):
    """Under torch.no_grad() (evaluation of a trainable model) the scalar loss takes the plain forward:
    the fused piece, which would form gradients nobody asked for, is never called."""
    import kdkernels.backends.torch as tb
    calls = []
    real = tb.linear_sparse_kd_fused
    monkeypatch.setattr(tb, "linear_sparse_kd_fused", lambda *a: calls.append(1) or real(*a))
    case = kd.make_case("sparse:logprobs:bucket", n=6, v=31, k=4, seed=2)
    t = case.tensors
    h = t["student_hidden"].clone().requires_grad_(True)
    with torch.no_grad():
        loss = kdkernels.fused_linear_sparse_kd_loss(h, t["student_weight"], t["teacher_ids"],
                                                     t["teacher_values"], backend="torch")
    assert not calls and not loss.requires_grad
    kdkernels.fused_linear_sparse_kd_loss(h, t["student_weight"], t["teacher_ids"], t["teacher_values"],
                                          backend="torch").backward()
    assert calls == [1]
