"""LoRA students (kdkernels.train.lora) through kdkernels.train: only the adapters train, the base
and the LM head stay frozen, the fused loss never forms a (V, H) weight gradient, the adapter is
saved atomically and reloads into a fresh base, and a LoRA run resumes exactly."""
from __future__ import annotations

import math
import sys

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import kdkernels.backends.torch as torch_backend  # noqa: E402
from kdkernels.train import TrainConfig, final_hidden, lm_parts, train, wrap_lora  # noqa: E402
from kdkernels.train.lora import LLAMA_TARGETS, trainable_summary  # noqa: E402

V, H = 301, 32


def tiny_llama(h=H, layers=2, seed=0, init=0.2):
    # init 0.2 (not HF's 0.02): the frozen head then spans logits of a few nats, like a trained model's
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, initializer_range=init)
    return LlamaForCausalLM(cfg)


def fine_tuned_teacher(seed=2, noise=0.1):
    """The student's base with perturbed decoder-layer matrices: the situation LoRA is for (same
    embeddings and head, a body the adapters can move toward the teacher's)."""
    teacher = tiny_llama(seed=seed)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in teacher.model.layers.parameters():
            if p.dim() == 2:
                p.add_(noise * torch.randn(p.shape, generator=g))
    return teacher


def lora_student(seed=2, lora_seed=5, **kw):
    base = tiny_llama(seed=seed)
    torch.manual_seed(lora_seed)              # the adapters' A matrices are drawn at wrap time
    return wrap_lora(base, **kw)


def data(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = [12, 7, 15, 9, 14, 5, 11, 13][:n]     # < 16: a 2-sequence block has fewer rows than H
    return [{"input_ids": torch.randint(1, V, (length,), generator=g)} for length in lengths]


def cfg(**kw):
    base = dict(steps=6, batch_size=3, grad_accum=2, lr=2e-2, log_every=1, device="cpu",
                backend="torch", ce_weight=0.1, max_grad_norm=None)
    base.update(kw)
    return TrainConfig(**base)


def is_lora(name):
    return ".lora_A." in name or ".lora_B." in name


def test_wrap_lora_adapts_projections_and_freezes_the_head():
    base = tiny_llama(seed=2)
    ids = data(1)[0]["input_ids"][None]
    with torch.no_grad():
        want = base(input_ids=ids).logits
    model = lora_student(rank=4, alpha=8)
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(LLAMA_TARGETS)
    head = model.get_output_embeddings()
    assert type(head) is torch.nn.Linear and not head.weight.requires_grad   # never a LoRA layer
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_lora(n) for n in trainable)
    # 2 layers x r * (in + out) summed over q, k, v, o (32->32) and gate, up, down (32<->64)
    assert trainable_summary(model)["trainable"] == 2 * 4 * (4 * 64 + 3 * 96)
    parts = lm_parts(model)
    assert parts.weight is head.weight
    with torch.no_grad():            # B = 0 at start: the student is exactly its base model
        torch.testing.assert_close(final_hidden(parts, ids) @ parts.weight.T, want, rtol=0, atol=0)
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
        got = final_hidden(parts, ids) @ parts.weight.T   # the body lm_parts finds runs the adapters
        torch.testing.assert_close(got, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert (got - want).abs().max() > 1e-3


def test_the_head_is_never_a_lora_target():
    with pytest.raises(ValueError, match="LM head"):
        wrap_lora(tiny_llama(), target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="LM head"):
        wrap_lora(tiny_llama(), target_modules=".*")            # a regex that matches the head too
    # a PEFT model built by hand with an adapted head: lm_parts refuses it (the loop uses the
    # head's weight, so the adapter would be silently ignored)
    by_hand = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(NotImplementedError, match="LM head"):
        lm_parts(by_hand)


def test_missing_peft_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)      # `import peft` raises ImportError
    with pytest.raises(ImportError, match="pip install peft"):
        wrap_lora(tiny_llama())
    assert lm_parts(tiny_llama()).weight.shape == (V, H)  # plain students need no peft


