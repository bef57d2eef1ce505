"""Every option on top of the matrix, for every teacher form and divergence: softcap, bias,
ce_weight, kd_weight, scale_by_temperature_squared=False, a vocab_size prefix (student 1040 vs
teacher 1031 rows), a tensor normalizer, (B, S) leading shapes; then odd shapes (V = 1031, N = 37
split into many row blocks) and one case at V = 50257. fp32, torch backend, vs float64."""
import zlib

import pytest
import torch

import reference as R

FEATURES = {
    # name: (make_case kwargs, loss options)
    "softcap": (dict(student_softcap=4.0, teacher_softcap=5.0, scale=6.0), {}),
    "bias": (dict(bias=True), {}),
    "ce_weight": (dict(), dict(ce_weight=0.7)),
    "ce_only": (dict(), dict(ce_weight=1.0, kd_weight=0.0)),
    "kd_weight": (dict(), dict(kd_weight=0.35)),
    "no_t_squared": (dict(), dict(scale_by_temperature_squared=False)),
    "vocab_prefix": (dict(student_extra=9, teacher_extra=0), {}),
    "vocab_prefix_teacher": (dict(student_extra=0, teacher_extra=5), {}),
    "tensor_normalizer": (dict(), dict(normalizer=torch.tensor(17.0))),
    "lead_shape": (dict(n=12, lead=(3, 4)), {}),
    "jsd_beta_skew_alpha": (dict(), dict(beta=0.2, alpha=0.7)),
}


def _seed(*parts):
    return zlib.crc32("/".join(map(str, parts)).encode()) % 10_000


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("form", R.FORMS)
def test_feature(kd, form, feature):
    case_kw, loss_kw = FEATURES[feature]
    if form == "logits" and ("student_softcap" in case_kw or "bias" in case_kw):
        pytest.skip("softcap and bias belong to the fused heads")
    if form.startswith("sparse") and case_kw.get("teacher_extra"):
        pytest.skip("a sparse teacher has no vocabulary of its own")
    T = 2.0
    for divergence in R.DIVERGENCES:
        if R.rejected(form, divergence):
            continue
        case = kd.make_case(form, temperature=T, seed=_seed(form, feature, divergence), **case_kw)
        labels = kd.make_labels(case.n, case.v, "some")
        if "lead" in case_kw:
            labels = labels.reshape(case_kw["lead"])
        opts = dict(divergence=divergence, temperature=T, labels=labels, chunk_bytes=8192, **loss_kw)
        try:
            kd.check(case, opts, kd.upstream("mean", ()))
            if "lead" in case_kw:
                go = kd.upstream("none", case_kw["lead"])
                loss, _ = kd.check(case, dict(opts, reduction="none"), go)
                assert loss.shape == case_kw["lead"]
        except AssertionError as e:
            raise AssertionError(f"divergence={divergence}: {e}") from None


def test_vocab_prefix_extra_rows_get_zero_grad(kd):
    """The student's rows beyond vocab_size get exactly zero gradient (and so does its bias)."""
    for form in ("linear", "sparse:logprobs:bucket"):
        case = kd.make_case(form, student_extra=9, bias=True)
        _, grads = kd.run(case, "kd", dict(ce_weight=0.5, labels=kd.make_labels(case.n, case.v, "some")))
        assert (grads["student_weight"][case.v:] == 0).all()
        assert (grads["student_bias"][case.v:] == 0).all()
        assert grads["student_weight"][:case.v].abs().sum() > 0
    case = kd.make_case("logits", student_extra=9)
    _, grads = kd.run(case, "kd", {})
    assert (grads["student_logits"][:, case.v:] == 0).all()


@pytest.mark.parametrize("form", R.FORMS)
def test_odd_shapes_many_blocks(kd, form):
    """V = 1031 (prime), N = 37, a chunk budget of ~2 rows: 19 row blocks, the last one short."""
    for i, divergence in enumerate(R.DIVERGENCES):
        if R.rejected(form, divergence):
            continue
        T = (0.5, 1.0, 2.0)[i % 3]
        case = kd.make_case(form, n=37, v=1031, k=20, temperature=T, seed=_seed(form, divergence))
        labels = kd.make_labels(case.n, case.v, "some")
        opts = dict(divergence=divergence, temperature=T, labels=labels, ce_weight=0.3,
                    chunk_bytes=2 * 1031 * 4 * 12)
        try:
            kd.check(case, opts, kd.upstream("sum", ()))
        except AssertionError as e:
            raise AssertionError(f"divergence={divergence} T={T}: {e}") from None


@pytest.mark.parametrize("form", ("logits", "linear", "sparse:logprobs:bucket",
                                  "sparse:weights:renorm_both"))
def test_gpt2_vocab(kd, form):
    """One case at V = 50257 per teacher kind (5 rows, default chunk budget and a small one)."""
    divergence = {"logits": "jsd", "linear": "forward_kl", "sparse:logprobs:bucket": "skew_reverse_kl",
                  "sparse:weights:renorm_both": "reverse_kl"}[form]
    case = kd.make_case(form, n=5, v=50257, k=64, temperature=2.0, seed=3)
    labels = kd.make_labels(case.n, case.v, "some")
    for chunk in (None, 50257 * 4 * 12):
        kd.check(case, dict(divergence=divergence, temperature=2.0, labels=labels, ce_weight=0.2,
                            chunk_bytes=chunk), kd.upstream("mean", ()))


@pytest.mark.parametrize("form", ("logits", "linear", "sparse:logprobs:bucket", "sparse:weights:renorm_both"))
def test_padded_student_vocab_1040_vs_1031(kd, form):
    """A padded student head (1040 rows, like Qwen's 152064 vs 151936) against a 1031-token teacher:
    vocab_size=1031 cuts both, the student softmax is over the prefix, the pad rows get 0."""
    case = kd.make_case(form, n=21, v=1031, k=16, student_extra=9, bias=True, temperature=2.0, seed=12)
    assert case.api_opts["vocab_size"] == 1031
    labels = kd.make_labels(case.n, case.v, "some")
    loss, grads = kd.check(case, dict(divergence="jsd", temperature=2.0, labels=labels, ce_weight=0.4,
                                      chunk_bytes=3 * 1040 * 4 * 12), kd.upstream("mean", ()))
    if form == "logits":
        assert grads["student_logits"].shape == (21, 1040)
        assert (grads["student_logits"][:, 1031:] == 0).all()
    else:
        assert (grads["student_weight"][1031:] == 0).all() and (grads["student_bias"][1031:] == 0).all()
