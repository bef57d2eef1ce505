"""Shared test machinery: input builders for every teacher form and a runner that evaluates one case
three ways -- kdkernels (the public API), the float64 truth and naive fp32 PyTorch (both from
tests/reference.py) -- and checks loss and every student gradient against the oracle bound.

Exposed to tests through the `kd` fixture (a namespace), so no test imports conftest.
"""
from __future__ import annotations

import os

# Triton decides interpreter vs compiled mode when a kernel is decorated, and caches the setting the
# first time any @triton.jit runs (transformers defines some at import). The CPU test run is an
# interpreter run, so the mode is set here, before any test module is imported. GPU runs
# (benchmarks/gpu_check.sh) set KDKERNELS_TEST_GPU=1 to keep compiled kernels.
if os.environ.get("KDKERNELS_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import types
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

import reference as R

@dataclass
class Case:
    form: str
    tensors: dict                      # API argument name -> tensor (inputs, in the case dtype)
    grads: tuple                       # names of the tensors that receive gradients
    n: int
    v: int                             # the common vocabulary
    api_opts: dict = field(default_factory=dict)   # values=, tail=, biases, softcaps, vocab_size

    def clone(self) -> "Case":
        return Case(self.form, {k: t.clone() for k, t in self.tensors.items()}, self.grads, self.n,
                    self.v, dict(self.api_opts))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def sparse_teacher(zt64: torch.Tensor, values: str, k: int, temperature: float, g, empty_rows=True,
                   draws: int = 48):
    """A cache built from full teacher logits (float64) at `temperature`: top-k ids with their
    full-vocabulary log-probs, or `draws` samples as unique ids with count/draws. Slots are shuffled;
    some rows get empty (-1) slots."""
    n, v = zt64.shape
    lp = torch.log_softmax(zt64 / temperature, -1)
    if values == "logprobs":
        top = torch.topk(lp, k, dim=1)
        ids, vals = top.indices.clone(), top.values.clone()
        if empty_rows and k > 2 and k < v:
            ids[::3, -1] = -1        # every third row has one empty slot
            ids[1::4, -2:] = -1      # and some two
            vals = torch.where(ids >= 0, vals, torch.zeros(()).double())
    else:
        d = torch.multinomial(lp.exp(), draws, replacement=True, generator=g)
        width = max(int(torch.unique(r).numel()) for r in d)
        ids = torch.full((n, width), -1, dtype=torch.int64)
        vals = torch.zeros(n, width, dtype=torch.float64)
        for i in range(n):
            u, c = torch.unique(d[i], return_counts=True)
            ids[i, :u.numel()] = u
            vals[i, :u.numel()] = c.double() / draws
    perm = torch.argsort(torch.rand(ids.shape, generator=g), dim=1)
    return ids.gather(1, perm), vals.gather(1, perm).float()


def make_case(form: str, n: int = 13, v: int = 37, h_s: int = 16, h_t: int = 24, k: int = 8,
              dtype=torch.float32, temperature: float = 1.0, seed: int = 0, bias: bool = False,
              student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
              student_extra: int = 0, teacher_extra: int = 0, scale: float = 3.0, lead=None) -> Case:
    """Inputs for one teacher form. Logits have std ~`scale`. `student_extra`/`teacher_extra` add
    rows beyond the common vocabulary v (then vocab_size=v is passed). `lead` reshapes rows to a
    leading shape (e.g. (B, S))."""
    g = _gen(seed)
    vs, vt = v + student_extra, v + teacher_extra
    api = {}
    if student_extra or teacher_extra:
        api["vocab_size"] = v
    rs = (lambda t: t.reshape(*lead, t.shape[-1])) if lead is not None else (lambda t: t)
    if form == "logits":
        zs = torch.randn(n, vs, generator=g) * scale
        zt = 0.6 * torch.nn.functional.pad(zs[:, :v], (0, vt - v)) + 0.8 * scale * torch.randn(n, vt, generator=g)
        t = {"student_logits": rs(zs.to(dtype)), "teacher_logits": rs(zt.to(dtype))}
        return Case(form, t, ("student_logits",), n, v, api)
    hs = torch.randn(n, h_s, generator=g)
    ws = torch.randn(vs, h_s, generator=g) * (scale / h_s ** 0.5)
    t = {"student_hidden": rs(hs.to(dtype)), "student_weight": ws.to(dtype)}
    grads = ["student_hidden", "student_weight"]
    if bias:
        t["student_bias"] = (0.5 * torch.randn(vs, generator=g)).to(dtype)
        grads.append("student_bias")
    if student_softcap is not None:
        api["student_softcap"] = student_softcap
    if form == "linear":
        ht = torch.randn(n, h_t, generator=g)
        wt = torch.randn(vt, h_t, generator=g) * (scale / h_t ** 0.5)
        t["teacher_hidden"], t["teacher_weight"] = rs(ht.to(dtype)), wt.to(dtype)
        if bias:
            t["teacher_bias"] = (0.5 * torch.randn(vt, generator=g)).to(dtype)
        if teacher_softcap is not None:
            api["teacher_softcap"] = teacher_softcap
        return Case(form, t, tuple(grads), n, v, api)
    _, values, tail = form.split(":")
    zt64 = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    ids, vals = sparse_teacher(zt64, values, k, temperature, g)
    t["teacher_ids"], t["teacher_values"] = rs(ids), rs(vals)
    api.update(values=values, tail=tail)
    return Case(form, t, tuple(grads), n, v, api)


def make_labels(n: int, v: int, pattern: str, seed: int = 1, ignore_index: int = -100):
    """None (every row counts), "some" (about a third ignored) or "all" (every row ignored)."""
    if pattern == "none":
        return None
    lab = torch.randint(0, v, (n,), generator=_gen(seed))
    if pattern == "all":
        return torch.full((n,), ignore_index, dtype=torch.int64)
    lab[torch.arange(n) % 3 == 1] = ignore_index
    return lab


_REF = {"logits": R.kd_loss, "linear": R.fused_linear_kd_loss}


def _api_fn(form):
    import kdkernels
    if form == "logits":
        return kdkernels.kd_loss
    if form == "linear":
        return kdkernels.fused_linear_kd_loss
    return kdkernels.fused_linear_sparse_kd_loss


def _positional(form):
    if form == "logits":
        return ("student_logits", "teacher_logits")
    if form == "linear":
        return ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")
    return ("student_hidden", "student_weight", "teacher_ids", "teacher_values")


def run(case: Case, mode: str, opts: dict, grad_output=None):
    """Evaluate the loss of `case` with `opts` in mode "kd" (kdkernels, torch backend unless opts
    says otherwise), "truth" (reference in float64) or "naive" (reference, fp32 on the inputs'
    dtype); backpropagate `grad_output` (None: 1). Returns (loss, {name: grad})."""
    tensors = {}
    for name, t in case.tensors.items():
        x = t.clone()
        if mode == "truth" and x.is_floating_point():
            x = x.double()
        if name in case.grads:
            x.requires_grad_(True)
        tensors[name] = x
    args = [tensors[k] for k in _positional(case.form)]
    kw = {k: tensors[k] for k in tensors if k not in _positional(case.form)}
    kw.update(case.api_opts)
    kw.update(opts)
    if mode == "kd":
        kw.setdefault("backend", "torch")
        loss = _api_fn(case.form)(*args, **kw)
    else:
        kw.pop("backend", None)
        kw.pop("chunk_bytes", None)
        ref = _REF.get(case.form, R.fused_linear_sparse_kd_loss)
        if case.form == "linear":
            args = [tensors["student_hidden"], tensors["student_weight"], tensors["teacher_hidden"],
                    tensors["teacher_weight"]]
        kw["compute"] = torch.float64 if mode == "truth" else torch.float32
        loss = ref(*args, **kw)
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype)
    if any(tensors[k].requires_grad for k in case.grads):
        loss.backward(go)
    return loss.detach(), {k: tensors[k].grad for k in case.grads}


