"""kdkernels.train: the loop's loss and gradients against full-logit references (float64), gradient
accumulation with the global normalizer, the no-logits guarantee, checkpoint resume, DDK, eval."""
from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from kdkernels.bench import naive  # noqa: E402
from kdkernels.train import (StepSampler, TrainConfig, collate, evaluate, lm_parts,  # noqa: E402
                             teacher_ce_rows, train)
from kdkernels.train import ddk as D  # noqa: E402
from kdkernels.train.objective import Objective  # noqa: E402

V = 1031


def tiny_llama(h=32, layers=1, seed=0, dtype=torch.float64, tied=False):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied, pad_token_id=0)
    return LlamaForCausalLM(cfg).to(dtype)


def ragged(n=8, seed=1, domains=1):
    g = torch.Generator().manual_seed(seed)
    lengths = [2, 17, 5, 11, 3, 20, 9, 14, 6, 12, 7, 19][:n]
    return [{"input_ids": torch.randint(1, V, (length,), generator=g), "domain": i % domains}
            for i, length in enumerate(lengths)]


def with_topk(data, teacher, k):
    """Attach the teacher's top-k log-probs (at T=1) per position, the cache layout."""
    from kdkernels import linear_topk
    parts = lm_parts(teacher)
    out = []
    with torch.no_grad():
        for e in data:
            h = parts.body(input_ids=e["input_ids"][None]).last_hidden_state[0]
            top = linear_topk(h, parts.weight, k)
            out.append(dict(e, teacher_ids=top.ids, teacher_values=top.logprobs))
    return out


def reference_grads(student, teacher, examples, *, kd_weight, ce_weight, temperature, cached=False):
    """The loss of one optimizer step over `examples`, from full logits, and its gradients."""
    student.zero_grad(set_to_none=True)
    batch = collate(examples)
    zs = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"].reshape(-1)
    zs = zs.reshape(-1, V)
    n = (labels != -100).sum()
    mask = labels != -100
    if cached:
        ids = batch["teacher_ids"].reshape(labels.shape[0], -1)
        vals = batch["teacher_values"].reshape(labels.shape[0], -1)
        eye = torch.eye(V, dtype=zs.dtype)
        # logits @ I = logits: the naive bucket loss on the model's materialized logits
        loss = naive.linear_sparse_kd_loss(zs, eye, ids, vals, labels, temperature, ce_weight,
                                           kd_weight)
    else:
        with torch.no_grad():
            zt = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lp = torch.log_softmax(zt.reshape(-1, V) / temperature, -1)
        lq = torch.log_softmax(zs / temperature, -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        ce = torch.nn.functional.cross_entropy(zs, labels.clamp_min(0), reduction="none")
        rows = kd_weight * temperature ** 2 * kl + ce_weight * ce
        loss = torch.where(mask, rows, 0.0).sum() / n
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in student.named_parameters()}


def loop_grads(student, data, cfg, teacher=None):
    res = train(student, data, cfg, teacher=teacher, log=None)
    return res, {k: p.grad.clone() for k, p in student.named_parameters()}


def step0_examples(data, cfg):
    s = StepSampler(len(data), cfg.batch_size, cfg.grad_accum, cfg.seed)
    idx = [i for m in range(cfg.grad_accum) for i in s.indices(0, m)]
    return [data[i] for i in idx], idx


def one_call_grads(student, teacher, examples, cfg):
    """The same loss as ONE call of the fused op over the whole step's batch (no accumulation)."""
    from kdkernels.train.objective import micro_batch_loss
    student.zero_grad(set_to_none=True)
    loss, _ = micro_batch_loss(lm_parts(student), collate(examples), cfg.objective(),
                               teacher=lm_parts(teacher) if teacher is not None else None)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in student.named_parameters()}


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def assert_as_accurate_as_one_call(loop, one, ref, loop_loss, one_loss, ref_loss):
    """Oracle bound: the loop's error against the float64 full-logit reference is at most ~2x the
    error of a single fused-op call on the same batch, plus a float64 floor."""
    floor = 1e-12
    assert loop_loss is None or abs(loop_loss - ref_loss) <= 2 * abs(one_loss - ref_loss) + floor * abs(ref_loss)
    for k in ref:
        e_loop, e_one = rel_err(loop[k], ref[k]), rel_err(one[k], ref[k])
        assert e_loop <= 2 * e_one + floor, f"{k}: loop error {e_loop:.2e} vs one call {e_one:.2e}"


