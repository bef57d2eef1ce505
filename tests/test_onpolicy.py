"""On-policy distillation (kdkernels/train/onpolicy.py, docs/onpolicy.md) on tiny random Llamas:
the rollout is the student's own inverse-CDF sampler, the on-policy loss and gradients equal dense
float64 formulas on the materialized logits of the same generated sequence, the prompt rows get no
gradient, fraction 0 never touches the on-policy code, fraction 1 is deterministic, and errors."""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from kdkernels.train import StepSampler, TrainConfig, collate, lm_parts, train  # noqa: E402
from kdkernels.train import onpolicy as OP  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
V = 311          # odd on purpose
EPS64 = torch.finfo(torch.float64).eps


def tiny_llama(h=32, seed=0, dtype=torch.float64, vocab=V, eos=2, dropout=0.0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=eos, bos_token_id=1, attention_dropout=dropout)
    return LlamaForCausalLM(cfg).to(dtype)


def ragged(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = [9, 5, 12, 7, 6, 10, 8, 11][:n]
    return [{"input_ids": torch.randint(3, V, (length,), generator=g)} for length in lengths]


def dense_rows(student, teacher, batch, divergence, beta, temperature, kd_weight):
    """Per-row kd_weight * T^2 * D(p, q) from the full float64 logits of both models (0 at ignored
    rows), written from docs/semantics.md independently of kdkernels."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    zs = student(input_ids=ids, attention_mask=mask).logits.reshape(-1, V).double()
    with torch.no_grad():
        zt = teacher(input_ids=ids, attention_mask=mask).logits.reshape(-1, V).double()
    lp, lq = torch.log_softmax(zt / temperature, -1), torch.log_softmax(zs / temperature, -1)
    if divergence == "reverse_kl":
        d = (lq.exp() * (lq - lp)).sum(-1)
    elif divergence == "jsd":
        lm = torch.logaddexp(math.log(beta) + lp, math.log(1 - beta) + lq)
        d = beta * (lp.exp() * (lp - lm)).sum(-1) + (1 - beta) * (lq.exp() * (lq - lm)).sum(-1)
    else:
        d = (lp.exp() * (lp - lq)).sum(-1)
    counted = batch["labels"].reshape(-1) != -100
    return torch.where(counted, kd_weight * temperature ** 2 * d, 0.0)


def grads_of(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# ------------------------------------------------------------------------------------------------
# the rollout


def test_rollout_is_the_students_inverse_cdf_sampler():
    student = tiny_llama(seed=2, dropout=0.5)      # the policy is the eval-mode model
    student.train()
    prompts = torch.randint(3, V, (3, 4), generator=torch.Generator().manual_seed(0))
    before = prompts.clone()
    tau, G = 0.7, 6
    got = OP.rollout(lm_parts(student), prompts, G, temperature=tau,
                     generator=torch.Generator().manual_seed(5), eos_token_id=None, backend="torch")
    assert torch.equal(prompts, before) and student.training
    # reference: a full forward (no KV cache) per step and the documented inverse CDF on the same
    # uniform stream: y = smallest j with CDF(j) > u * CDF(V-1), u = torch.rand(B, 1, generator)
    g = torch.Generator().manual_seed(5)
    seq = prompts.clone()
    student.eval()
    with torch.no_grad():
        for _ in range(G):
            p = torch.softmax(student(input_ids=seq).logits[:, -1].double() / tau, -1)
            cdf = p.cumsum(-1)
            u = torch.rand(3, 1, generator=g, dtype=torch.float64)
            y = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
            seq = torch.cat([seq, y], 1)
    assert torch.equal(got["input_ids"], seq)
    P = 4
    assert got["prompt_len"] == P and got["on_policy"] is True
    assert got["attention_mask"].eq(1).all()
    lab = got["labels"]
    assert lab[:, :P - 1].eq(-100).all() and lab[:, -1].eq(-100).all()
    assert torch.equal(lab[:, P - 1:-1], seq[:, P:])


def test_rollout_stops_at_eos_and_ignores_what_follows():
    student = tiny_llama(seed=2)
    eos = list(range(3, 160))          # about half the vocabulary ends a sequence
    prompts = torch.randint(160, V, (4, 3), generator=torch.Generator().manual_seed(1))
    G = 12
    out = OP.rollout(lm_parts(student), prompts, G, generator=torch.Generator().manual_seed(3),
                     eos_token_id=eos, pad_id=0, backend="torch")
    gen = out["input_ids"][:, 3:]
    assert gen.shape[1] < G, "every sequence ended early: generation must stop"
    is_eos = torch.isin(gen, torch.tensor(eos))
    for r in range(4):
        first = int(is_eos[r].nonzero()[0])                     # every row ended (early stop)
        assert out["attention_mask"][r, 3:3 + first + 1].eq(1).all()
        assert out["attention_mask"][r, 3 + first + 1:].eq(0).all()
        assert gen[r, first + 1:].eq(0).all()                   # pad after EOS
        lab = out["labels"][r, 2:2 + gen.shape[1]]
        assert torch.equal(lab[:first + 1], gen[r, :first + 1])  # the EOS row is counted
        assert lab[first + 1:].eq(-100).all()
    assert len({int(is_eos[r].nonzero()[0]) for r in range(4)}) > 1   # ragged lengths exercised


def test_prompts_use_the_shortest_example():
    b = collate([{"input_ids": torch.arange(3, 10)}, {"input_ids": torch.arange(20, 23)}])
    assert torch.equal(OP.prompts_from(b, 5), torch.tensor([[3, 4, 5], [20, 21, 22]]))
    assert torch.equal(OP.prompts_from(b, 2), torch.tensor([[3, 4], [20, 21]]))


# ------------------------------------------------------------------------------------------------
# the loss


@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("jsd", 0.3)])
def test_on_policy_loss_matches_dense_float64(divergence, beta):
    student, teacher = tiny_llama(seed=2), tiny_llama(h=48, seed=1)
    prompts = torch.randint(3, V, (3, 5), generator=torch.Generator().manual_seed(2))
    # EOS on a third of the vocabulary: some rows end early, so ignored generated rows exist too
    batch = OP.rollout(lm_parts(student), prompts, 7, temperature=1.3, backend="torch",
                       generator=torch.Generator().manual_seed(4), eos_token_id=list(range(3, 100)))
    n = int((batch["labels"] != -100).sum())
    assert 3 <= n < 3 * 7
    normalizer = torch.tensor(n + 5.0, dtype=torch.float64)   # as in an accumulated step
    kw = dict(divergence=divergence, beta=beta, temperature=2.0, kd_weight=0.7)
    loss = OP.on_policy_loss(lm_parts(student), lm_parts(teacher), batch, normalizer=normalizer,
                             backend="torch", **kw)
    (0.6 * loss).backward()                                  # a non-unit upstream gradient
    got = grads_of(student)
    student.zero_grad(set_to_none=True)
    ref = dense_rows(student, teacher, batch, **kw).sum() / normalizer
    (0.6 * ref).backward()
    want = grads_of(student)
    assert all(p.grad is None for p in teacher.parameters())
    ref, loss = ref.detach(), loss.detach()
    assert loss.dtype == torch.float64 and float(ref) > 0
    # both in float64: the fused loss agrees with the dense formulas to float64 rounding
    assert abs(float(loss) - float(ref)) <= 1e3 * EPS64 * abs(float(ref))
    assert set(got) == set(want)
    for k in want:
        assert rel_err(got[k], want[k]) <= 1e4 * EPS64, k


def test_prompt_rows_get_no_gradient():
    student, teacher = tiny_llama(seed=2), tiny_llama(h=48, seed=1)
    prompts = torch.randint(3, V, (2, 6), generator=torch.Generator().manual_seed(2))
    batch = OP.rollout(lm_parts(student), prompts, 5, generator=torch.Generator().manual_seed(1),
                       eos_token_id=None, backend="torch")
    seen = []

    def keep(module, args, out):
        out.last_hidden_state.retain_grad()
        seen.append(out.last_hidden_state)
    hook = student.model.register_forward_hook(keep)
    try:
        OP.on_policy_loss(lm_parts(student), lm_parts(teacher), batch, backend="torch").backward()
    finally:
        hook.remove()
    g = seen[0].grad                                    # d loss / d final hidden state (B, L, H)
    P = 6
    assert g[:, :P - 1].eq(0).all(), "a prompt row got a gradient"
    assert g[:, -1].eq(0).all()                         # the last row predicts nothing
    assert (g[:, P - 1:-1].abs().sum(-1) > 0).all()     # every generated row is trained


# ------------------------------------------------------------------------------------------------
# the loop


def loop_cfg(**kw):
    base = dict(steps=1, batch_size=2, grad_accum=2, lr=0.0, max_grad_norm=None, log_every=1,
                device="cpu", backend="torch", on_policy_max_new_tokens=5, on_policy_prompt_len=4)
    base.update(kw)
    return TrainConfig(**base)


def test_loop_step_equals_the_rollouts_dense_reference():
    """fraction 1: the loop's accumulated gradient is the dense gradient of the step's rollouts,
    regenerated from the documented seeds, over the global token count."""
    student, teacher = tiny_llama(seed=2), tiny_llama(h=48, seed=1)
    data = ragged(6)
    cfg = loop_cfg(on_policy_fraction=1.0, on_policy_divergence="jsd", on_policy_beta=0.4,
                   temperature=1.5, kd_weight=0.8, on_policy_temperature=0.9, seed=3)
    s = StepSampler(len(data), cfg.batch_size, cfg.grad_accum, cfg.seed)
    batches = []
    for m in range(cfg.grad_accum):
        b = collate([data[i] for i in s.indices(0, m)])
        batches.append(OP.rollout(lm_parts(student), OP.prompts_from(b, 4), 5, temperature=0.9,
                                  generator=OP.rollout_generator(3, 0, m, "cpu"),
                                  eos_token_id=OP.eos_ids(student), backend="torch"))
    n = sum(int((b["labels"] != -100).sum()) for b in batches)
    ref = sum(dense_rows(student, teacher, b, "jsd", 0.4, 1.5, 0.8).sum() for b in batches) / n
    ref.backward()
    ref, want = ref.detach(), grads_of(student)
    student.zero_grad(set_to_none=True)
    res = train(student, data, cfg, teacher=teacher, log=None)
    rec = res.history[0]
    assert rec["tokens"] == n and rec["on_policy_micro_batches"] == 2
    assert abs(rec["loss"] - float(ref)) <= 1e3 * EPS64 * abs(float(ref))
    got = grads_of(student)
    for k in want:
        assert rel_err(got[k], want[k]) <= 1e4 * EPS64, k


def test_fraction_zero_never_runs_the_on_policy_code(monkeypatch):
    teacher = tiny_llama(h=48, seed=1, dtype=torch.float32)
    data = ragged(6)
    cfg = dict(steps=2, batch_size=2, grad_accum=2, lr=3e-3, device="cpu", log_every=1)
    a = tiny_llama(seed=2, dtype=torch.float32)
    ra = train(a, data, TrainConfig(**cfg), teacher=teacher, log=None)

    def boom(*args, **kw):
        raise AssertionError("on-policy code ran with on_policy_fraction=0")
    monkeypatch.setattr(OP, "OnPolicy", boom)
    monkeypatch.setattr(OP, "rollout", boom)
    b = tiny_llama(seed=2, dtype=torch.float32)
    rb = train(b, data, TrainConfig(on_policy_fraction=0.0, on_policy_max_new_tokens=3,
                                    on_policy_divergence="jsd", **cfg), teacher=teacher, log=None)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    timing = ("tokens_per_s", "peak_mem_bytes")
    strip = lambda h: [{k: v for k, v in r.items() if k not in timing} for r in h]  # noqa: E731
    assert strip(ra.history) == strip(rb.history)
    assert "on_policy_micro_batches" not in rb.history[0]


def test_fraction_one_is_deterministic_and_never_forms_logits(monkeypatch):
    teacher = tiny_llama(h=48, seed=1, dtype=torch.float32)
    data = ragged(6)

    def boom(*a, **k):
        raise AssertionError("the full logits were computed")

    def run(seed):
        student = tiny_llama(seed=2, dtype=torch.float32)
        for m in (student, teacher):
            monkeypatch.setattr(m.lm_head, "forward", boom)
            monkeypatch.setattr(m, "forward", boom)
        cfg = TrainConfig(steps=2, batch_size=2, grad_accum=2, lr=3e-3, device="cpu", log_every=1,
                          on_policy_fraction=1.0, on_policy_max_new_tokens=4, on_policy_prompt_len=3,
                          seed=seed)
        res = train(student, data, cfg, teacher=teacher, log=None)
        return student, [r["loss"] for r in res.history]
    a, la = run(7)
    b, lb = run(7)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    assert la == lb and all(math.isfinite(x) and x > 0 for x in la)
    _, lc = run(8)
    assert lc != la                                   # the seed does choose the samples


def test_resume_reproduces_an_uninterrupted_on_policy_run(tmp_path):
    """The rollouts are seeded by (seed, step, micro-batch): a resumed run samples what the
    uninterrupted run sampled."""
    teacher = tiny_llama(h=48, seed=1, dtype=torch.float32)
    data = ragged(6)
    cfg = dict(steps=3, batch_size=2, grad_accum=2, lr=3e-3, device="cpu", log_every=1,
               on_policy_fraction=0.5, on_policy_max_new_tokens=4, on_policy_prompt_len=3)
    full = tiny_llama(seed=2, dtype=torch.float32)
    ref = train(full, data, TrainConfig(out_dir=str(tmp_path / "a"), **cfg), teacher=teacher, log=None)

    class Crash(Exception):
        pass

    def crash_at_3(rec):
        if rec["step"] == 3:
            raise Crash
    with pytest.raises(Crash):
        train(tiny_llama(seed=2, dtype=torch.float32), data,
              TrainConfig(out_dir=str(tmp_path / "b"), save_every=2, **cfg), teacher=teacher,
              log=crash_at_3)
    resumed = tiny_llama(seed=99, dtype=torch.float32)
    res = train(resumed, data, TrainConfig(out_dir=str(tmp_path / "b"), save_every=2, **cfg),
                teacher=teacher, log=None)
    assert ref.history[2]["on_policy_micro_batches"] > 0     # the resumed step samples
    for (k, x), y in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(x, y), k
    assert [r["loss"] for r in res.history] == [r["loss"] for r in ref.history]


def test_mixed_batches_use_the_cache_offline_and_the_teacher_on_policy(monkeypatch):
    """With cached slots in the data, only the on-policy micro-batches run the teacher's body."""
    from kdkernels import linear_topk
    teacher = tiny_llama(h=48, seed=1, dtype=torch.float32)
    parts = lm_parts(teacher)
    data = []
    with torch.no_grad():
        for e in ragged(6):
            top = linear_topk(parts.body(input_ids=e["input_ids"][None]).last_hidden_state[0],
                              parts.weight, 8)
            data.append(dict(e, teacher_ids=top.ids, teacher_values=top.logprobs))
    calls = []
    real = teacher.model.forward
    monkeypatch.setattr(teacher.model, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = TrainConfig(steps=4, batch_size=2, grad_accum=2, lr=3e-3, device="cpu", log_every=1,
                      on_policy_fraction=0.5, on_policy_max_new_tokens=3, on_policy_prompt_len=3)
    res = train(tiny_llama(seed=2, dtype=torch.float32), data, cfg, teacher=teacher, log=None)
    chosen = [OP.is_on_policy(0.5, 0, s, m) for s in range(4) for m in range(2)]
    assert 0 < sum(chosen) < 8
    assert len(calls) == sum(chosen)
    assert [r["on_policy_micro_batches"] for r in res.history] == [
        sum(chosen[2 * s:2 * s + 2]) for s in range(4)]


def test_on_policy_fraction_is_its_long_run_share():
    picks = [OP.is_on_policy(0.3, 0, s, m) for s in range(500) for m in range(2)]
    # 1000 Bernoulli(0.3) draws: 5 standard deviations is 72
    assert abs(sum(picks) - 300) < 72
    assert not any(OP.is_on_policy(0.0, 0, s, 0) for s in range(50))
    assert all(OP.is_on_policy(1.0, 0, s, 0) for s in range(50))


def _dist_run(world_rank, world, port, q):
    """One rank of the 2-process run (or the single process when world_rank is None)."""
    try:
        torch.set_num_threads(1)
        if world_rank is not None:
            torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                                 rank=world_rank, world_size=world)
        student = tiny_llama(seed=2 + (world_rank or 0), dtype=torch.float32)   # rank 0's wins
        teacher = tiny_llama(h=48, seed=1, dtype=torch.float32)
        cfg = TrainConfig(steps=2, batch_size=2, grad_accum=2 if world_rank is None else 1, lr=1e-2,
                          device="cpu", log_every=1, backend="torch", on_policy_fraction=0.5,
                          on_policy_max_new_tokens=4, on_policy_prompt_len=3, ce_weight=0.3)
        res = train(student, ragged(6), cfg, teacher=teacher, log=None)
        out = ([p.detach().numpy().copy() for p in student.parameters()], res.history)
        if world_rank is not None:
            torch.distributed.destroy_process_group()
        if world_rank in (None, 0):
            q.put(out)
    except BaseException as e:  # report instead of hanging the parent
        q.put(e)
        raise


def test_two_ranks_equal_one_process_with_doubled_accumulation():
    """Rank r's micro-batch m is global micro-batch m * W + r: same coin, same rollout seed."""
    import queue
    from test_distributed_harness import _free_port
    q1 = queue.Queue()
    _dist_run(None, 1, 0, q1)
    params1, hist1 = q1.get()
    assert [h["on_policy_micro_batches"] for h in hist1] == [
        sum(OP.is_on_policy(0.5, 0, s, m) for m in range(2)) for s in range(2)]
    assert 0 < sum(h["on_policy_micro_batches"] for h in hist1) < 4
    port = _free_port()
    ctx = torch.multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_dist_run, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = q.get(timeout=240)
    for p in procs:
        p.join(timeout=60)
    if isinstance(got, BaseException):
        raise got
    params2, hist2 = got
    assert [h["tokens"] for h in hist2] == [h["tokens"] for h in hist1]
    for a, b in zip(params1, params2):
        # the ranks' gradient sum adds the same partial sums as one process accumulating them
        torch.testing.assert_close(torch.from_numpy(b), torch.from_numpy(a), rtol=1e-5, atol=1e-6)
    for h1, h2 in zip(hist1, hist2):
        assert h2["loss"] == pytest.approx(h1["loss"], rel=1e-5)


@pytest.mark.parametrize("case", ["no_teacher", "vocab", "fraction", "new_tokens", "temperature",
                                  "ddk"])
def test_errors(case):
    student = tiny_llama(seed=2, dtype=torch.float32)
    teacher = tiny_llama(h=48, seed=1, dtype=torch.float32, vocab=V + 1 if case == "vocab" else V)
    data = [dict(e, domain=0) for e in ragged(2)]
    kw = dict(on_policy_fraction=0.5)
    if case == "fraction":
        kw["on_policy_fraction"] = 1.5
    if case == "new_tokens":
        kw["on_policy_max_new_tokens"] = 0
    if case == "temperature":
        kw["on_policy_temperature"] = 0.0
    if case == "ddk":
        kw["domain_reweight"] = True
    msg = {"no_teacher": "needs the live teacher", "vocab": f"has {V} rows, the teacher's {V + 1}",
           "fraction": "on_policy_fraction must be in", "new_tokens": "on_policy_max_new_tokens",
           "temperature": "on_policy_temperature", "ddk": "domain_reweight"}[case]
    err = NotImplementedError if case == "ddk" else ValueError
    with pytest.raises(err, match=re.escape(msg)):
        train(student, data, TrainConfig(steps=1, batch_size=2, device="cpu", **kw),
              teacher=None if case == "no_teacher" else teacher, log=None)


# ------------------------------------------------------------------------------------------------
# python/train_minimal.py


@pytest.mark.slow
def test_train_minimal_mixes_cached_and_on_policy_batches(tmp_path):
    from kdkernels import cache
    teacher = tiny_llama(h=48, seed=1, dtype=torch.float32)
    teacher.save_pretrained(str(tmp_path / "teacher"))
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, V, (40,), generator=g).tolist() for _ in range(6)]
    path = cache.build(teacher, docs, tmp_path / "cache", k=8, seq_len=16, progress=False)
    student_cfg = tmp_path / "student.json"
    tiny_llama(seed=2, dtype=torch.float32).config.to_json_file(str(student_cfg))
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "python" / "train_minimal.py"), "--cache", str(path),
           "--teacher", str(tmp_path / "teacher"), "--student", str(student_cfg),
           "--batch-size", "2", "--grad-accum", "2", "--steps", "4", "--save-every", "4",
           "--out", str(tmp_path / "ckpt"), "--on-policy-fraction", "0.5",
           "--on-policy-max-new-tokens", "4", "--divergence", "jsd"]
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    m = re.search(r"step 4\s+loss (\S+).*on-policy (\d+)/(\d+)", run.stdout)
    assert m, run.stdout[-2000:]
    assert 0 < float(m.group(1)) < 20 and 0 < int(m.group(2)) < int(m.group(3)) == 8