def upstream(reduction: str, lead_shape, seed: int = 7):
    """A non-unit upstream gradient: a random vector for "none", 3.7 for "sum", 0.6 for "mean"."""
    if reduction == "none":
        return torch.randn(lead_shape, generator=_gen(seed), dtype=torch.float64)
    return torch.tensor(3.7 if reduction == "sum" else 0.6, dtype=torch.float64)


def logit_scale(case: Case, temperature: float) -> float:
    """max |logit| / T over both models (float64), the scale of the oracle's floor."""
    t = {k: (x.double() if x.is_floating_point() else x) for k, x in case.tensors.items()}
    if case.form == "logits":
        m = max(float(t["student_logits"].abs().max()), float(t["teacher_logits"].abs().max()))
    else:
        hs = t["student_hidden"].reshape(-1, t["student_hidden"].shape[-1])
        m = float(R.head_logits(hs, t["student_weight"], t.get("student_bias")).abs().max())
        if case.form == "linear":
            ht = t["teacher_hidden"].reshape(-1, t["teacher_hidden"].shape[-1])
            m = max(m, float(R.head_logits(ht, t["teacher_weight"], t.get("teacher_bias")).abs().max()))
    return m / temperature


def _truth_and_logit_grad(case: Case, opts: dict, grad_output):
    """The float64 truth, and |d total / d student logits| (N, V) from the same run (None for the
    logits form: no GEMM). The student logits are the reference's one head_logits output that
    requires a gradient."""
    captured = []
    original = R.head_logits

    def spy(*a, **k):
        z = original(*a, **k)
        if z.requires_grad:
            z.retain_grad()
            captured.append(z)
        return z

    R.head_logits = spy
    try:
        truth = run(case, "truth", opts, grad_output)
    finally:
        R.head_logits = original
    g = captured[0].grad if captured else None
    return truth, (None if g is None or case.form == "logits" else g.abs())