def no_update(**kw):
    # lr = 0 and no clipping: the accumulated gradients stay in .grad, the weights do not move.
    # backend="torch": the float64 reference backend (others accumulate in fp32 by design)
    return TrainConfig(steps=1, lr=0.0, max_grad_norm=None, log_every=1, device="cpu",
                       backend="torch", **kw)


@pytest.mark.parametrize("accum", [1, 2, 4])
def test_online_teacher_accumulation_matches_one_big_batch(accum):
    data = ragged(8)
    teacher, student = tiny_llama(h=48, seed=1), tiny_llama(seed=2)
    cfg = no_update(batch_size=8 // accum, grad_accum=accum, kd_weight=0.7, ce_weight=0.3,
                    temperature=2.0)
    examples, idx = step0_examples(data, cfg)
    if accum > 1:   # the micro-batches must hold different token counts, or a per-micro-batch
        bs = cfg.batch_size
        counts = {sum(len(data[i]["input_ids"]) - 1 for i in idx[m * bs:(m + 1) * bs])
                  for m in range(accum)}
        assert len(counts) > 1  # mean would pass too
    ref_loss, ref = reference_grads(student, teacher, examples, kd_weight=0.7, ce_weight=0.3,
                                    temperature=2.0)
    one_loss, one = one_call_grads(student, teacher, examples, cfg)
    res, got = loop_grads(student, data, cfg, teacher)
    assert_as_accurate_as_one_call(got, one, ref, res.history[0]["loss"], float(one_loss),
                                   float(ref_loss))


def test_cached_teacher_matches_full_logit_reference():
    teacher, student = tiny_llama(h=48, seed=1), tiny_llama(seed=2)
    data = with_topk(ragged(6), teacher, k=16)
    cfg = no_update(batch_size=3, grad_accum=2, kd_weight=1.0, ce_weight=0.5)
    examples, _ = step0_examples(data, cfg)
    ref_loss, ref = reference_grads(student, None, examples, kd_weight=1.0, ce_weight=0.5,
                                    temperature=1.0, cached=True)
    one_loss, one = one_call_grads(student, None, examples, cfg)
    res, got = loop_grads(student, data, cfg)
    assert_as_accurate_as_one_call(got, one, ref, res.history[0]["loss"], float(one_loss),
                                   float(ref_loss))


def test_ce_only_equals_hugging_face_loss():
    student = tiny_llama(seed=3)
    data = ragged(4)
    cfg = no_update(batch_size=4, kd_weight=0.0, ce_weight=1.0)
    examples, _ = step0_examples(data, cfg)
    b = collate(examples)
    hf_labels = torch.where(b["attention_mask"].bool(), b["input_ids"], -100)
    with torch.no_grad():
        want = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=hf_labels).loss
    res = train(student, data, cfg, log=None)
    # HF upcasts the logits to float32 before its CE: agreement to fp32 rounding, not 1e-9
    assert res.history[0]["loss"] == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("path", ["online", "cached", "ce_only"])
def test_loop_never_calls_the_lm_head(path, monkeypatch):
    teacher, student = tiny_llama(h=48, seed=1), tiny_llama(seed=2, dtype=torch.float32)
    teacher = teacher.float()
    data = ragged(4)
    if path == "cached":
        data = with_topk(data, teacher, k=8)

    def boom(*a, **k):
        raise AssertionError("the full logits were computed")
    for m in (student, teacher):
        monkeypatch.setattr(m.lm_head, "forward", boom)
        monkeypatch.setattr(m, "forward", boom)
    kw = dict(kd_weight=0.0, ce_weight=1.0) if path == "ce_only" else {}
    res = train(student, data, TrainConfig(steps=1, batch_size=2, grad_accum=2, device="cpu", **kw),
                teacher=teacher if path == "online" else None, log=None)
    assert math.isfinite(res.history[-1]["loss"])


