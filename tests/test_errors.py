"""Bad input gets a ValueError or TypeError that names the argument (docs/semantics.md, issue 2):
shapes, dtypes, devices, ids out of range, k > V, temperature, NaN, wrong `values`, unknown names,
jsd beta = 0/1, rejected sparse combinations, vocabulary mismatches."""
import math

import pytest
import torch

import kdkernels

pytestmark = pytest.mark.usefixtures("clean_env")

N, V, H = 6, 23, 8


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def logits(n=N, v=V, seed=0):
    return torch.randn(n, v, generator=_g(seed))


def head(n=N, v=V, h=H, seed=0):
    g = _g(seed)
    return torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)


def topk_cache(n=N, v=V, k=5, seed=1):
    lp = torch.randn(n, v, generator=_g(seed)).log_softmax(-1)
    t = torch.topk(lp, k, 1)
    return t.indices, t.values


def weights_cache(n=N, v=V, k=4):
    ids = torch.stack([torch.randperm(v, generator=_g(i))[:k] for i in range(n)])
    return ids, torch.full((n, k), 1.0 / k)


def raises(exc, *words):
    """pytest.raises that also checks the message names each of `words`."""
    class _Ctx:
        def __enter__(self):
            self.cm = pytest.raises(exc)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *a):
            out = self.cm.__exit__(*a)
            msg = str(self.info.value)
            for w in words:
                assert w in msg, f"error message does not name {w!r}: {msg}"
            return out
    return _Ctx()


def kd(zs=None, zt=None, **kw):
    return kdkernels.kd_loss(logits() if zs is None else zs, logits(seed=1) if zt is None else zt,
                             backend="torch", **kw)


def lin(**kw):
    hs, ws = head()
    ht, wt = head(h=5, seed=2)
    args = dict(student_hidden=hs, student_weight=ws, teacher_hidden=ht, teacher_weight=wt)
    args.update({k: kw.pop(k) for k in list(kw) if k in args})
    return kdkernels.fused_linear_kd_loss(args["student_hidden"], args["student_weight"],
                                          args["teacher_hidden"], args["teacher_weight"],
                                          backend="torch", **kw)


def sparse(ids=None, vals=None, hs=None, ws=None, **kw):
    h0, w0 = head()
    i0, v0 = topk_cache()
    return kdkernels.fused_linear_sparse_kd_loss(h0 if hs is None else hs, w0 if ws is None else ws,
                                                 i0 if ids is None else ids,
                                                 v0 if vals is None else vals, backend="torch", **kw)


# ------------------------------------------------------------------------------------------------
# shapes, dtypes, devices


def test_shape_mismatches():
    with raises(ValueError, "student_logits", "teacher_logits"):
        kd(zs=logits(n=5))
    with raises(ValueError, "student_hidden", "student_weight"):
        lin(student_weight=torch.randn(V, H + 1))
    with raises(ValueError, "teacher_hidden", "teacher_weight"):
        lin(teacher_hidden=torch.randn(N, 4))
    with raises(ValueError, "student_hidden", "teacher_hidden"):
        lin(teacher_hidden=torch.randn(N + 1, 5))
    with raises(ValueError, "student_bias"):
        lin(student_bias=torch.zeros(V + 1))
    with raises(ValueError, "labels"):
        kd(labels=torch.zeros(N + 2, dtype=torch.long))
    ids, vals = topk_cache()
    with raises(ValueError, "teacher_ids", "teacher_values"):
        sparse(ids=ids, vals=vals[:, :-1])
    with raises(ValueError, "teacher_ids", "student_hidden"):
        sparse(ids=ids[:-1], vals=vals[:-1])
    with raises(ValueError, "student_weight"):
        sparse(ws=torch.randn(V))