class AllocationRecorder(TorchDispatchMode):
    """Shapes of the tensors every aten op allocates (outputs whose storage is none of its inputs':
    views such as W.T are not allocations)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in flat_in if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.shapes.append(tuple(t.shape))
        return out


def _vh(shapes):
    # (V, H) or (H, V); the loss's (rows, V) blocks never match, as every batch here has < H rows
    return [s for s in shapes if sorted(s) == sorted((V, H))]


def _record_need(monkeypatch):
    """(need, which gradients came back) of every gradient call: the backward pieces, or the fused
    pieces a scalar training loss takes (their first output is the loss)."""
    seen = []
    for name in ("linear_kd_backward", "linear_sparse_kd_backward", "linear_kd_fused",
                 "linear_sparse_kd_fused"):
        real = getattr(torch_backend, name)
        skip = 1 if name.endswith("_fused") else 0

        def wrapped(*args, _real=real, _skip=skip):
            out = _real(*args)
            seen.append((args[-1], tuple(g is not None for g in out[_skip:])))
            return out
        monkeypatch.setattr(torch_backend, name, wrapped)
    return seen


@pytest.mark.parametrize("teacher_kind", ["live", "ce_only"])
def test_frozen_head_weight_gradient_is_never_allocated(monkeypatch, teacher_kind):
    """End to end through train(): with a LoRA student no (V, H) tensor is allocated during the
    steps (no head dW, no embedding dW, no optimizer state for them), the backend is asked for dh
    only, the adapters get gradients and the base weights none. The same recorder sees the (V, H)
    gradients and AdamW states of a fully trained student (the control)."""
    teacher = tiny_llama(h=48, seed=1) if teacher_kind == "live" else None
    kw = dict(kd_weight=0.0, ce_weight=1.0) if teacher is None else {}
    seen = _record_need(monkeypatch)
    runs = {}
    for kind in ("full", "lora"):
        student = tiny_llama(seed=2) if kind == "full" else lora_student()
        rec = AllocationRecorder()
        with rec:
            res = train(student, data(4), cfg(steps=2, batch_size=2, **kw), teacher=teacher, log=None)
        assert all(math.isfinite(r["loss"]) for r in res.history)
        runs[kind] = (student, rec.shapes, list(seen))
        seen.clear()
    full_shapes, full_need = runs["full"][1], runs["full"][2]
    assert len(_vh(full_shapes)) >= 2 * 2       # per step at least: head dW, embedding dW (control)
    assert full_need and all(need == (True, True, False) for need, _ in full_need)
    student, shapes, need = runs["lora"]
    assert _vh(shapes) == [], f"(V, H) allocations with a frozen head: {_vh(shapes)}"
    assert len(need) == 4                       # 2 steps x 2 micro-batches, each dh only
    assert all(n == (True, False, False) and got == (True, False, False) for n, got in need)
    for name, p in student.named_parameters():
        if is_lora(name):
            assert p.grad is not None, name
            if ".lora_B." in name or teacher is not None:
                assert p.grad.abs().max() > 0, name
        else:
            assert p.grad is None, name


def test_lora_student_learns_saves_and_reloads(tmp_path):
    teacher = fine_tuned_teacher()
    student = lora_student(rank=8, alpha=16)
    base_before = {n: p.detach().clone() for n, p in student.named_parameters() if not is_lora(n)}
    # 3 x 2 sequences per step = the whole data set: every step sees the same batch, so the loss of
    # an untrained student would stay at losses[0] (it does with lr=0)
    res = train(student, data(6), cfg(steps=8, lr=1e-2, ce_weight=0.0, save_every=3,
                                      out_dir=str(tmp_path)), teacher=teacher, log=None)
    losses = [r["loss"] for r in res.history]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.5 * losses[0], losses
    for n, p in student.named_parameters():      # the base (head included) never moved
        if not is_lora(n):
            assert torch.equal(p, base_before[n]), n
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_config.json").exists()
    assert not (tmp_path / "adapter.tmp").exists() and not (tmp_path / "adapter.old").exists()
    fresh = tiny_llama(seed=2)
    ids = torch.stack([d["input_ids"][:5] for d in data(3)])
    with torch.no_grad():
        plain = fresh(input_ids=ids).logits
        reloaded = peft.PeftModel.from_pretrained(fresh, str(adapter)).eval()
        want = student.eval()(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want, rtol=0, atol=0)
        assert (want - plain).abs().max() > 1e-2     # the adapter carries what was learned


def test_lora_resume_reproduces_an_uninterrupted_run(tmp_path):
    teacher = fine_tuned_teacher()
    kw = dict(steps=5, warmup_steps=2, lr=1e-2)
    full = lora_student()
    res_full = train(full, data(6), cfg(out_dir=str(tmp_path / "a"), **kw), teacher=teacher, log=None)

    class Crash(Exception):
        pass

    def crash_at_4(rec):
        if rec["step"] == 4:
            raise Crash
    with pytest.raises(Crash):
        train(lora_student(), data(6), cfg(out_dir=str(tmp_path / "b"), save_every=3, **kw),
              teacher=teacher, log=crash_at_4)
    resumed = lora_student(seed=98, lora_seed=99)     # everything must come from the checkpoint
    res = train(resumed, data(6), cfg(out_dir=str(tmp_path / "b"), save_every=3, **kw),
                teacher=teacher, log=None)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert [r["loss"] for r in res.history] == [r["loss"] for r in res_full.history]
    a = peft.load_peft_weights(str(tmp_path / "a" / "adapter"))
    b = peft.load_peft_weights(str(tmp_path / "b" / "adapter"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow     # two subprocesses that import transformers and peft: ~20 s
def test_train_minimal_lora_flags(tmp_path):
    """python/train_minimal.py --lora-rank: only the adapters train, the adapter is saved next to
    the checkpoint, and a second run resumes from it."""
    import re
    import subprocess
    from pathlib import Path

    from kdkernels import cache
    root = Path(__file__).resolve().parents[1]
    teacher = tiny_llama(seed=1).eval()
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, V, (30,), generator=g).tolist() for _ in range(4)]
    path = cache.build(teacher, docs, tmp_path / "cache", k=8, seq_len=12, progress=False)
    student_cfg = tmp_path / "student.json"
    teacher.config.to_json_file(str(student_cfg))
    cmd = [sys.executable, str(root / "python" / "train_minimal.py"), "--cache", str(path),
           "--student", str(student_cfg), "--batch-size", "2", "--out", str(tmp_path / "out"),
           "--save-every", "2", "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "q_proj",
           "v_proj"]
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd + ["--steps", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    config = (tmp_path / "out" / "adapter" / "adapter_config.json").read_text()
    assert '"r": 4' in config and "q_proj" in config and "lm_head" not in config
    state = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)
    n_opt = len(state["optimizer"]["state"])                    # AdamW state for the adapters only
    assert n_opt == 2 * 2 * 2                                   # 2 layers x (q, v) x (A, B)
    second = subprocess.run(cmd + ["--steps", "3"], capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed at step 2" in second.stdout and re.search(r"step 3\s+loss", second.stdout)


def test_kdtrainer_trains_only_the_adapters(tmp_path, monkeypatch):
    """kdkernels.hf.KDTrainer with a LoRA student: the adapters move, the base does not, and the
    LM head's forward is never called."""
    pytest.importorskip("accelerate")
    from transformers import TrainingArguments

    from kdkernels.hf import KDTrainer, kd_collator
    teacher, student = fine_tuned_teacher(), lora_student()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}

    def boom(*a, **k):
        raise AssertionError("the full logits were computed")
    monkeypatch.setattr(student.get_output_embeddings(), "forward", boom)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             dataloader_num_workers=0, seed=0, disable_tqdm=True,
                             remove_unused_columns=False)
    trainer = KDTrainer(model=student, args=args, train_dataset=data(4), data_collator=kd_collator(),
                        teacher=teacher, backend="torch")
    assert math.isfinite(trainer.train().training_loss)
    for n, p in student.named_parameters():
        moved = not torch.equal(p.detach(), before[n])
        assert moved == (".lora_B." in n or ".lora_A." in n), n