def test_kd_without_a_teacher_is_an_error():
    with pytest.raises(ValueError, match="needs a teacher"):
        train(tiny_llama(dtype=torch.float32), ragged(2), TrainConfig(steps=1, batch_size=2), log=None)


@pytest.mark.parametrize("ddk", [False, True])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, ddk):
    teacher = tiny_llama(h=48, seed=1, dtype=torch.float32)
    data = ragged(12, domains=3)
    cfg = dict(steps=5, batch_size=2, grad_accum=2, lr=3e-3, warmup_steps=2, log_every=1,
               device="cpu", ce_weight=0.2, domain_reweight=ddk, reweight_every=2)
    full = tiny_llama(seed=2, dtype=torch.float32)
    res_full = train(full, data, TrainConfig(out_dir=str(tmp_path / "a"), **cfg), teacher=teacher, log=None)

    class Crash(Exception):
        pass

    def crash_at_4(rec):
        if rec["step"] == 4:
            raise Crash
    first = tiny_llama(seed=2, dtype=torch.float32)
    with pytest.raises(Crash):
        train(first, data, TrainConfig(out_dir=str(tmp_path / "b"), save_every=3, **cfg), teacher=teacher,
              log=crash_at_4)
    resumed = tiny_llama(seed=99, dtype=torch.float32)   # different init: everything must come from disk
    res = train(resumed, data, TrainConfig(out_dir=str(tmp_path / "b"), save_every=3, **cfg),
                teacher=teacher, log=None)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert [r["loss"] for r in res.history] == [r["loss"] for r in res_full.history]
    if ddk:
        assert res.domain_weights == res_full.domain_weights


def test_sampler_epochs_cover_every_example_once():
    s = StepSampler(10, 3, 1, seed=5)
    seen = [i for step in range(10) for i in s.indices(step, 0)]   # 30 draws = 3 epochs
    for e in range(3):
        assert sorted(seen[10 * e:10 * (e + 1)]) == list(range(10))