def test_dtype_mismatches():
    with raises(TypeError, "student_logits"):
        kd(zs=torch.zeros(N, V, dtype=torch.long))
    with raises(TypeError, "student_weight"):
        lin(student_weight=torch.randn(V, H, dtype=torch.float16))
    with raises(TypeError, "teacher_weight"):
        lin(teacher_weight=torch.randn(V, 5, dtype=torch.bfloat16))
    with raises(TypeError, "labels"):
        kd(labels=torch.zeros(N))
    ids, vals = topk_cache()
    with raises(TypeError, "teacher_ids"):
        sparse(ids=ids.float())
    with raises(TypeError, "teacher_values"):
        sparse(vals=vals.long())
    with raises(TypeError, "student_logits"):
        kdkernels.kd_loss([[0.0]], logits(), backend="torch")


def test_device_mismatch():
    """Tensors on two devices ("meta" stands in for a second device on a CPU-only machine)."""
    with raises(ValueError, "device", "teacher_logits"):
        kd(zt=logits().to("meta"))
    with raises(ValueError, "device", "teacher_ids"):
        ids, vals = topk_cache()
        sparse(ids=ids.to("meta"))


# ------------------------------------------------------------------------------------------------
# values


def test_ids_out_of_range_and_duplicates():
    ids, vals = topk_cache()
    for bad in (V, V + 7, -2):
        b = ids.clone()
        b[2, 1] = bad
        with raises(ValueError, "teacher_ids", str(V)):
            sparse(ids=b)
    b = ids.clone()
    b[3, 2] = b[3, 0]
    with raises(ValueError, "teacher_ids", "distinct"):
        sparse(ids=b)
    with raises(ValueError, "labels"):
        kd(labels=torch.full((N,), V), ce_weight=1.0)


def test_k_larger_than_vocab():
    lp = torch.randn(N, V).log_softmax(-1)
    ids = torch.cat([torch.arange(V), torch.full((1,), -1)]).expand(N, V + 1)
    vals = torch.cat([lp, torch.zeros(N, 1)], 1)
    with raises(ValueError, "k=", str(V)):
        sparse(ids=ids, vals=vals)
    hs, ws = head()
    with raises(ValueError, "k=", str(V)):
        kdkernels.linear_topk(hs, ws, V + 1, backend="torch")
    for k in (0, 2.0):
        with raises(ValueError, "k"):
            kdkernels.linear_topk(hs, ws, k, backend="torch")


@pytest.mark.parametrize("t", (0.0, -1.0, math.nan, math.inf))
def test_bad_temperature(t):
    with raises(ValueError, "temperature"):
        kd(temperature=t)
    with raises(ValueError, "temperature"):
        sparse(temperature=t)
    hs, ws = head()
    with raises(ValueError, "temperature"):
        kdkernels.linear_topk(hs, ws, 3, temperature=t, backend="torch")
    with raises(ValueError, "temperature"):
        kdkernels.linear_sample(hs, ws, 8, temperature=t, backend="torch")


def test_nan_inputs_in_counted_rows():
    for d in kdkernels.DIVERGENCES:   # forward KL once returned 0 for a NaN teacher (p > 0 is False)
        for name in ("zs", "zt"):
            x = logits()
            x[2, 3] = math.nan
            with raises(ValueError, "NaN"):
                kd(divergence=d, **{name: x})
    hs, ws = head()
    hs[1, 0] = math.nan
    with raises(ValueError, "NaN"):
        lin(student_hidden=hs)
    with raises(ValueError, "NaN"):
        sparse(hs=hs)
    ids, vals = topk_cache()
    vals = vals.clone()
    vals[0, 0] = math.nan
    with raises(ValueError, "teacher_values"):
        sparse(vals=vals)
    ids, w = weights_cache()
    w = w.clone()
    w[1, 1] = math.inf
    with raises(ValueError, "teacher_values"):
        sparse(ids=ids, vals=w, values="weights")


