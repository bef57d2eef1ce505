"""backend="triton" losses in the CPU interpreter: kd_loss, fused_linear_kd_loss and
fused_linear_sparse_kd_loss through the public API, every divergence x teacher form, against the
float64 formulas of tests/reference.py (bounded by 2x naive PyTorch's error, tests/conftest.py), plus
direct comparisons of the backend's pieces with the torch backend.

Each (form, divergence) case takes its temperature, reduction, ignore pattern, bias / softcap / CE
weight from a fixed rotation, so the matrix covers every option without running every product
(the interpreter is slow). Shapes are odd on purpose: V = 1031 or 37, N = 37 or 13.
"""
import itertools
import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"   # before the backend's kernels load (see _triton_util)

import pytest  # noqa: E402
import torch  # noqa: E402

import _triton_util as U  # noqa: E402
import reference as R  # noqa: E402
from kdkernels.options import KDOptions  # noqa: E402

pytestmark = [pytest.mark.interpreter,
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]  # numpy log(0) in the interpreter

TEMPERATURES = (1.0, 2.0, 0.5)
REDUCTIONS = ("mean", "sum", "none", "normalizer")
IGNORES = ("some", "none", "all", "some")


def _rotation(i: int) -> dict:
    """The i-th option set of the rotation (deterministic)."""
    return dict(T=TEMPERATURES[i % 3], reduction=REDUCTIONS[i % 4], ignore=IGNORES[(i // 2) % 4],
                extras=i % 3)  # extras: 0 plain, 1 bias + softcap, 2 CE weight + kd_weight


CASES = [(f, d) for f, d in itertools.product(R.FORMS, R.DIVERGENCES) if not R.rejected(f, d)]


@pytest.mark.parametrize("form,divergence", CASES, ids=[f"{f}-{d}" for f, d in CASES])
def test_matrix(kd, form, divergence):
    i = CASES.index((form, divergence))
    rot = _rotation(i)
    T = rot["T"]
    big = i % 4 == 0                      # a quarter of the cases on V = 1031, N = 37
    shape = dict(n=37, v=1031, h_s=48, h_t=40) if big else dict(n=13, v=37)
    extra = dict(bias=True, student_softcap=20.0, teacher_softcap=15.0) if rot["extras"] == 1 else {}
    if form == "logits":
        extra = {}
    k = (1, 7, 64)[i % 3] if form.startswith("sparse") else 8
    if form.startswith("sparse:weights"):
        k = 8
    case = kd.make_case(form, temperature=T, seed=100 + i, k=min(k, shape["v"]), **shape, **extra)
    labels = kd.make_labels(case.n, case.v, rot["ignore"], seed=i)
    opts = dict(divergence=divergence, temperature=T, labels=labels, backend="triton")
    if rot["reduction"] == "normalizer":
        opts.update(reduction="mean", normalizer=29.0)
    else:
        opts["reduction"] = rot["reduction"]
    if rot["extras"] == 2 and labels is not None:
        opts.update(ce_weight=0.3, kd_weight=0.7)
    go = kd.upstream(opts["reduction"], (case.n,), seed=i)
    loss, grads = kd.check(case, opts, go)
    if rot["ignore"] == "all":
        assert (loss == 0).all() and all((g == 0).all() for g in grads.values())


@pytest.mark.parametrize("form", ["logits", "linear", "sparse:logprobs:bucket"])
def test_fp16(kd, form):
    """fp16 inputs (tl.dot on fp16 is exact in the interpreter; bf16 is GPU-only)."""
    case = kd.make_case(form, n=37, v=1031, h_s=32, h_t=48, k=7, dtype=torch.float16, temperature=2.0)
    labels = kd.make_labels(case.n, case.v, "some")
    opts = dict(divergence="jsd", temperature=2.0, labels=labels, ce_weight=0.5, backend="triton")
    kd.check(case, opts, kd.upstream("mean", (case.n,)))


@pytest.mark.parametrize("form", ["logits", "linear", "sparse:logprobs:bucket"])
def test_chunked_backward(kd, form):
    """A tiny chunk budget: the backward runs over many vocabulary chunks."""
    case = kd.make_case(form, n=37, v=1031, h_s=32, h_t=24, k=7, bias=form != "logits")
    opts = dict(divergence="forward_kl", temperature=1.5, backend="triton", chunk_bytes=37 * 4 * 256,
                reduction="none")
    kd.check(case, opts, kd.upstream("none", (case.n,)))


def test_extreme_logits_match_torch_backend():
    """Huge and -inf logits (probability-0 tokens in both models), rows of NaN that are ignored."""
    g = torch.Generator().manual_seed(3)
    n, v = 13, 1031
    zs = torch.randn(n, v, generator=g) * 30
    zt = torch.randn(n, v, generator=g) * 30
    zs[:, 5] = 1e4
    zt[:, 7] = zs[:, 7] = -float("inf")     # a token of probability 0 in both models
    zt[2] = float("nan")
    labels = torch.randint(0, v, (n,), generator=g)
    labels[2] = -100
    import kdkernels
    go = torch.linspace(0.5, 2.0, n)
    for div in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        out = {}
        for backend in ("torch", "triton", "truth"):
            x = (zs.double() if backend == "truth" else zs.clone()).requires_grad_(True)
            kw = dict(divergence=div, labels=labels, reduction="none")
            if backend == "truth":
                loss = R.kd_loss(x, zt.double(), **kw)
            else:
                loss = kdkernels.kd_loss(x, zt, backend=backend, **kw)
            loss.backward(go.to(loss.dtype))
            out[backend] = (loss.detach(), x.grad)
        for i, what in enumerate(("loss", "grad")):
            U.assert_close_to_reference(f"{div} {what}", out["triton"][i], out["torch"][i],
                                        out["truth"][i].float())


def test_stats_and_rows_match_torch_backend():
    """Backend-level: per-row loss and stats of the sparse path equal the torch backend's (the
    public API never shows stats), every tail mode, k covering the whole vocabulary included."""
    g = torch.Generator().manual_seed(5)
    n, v, h = 13, 37, 16
    hs = torch.randn(n, h, generator=g)
    ws = torch.randn(v, h, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    for k, tail in ((v, "bucket"), (v, "renorm_both"), (7, "renorm_teacher")):
        zt = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
        lp = torch.log_softmax(zt, 1)
        top = lp.topk(k, 1)
        opts = KDOptions(divergence="skew_reverse_kl", tail=tail, ce_weight=0.5, temperature=1.3)
        ref = U.TORCH.linear_sparse_kd_forward(hs, ws, None, top.indices, top.values.float(), labels, opts)
        got = U.TRITON.linear_sparse_kd_forward(hs, ws, None, top.indices, top.values.float(), labels, opts)
        truth = U.TORCH.linear_sparse_kd_forward(hs.double(), ws.double(), None, top.indices,
                                                 top.values, labels, opts)
        ref, truth = (ref[0], U.lse_stats(ref[1])), (truth[0], U.lse_stats(truth[1]))
        for what, a, b, t in zip(("loss", "stats"), got, ref, truth):
            U.assert_close_to_reference(f"k={k} {tail} {what}", a, b, t.float())


def test_inputs_not_modified_and_need_respected():
    g = torch.Generator().manual_seed(8)
    n, v, h = 13, 37, 16
    hs, ws, bs = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g), torch.randn(v, generator=g)
    ids = torch.randint(0, v, (n, 1))
    vals = torch.full((n, 1), -0.5)
    copies = [t.clone() for t in (hs, ws, bs, ids, vals)]
    opts = KDOptions()
    labels = torch.full((n,), -1)
    loss, stats = U.TRITON.linear_sparse_kd_forward(hs, ws, bs, ids, vals, labels, opts)
    grads = U.TRITON.linear_sparse_kd_backward(hs, ws, bs, ids, vals, labels, stats, torch.ones(n),
                                               opts, (False, True, False))
    assert grads[0] is None and grads[2] is None and grads[1].shape == ws.shape
    for a, b in zip((hs, ws, bs, ids, vals), copies):
        assert torch.equal(a, b), "an input was modified"


def test_column_slice_views_and_vocab_prefix(kd):
    """Logits arriving as column-slice views (vocab_size= cut) and a weight row-slice."""
    case = kd.make_case("logits", n=13, v=37, student_extra=5, teacher_extra=3)
    kd.check(case, dict(divergence="jsd", backend="triton"))
    case = kd.make_case("sparse:logprobs:bucket", n=13, v=37, student_extra=6, k=5)
    kd.check(case, dict(divergence="forward_kl", backend="triton"))


def test_unavailable_without_interpreter_and_import_is_lazy():
    """In a fresh process without TRITON_INTERPRET: importing kdkernels imports no triton module,
    'auto' on CPU never picks triton, an explicit backend='triton' on CPU raises with the reason."""
    code = (
        "import sys, torch, kdkernels\n"
        "assert not any(m == 'triton' or m.startswith('triton.') for m in sys.modules), 'triton imported'\n"
        "assert 'triton' not in kdkernels.available_backends('cpu')\n"
        "x = torch.randn(3, 5, requires_grad=True)\n"
        "kdkernels.kd_loss(x, torch.randn(3, 5)).backward()\n"
        "from kdkernels.dispatch import BackendUnavailable\n"
        "try:\n"
        "    kdkernels.kd_loss(x, torch.randn(3, 5), backend='triton')\n"
        "except BackendUnavailable as e:\n"
        "    assert 'TRITON_INTERPRET' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    env = {k: val for k, val in os.environ.items() if k not in ("TRITON_INTERPRET", "KDKERNELS_BACKEND")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def test_availability():
    assert U.TRITON.availability("cpu") is None
    if not torch.cuda.is_available():
        assert "interpreter" in (U.TRITON.availability("cuda") or "") or \
            "CUDA" in (U.TRITON.availability("cuda") or "")
    assert U.TRITON.availability("mps") is not None


@pytest.mark.parametrize("form", ["linear", "sparse:logprobs:bucket"])
def test_nan_hidden_in_ignored_row_gives_exact_zero_contribution(kd, form):
    """docs/backends.md: a row with grad_row == 0 contributes exactly 0, even with NaN inputs."""
    import kdkernels
    case = kd.make_case(form, n=13, v=37, bias=True)
    labels = kd.make_labels(case.n, case.v, "some")
    out = []
    for poison in (False, True):
        t = {k: v.clone() for k, v in case.tensors.items()}
        if poison:
            t["student_hidden"][1] = float("nan")          # row 1 is ignored (labels pattern "some")
        for name in case.grads:
            t[name].requires_grad_(True)
        fn = kdkernels.fused_linear_kd_loss if form == "linear" else kdkernels.fused_linear_sparse_kd_loss
        names = (("student_hidden", "student_weight", "teacher_hidden", "teacher_weight") if form == "linear"
                 else ("student_hidden", "student_weight", "teacher_ids", "teacher_values"))
        extra = {k: v for k, v in t.items() if k not in names}
        loss = fn(*(t[k] for k in names), labels=labels, backend="triton", **extra, **case.api_opts)
        loss.backward()
        out.append((loss.detach(), [t[k].grad for k in case.grads]))
    assert labels[1] == -100
    assert torch.equal(out[0][0], out[1][0])
    for name, a, b in zip(case.grads, out[0][1], out[1][1]):
        if name == "student_hidden":
            a, b = a[torch.arange(13) != 1], b[torch.arange(13) != 1]
        assert torch.equal(a, b), f"d{name} changed by a NaN in an ignored row"


def test_tiny_student_tail_against_teacher_tail():
    """Forward KL, bucket: the student puts ~1e-12 outside K where the teacher puts 0.2, so
    h_Q = -P/Q ~ -1e11. Q must come from the mass outside K (not 1 - sum_K q) and the gradient at K
    must not go through h_Q (docs/semantics.md, "Tail modes"): compare with float64."""
    g = torch.Generator().manual_seed(12)
    n, v, h, k = 13, 1031, 32, 7
    hs = torch.randn(n, h, generator=g)
    ws = torch.randn(v, h, generator=g) * 0.1
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    ws[ids[:, 0]] = hs * 0.2           # row r's first id: logit 0.2 |h_r|^2 ~ 6.4 + ...
    hs = hs * 5                        # ... scaled to ~160: the student's tail is ~e^-150
    vals = torch.log(torch.full((n, k), 0.8 / k))
    labels = torch.full((n,), -1)
    opts = KDOptions(divergence="forward_kl", tail="bucket")
    go = torch.linspace(0.5, 1.5, n)
    res = {}
    for name, mod, dt in (("triton", U.TRITON, torch.float32), ("torch", U.TORCH, torch.float32),
                          ("truth", U.TORCH, torch.float64)):
        a, b, vv = hs.to(dt), ws.to(dt), vals.to(dt)
        loss, stats = mod.linear_sparse_kd_forward(a, b, None, ids, vv, labels, opts)
        dh, dw, _ = mod.linear_sparse_kd_backward(a, b, None, ids, vv, labels, stats, go.to(torch.float32),
                                                  opts, (True, True, False))
        res[name] = (loss, dh, dw)
    for i, what in enumerate(("loss", "dh", "dw")):
        U.assert_close_to_reference(what, res["triton"][i], res["torch"][i], res["truth"][i].float())