def test_collate_aligns_labels_and_teacher_slots():
    ex = [{"input_ids": torch.tensor([5, 6, 7]), "teacher_ids": torch.tensor([[6], [7], [8]]),
           "teacher_values": torch.zeros(3, 1)},
          {"input_ids": torch.tensor([9]), "teacher_ids": torch.tensor([[1]]),
           "teacher_values": torch.zeros(1, 1)}]
    b = collate(ex, pad_id=0)
    assert b["labels"].tolist() == [[6, 7, -100], [-100, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["teacher_ids"][1, 1:].eq(-1).all()


def test_teacher_ce_rows_live_and_cached():
    teacher = tiny_llama(h=48, seed=1)
    data = ragged(3)
    b = collate(data)
    labels = b["labels"].reshape(-1)
    with torch.no_grad():
        z = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.reshape(-1, V)
    want = torch.nn.functional.cross_entropy(z, labels.clamp_min(0), reduction="none")
    want = torch.where(labels != -100, want, 0.0)
    live = teacher_ce_rows(b, Objective(), lm_parts(teacher))
    torch.testing.assert_close(live, want, rtol=1e-9, atol=1e-9)
    # k = V: every label is among the cached ids, so the cached value is exact
    cached = collate(with_topk(data, teacher, k=V))
    got = teacher_ce_rows(cached, Objective())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_ddk_statistics_and_rule():
    st = D.DomainStats(3)
    rows = torch.tensor([1.0, 3.0, 0.5, 0.0])
    tce = torch.tensor([2.0, 2.0, 1.0, 9.0])
    counted = torch.tensor([True, True, True, False])
    st.add(rows, tce, counted, torch.tensor([0, 0, 1, 2]))
    kd, t = st.means()
    assert kd.tolist()[:2] == [2.0, 0.5] and t.tolist()[:2] == [2.0, 1.0]
    assert st.tokens.tolist() == [2.0, 1.0, 0.0]
    w = D.target_weights(st, tau=1.0, mix=0.3)
    gap = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(w, 0.7 * torch.softmax(gap, 0) + 0.1)
    assert w[0] > w[1] > w[2] >= 0.1 and float(w.sum()) == pytest.approx(1.0)
    ex = D.example_weights(w, [0, 0, 1, 2, 2, 2])
    assert float(ex[:2].sum()) == pytest.approx(float(w[0]))
    assert float(ex[3:].sum()) == pytest.approx(float(w[2]))


def test_ddk_loop_applies_the_rule_to_measured_gaps():
    teacher = tiny_llama(h=48, seed=1, dtype=torch.float32)
    data = ragged(12, domains=2)
    res = train(tiny_llama(seed=2, dtype=torch.float32), data,
                TrainConfig(steps=4, batch_size=4, lr=0.0, device="cpu", log_every=2,
                            domain_reweight=True, reweight_every=2, reweight_momentum=1.0,
                            reweight_mix=0.2, reweight_tau=0.05),
                teacher=teacher, log=None)
    rec = res.history[-1]        # the statistics of the window that set the weights
    kd = torch.tensor(rec["domain_kd"], dtype=torch.float64)
    tce = torch.tensor(rec["domain_teacher_ce"], dtype=torch.float64)
    assert (kd > 0).all() and (tce > 0).all()
    want = 0.8 * torch.softmax(kd / tce / 0.05, 0) + 0.1
    torch.testing.assert_close(torch.tensor(res.domain_weights, dtype=torch.float64), want)


def test_evaluate_matches_full_logits():
    teacher, student = tiny_llama(h=48, seed=1), tiny_llama(seed=2)
    data = ragged(5)
    b = collate(data)
    labels = b["labels"].reshape(-1)
    mask = labels != -100
    with torch.no_grad():
        zs = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.reshape(-1, V)
        zt = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.reshape(-1, V)
    lq, lp = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    ce = torch.nn.functional.cross_entropy(zs, labels.clamp_min(0), reduction="none")[mask].mean()
    kl = (lp.exp() * (lp - lq)).sum(-1)[mask].mean()
    m = evaluate(student, data, teacher=teacher, batch_size=2, backend="torch")
    assert m["ppl"] == pytest.approx(math.exp(float(ce)), rel=1e-9)
    assert m["kl"] == pytest.approx(float(kl), rel=1e-9)
    assert m["tokens"] == int(mask.sum())


def test_lm_parts_rejects_a_model_without_a_head():
    with pytest.raises(TypeError, match="output embeddings"):
        lm_parts(torch.nn.Linear(3, 3))


def test_akl_through_the_loop_uses_mu():
    """divergence='akl' with TrainConfig.akl_mu: the loop's loss equals one direct call of the fused
    sparse loss with that mu (and differs from another mu's)."""
    import kdkernels
    teacher, student = tiny_llama(h=48, seed=1), tiny_llama(seed=2)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(40.0)      # a peaked teacher, so that mu changes the head set
    data = with_topk(ragged(6), teacher, k=16)
    losses = {}
    for mu in (0.3, 0.9):
        cfg = no_update(batch_size=6, grad_accum=1, divergence="akl", akl_mu=mu)
        res, _ = loop_grads(student, data, cfg)
        losses[mu] = res.history[0]["loss"]
    examples, _ = step0_examples(data, cfg)
    b = collate(examples)
    parts = lm_parts(student)
    with torch.no_grad():
        hs = parts.body(input_ids=b["input_ids"], attention_mask=b.get("attention_mask")).last_hidden_state
        direct = kdkernels.fused_linear_sparse_kd_loss(
            hs, parts.weight, b["teacher_ids"], b["teacher_values"], labels=b["labels"],
            divergence="akl", mu=0.9, backend="torch")
    assert math.isclose(losses[0.9], float(direct), rel_tol=1e-9)
    assert not math.isclose(losses[0.3], losses[0.9], rel_tol=1e-6)