def test_wrong_values_kind():
    ids, lp = topk_cache()
    with raises(ValueError, "teacher_values", "weights"):       # probabilities passed as log-probs
        sparse(ids=ids, vals=lp.exp())
    wids, w = weights_cache()
    with raises(ValueError, "teacher_values", "logprobs"):      # log-probs passed as weights
        sparse(ids=wids, vals=w.log(), values="weights")
    with raises(ValueError, "teacher_values", "sum to 1"):      # weights that do not sum to 1
        sparse(ids=wids, vals=w * 0.5, values="weights")


# ------------------------------------------------------------------------------------------------
# names and option ranges


def test_unknown_names():
    with raises(ValueError, "divergence", "'kl'"):
        kd(divergence="kl")
    with raises(ValueError, "reduction", "'avg'"):
        kd(reduction="avg")
    with raises(ValueError, "tail", "'drop'"):
        sparse(tail="drop")
    with raises(ValueError, "values", "'probs'"):
        sparse(values="probs")
    with raises(ValueError, "backend", "'cuda'"):
        kd(backend="cuda") if False else kdkernels.kd_loss(logits(), logits(), backend="cuda")
    with pytest.raises(TypeError):
        kd(divergences="jsd")  # a misspelled keyword is not silently ignored


@pytest.mark.parametrize("beta", (0.0, 1.0))
def test_jsd_beta_endpoints_point_to_kl(beta):
    with raises(ValueError, "beta", "forward_kl", "reverse_kl"):
        kd(divergence="jsd", beta=beta)


@pytest.mark.parametrize("bad", (-0.5, 1.5, math.nan))
def test_option_ranges(bad):
    with raises(ValueError, "beta"):
        kd(divergence="jsd", beta=bad)
    for d in ("skew_forward_kl", "skew_reverse_kl"):
        with raises(ValueError, "alpha"):
            kd(divergence=d, alpha=bad)
    if not math.isnan(bad) and bad < 0:
        with raises(ValueError, "kd_weight"):
            kd(kd_weight=bad)
        with raises(ValueError, "ce_weight"):
            kd(ce_weight=bad, labels=torch.zeros(N, dtype=torch.long))
    with raises(ValueError, "student_softcap"):
        lin(student_softcap=-1.0)
    with raises(ValueError, "teacher_softcap"):
        lin(teacher_softcap=0.0)
    with raises(ValueError, "draws"):
        kdkernels.linear_sample(*head(), 0, backend="torch")


def test_rejected_sparse_combinations():
    with raises(ValueError, "reverse_kl", "renorm_teacher"):
        sparse(divergence="reverse_kl", tail="renorm_teacher")
    ids, w = weights_cache()
    for tail in ("bucket", "renorm_teacher"):
        with raises(ValueError, "reverse_kl", tail if tail == "renorm_teacher" else "weights"):
            sparse(ids=ids, vals=w, values="weights", divergence="reverse_kl", tail=tail)
    sparse(ids=ids, vals=w, values="weights", divergence="reverse_kl", tail="renorm_both")


def test_reduction_arguments():
    with raises(ValueError, "labels"):
        kd(ce_weight=0.5)                                  # CE needs labels
    with raises(ValueError, "normalizer"):
        kd(reduction="sum", normalizer=4.0)


def test_vocab_mismatch_names_both_sizes():
    with raises(ValueError, "1040", "1031", "vocab_size"):
        kd(zs=logits(v=1040), zt=logits(v=1031, seed=1))
    with raises(ValueError, "1040", "1031"):
        lin(student_weight=torch.randn(1040, H), teacher_weight=torch.randn(1031, 5))
    with raises(ValueError, "vocab_size"):
        kd(zs=logits(v=1040), zt=logits(v=1031, seed=1), vocab_size=1035)
    for bad in (0, -3, 2.5):
        with raises(ValueError, "vocab_size"):
            kd(vocab_size=bad)
    ids, vals = topk_cache()
    with raises(ValueError, "teacher_ids"):           # an id beyond the vocabulary prefix
        sparse(ids=torch.where(ids == ids[0, 0], V - 1, ids), vals=vals, vocab_size=V - 1)