def gemm_floors(case: Case, g: Optional[torch.Tensor]) -> dict:
    """Per head gradient, the rounding its GEMM may add in any summation order (R.gemm_floor):
    dh = G @ W sums over V, dW = G^T @ h and db = sum G over the N rows."""
    if g is None:
        return {}
    t = case.tensors
    w = t["student_weight"].double().abs()[: g.shape[1]]
    h = t["student_hidden"].double().abs().reshape(-1, w.shape[1])
    return {"student_hidden": R.gemm_floor(g, w), "student_weight": R.gemm_floor(g.T, h),
            "student_bias": R.gemm_floor(g.T, torch.ones(g.shape[0], 1, dtype=g.dtype))}


def check(case: Case, opts: dict, grad_output=None, ulps: Optional[float] = None):
    """kdkernels vs truth, bounded by 2x naive's error + floor, for the loss and every gradient.
    Returns the kdkernels result for further checks."""
    got = run(case, "kd", opts, grad_output)
    truth, logit_grad = _truth_and_logit_grad(case, opts, grad_output)
    naive = run(case, "naive", opts, grad_output)
    kw = {"logit_scale": logit_scale(case, opts.get("temperature", 1.0))}
    if ulps is not None:
        kw["ulps"] = ulps
    R.assert_like_naive("loss", got[0], truth[0], naive[0], **kw)
    gemm = gemm_floors(case, logit_grad)
    for name in case.grads:
        assert got[1][name] is not None, f"no gradient for {name}"
        assert got[1][name].dtype == case.tensors[name].dtype, f"d{name} dtype {got[1][name].dtype}"
        R.assert_like_naive(f"d {name}", got[1][name], truth[1][name], naive[1][name],
                            gemm_floor=gemm.get(name, 0.0), **kw)
    return got


@pytest.fixture(scope="session")
def kd():
    return types.SimpleNamespace(make_case=make_case, make_labels=make_labels, run=run, check=check,
                                 upstream=upstream, rejected=R.rejected, logit_scale=logit_scale, sparse_teacher=sparse_teacher,
                                 FORMS=R.FORMS, SPARSE_FORMS=R.SPARSE_FORMS,
                                 DIVERGENCES=R.DIVERGENCES)


@pytest.fixture
def clean_env(monkeypatch):
    """The default backend selection, value checks and chunk budget, whatever the caller's shell
    says (for tests of those defaults; use with pytest.mark.usefixtures("clean_env"))."""
    for var in ("KDKERNELS_BACKEND", "KDKERNELS_CHECK_VALUES", "KDKERNELS_CHUNK_MB"):
        monkeypatch.delenv(var, raising=False)


# --------------------------------------------------------------------------------------------------
# Cache tests (tests/test_cache_build.py, test_cache_resume.py)


@pytest.fixture(scope="module")
def one_thread_per_module():
    """One intra-op thread for a module: the test machine is shared and oversubscription stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_cache_teacher():
    """A tiny randomly initialized Llama teacher (V = 1031) with its offline tokenizer."""
    from kdkernels.cache.testing import tiny_teacher
    return tiny_teacher(vocab_size=1031)
