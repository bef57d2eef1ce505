"""Minimal distillation training loop with the fused losses (read it top to bottom).

    # 1. cache the teacher once          (kdkernels cache build --help)
    # 2. distill a student from it:
    python python/train_minimal.py --cache my-cache --student path/or/config.json --steps 1000
    # or with a live teacher instead of a cache:
    python python/train_minimal.py --teacher path/to/teacher --data docs.txt --student ...
    # a LoRA student (docs/lora.md): add --lora-rank 8 [--lora-alpha 16 --lora-targets q_proj v_proj]
    # on-policy batches (docs/onpolicy.md): add --teacher t --on-policy-fraction 0.5 [--divergence jsd]

The student's full logits are never computed: the body gives the final hidden states and the fused
loss multiplies them by the LM head's weight block by block. `kdkernels.train.train` is the same
loop with DDK and more options; this file keeps only the essentials.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import kdkernels
from kdkernels.train import collate, lm_parts, final_hidden, save_adapter
from kdkernels.train import onpolicy


def load_student(spec: str):
    """A local model directory, or a config.json to build a fresh student from."""
    from transformers import AutoConfig, AutoModelForCausalLM
    p = Path(spec)
    if p.suffix == ".json":
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(p)))
    return AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)


def kd_loss(student, batch, teacher, args, normalizer):
    """sum over counted tokens of [kd * T^2 * KL(p_teacher || q_student) + ce * CE] / normalizer."""
    s = lm_parts(student)
    h = final_hidden(s, batch["input_ids"], batch["attention_mask"])        # (B, L, H)
    w = s.weight if s.weight.dtype == h.dtype else s.weight.to(h.dtype)     # bf16 under autocast
    common = dict(labels=batch["labels"], temperature=args.temperature, ce_weight=args.ce_weight,
                  kd_weight=args.kd_weight, normalizer=normalizer)
    if "teacher_ids" in batch:               # cached teacher: k (id, log-prob) slots per token
        return kdkernels.fused_linear_sparse_kd_loss(h, w, batch["teacher_ids"], batch["teacher_values"],
                                                     values=args.values, **common)
    t = lm_parts(teacher)                    # live teacher: its hidden states, no grad
    with torch.no_grad():
        ht = final_hidden(t, batch["input_ids"], batch["attention_mask"])
    return kdkernels.fused_linear_kd_loss(h, w, ht, t.weight.to(ht.dtype), **common)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", required=True, help="model directory or config.json")
    ap.add_argument("--cache", help="a kdkernels teacher cache directory")
    ap.add_argument("--teacher", help="a teacher model directory: the live teacher (of every batch "
                    "without --cache, of the on-policy batches with it)")
    ap.add_argument("--data", nargs="*", help="text files (with --teacher)")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: --teacher)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--kd-weight", type=float, default=1.0)
    ap.add_argument("--ce-weight", type=float, default=0.0)
    ap.add_argument("--out", default="student-ckpt")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--on-policy-fraction", type=float, default=0.0,
                    help="share of micro-batches that are student continuations scored by --teacher")
    ap.add_argument("--on-policy-max-new-tokens", type=int, default=32)
    ap.add_argument("--divergence", default="reverse_kl", help="of the on-policy batches: reverse_kl, "
                    "jsd (beta 0.5), forward_kl, ...; the offline batches use forward KL")
    ap.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0: train every weight)")
    ap.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale is alpha / rank")
    ap.add_argument("--lora-targets", nargs="*", help="module names (default: Llama projections)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    # ---- data: cache reader items, or tokenized text with a live teacher -------------------------
    teacher, args.values = None, "logprobs"
    if args.on_policy_fraction > 0 and not args.teacher:
        ap.error("--on-policy-fraction needs --teacher (it scores the student's samples)")
    if args.teacher:
        from transformers import AutoModelForCausalLM
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher).to(device).eval().requires_grad_(False)
    if args.cache:
        from kdkernels import cache
        reader = cache.open(args.cache)
        data = [reader[i] for i in range(len(reader))]
        args.values, args.temperature = reader.values, reader.temperature   # must match the cache
    else:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(args.tokenizer or args.teacher)
        ids = [t for f in args.data for t in tok(Path(f).read_text())["input_ids"] + [tok.eos_token_id]]
        data = [{"input_ids": torch.tensor(ids[i:i + args.seq_len])}
                for i in range(0, len(ids) - 1, args.seq_len)]

    # ---- model, optimizer, resume ----------------------------------------------------------------
    student = load_student(args.student).to(device).train()
    if args.lora_rank:   # only the adapters train; the base and the LM head stay frozen (no head dW)
        from kdkernels.train.lora import wrap_lora
        student = wrap_lora(student, rank=args.lora_rank, alpha=args.lora_alpha,
                            target_modules=args.lora_targets or None)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step, ckpt = 0, Path(args.out) / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"resumed at step {step}")

    if args.on_policy_fraction > 0:   # the teacher must score the ids the student samples
        onpolicy.check_teacher(lm_parts(student), lm_parts(teacher))

    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    t0, tokens, on_micro, all_micro = time.perf_counter(), 0, 0, 0
    while step < args.steps:
        # the examples of this step are a function of the step number: resuming needs no sampler state
        g = torch.Generator().manual_seed(step)
        micro = [collate([data[int(i)] for i in torch.randint(len(data), (args.batch_size,), generator=g)])
                 for _ in range(args.grad_accum)]
        # on-policy: a micro-batch chosen by a seeded coin becomes the student's own continuation of
        # its first 32 tokens, scored by the live teacher on the generated positions only
        for m in range(len(micro)):
            if onpolicy.is_on_policy(args.on_policy_fraction, 0, step, m):
                prompts = onpolicy.prompts_from(micro[m], 32).to(device)
                with torch.autocast(**autocast):
                    micro[m] = onpolicy.rollout(lm_parts(student), prompts, args.on_policy_max_new_tokens,
                                                generator=onpolicy.rollout_generator(0, step, m, device),
                                                eos_token_id=onpolicy.eos_ids(student))
                on_micro += 1
        all_micro += len(micro)
        # global normalizer: counted tokens of ALL micro-batches, so accumulation = one big batch
        n = sum(int((b["labels"] != -100).sum()) for b in micro)
        normalizer = torch.tensor(float(max(n, 1)), device=device)
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for b in micro:
            b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
            with torch.autocast(**autocast):
                if b.get("on_policy", False):
                    loss = onpolicy.on_policy_loss(lm_parts(student), lm_parts(teacher), b,
                                                   divergence=args.divergence, temperature=args.temperature,
                                                   kd_weight=args.kd_weight, normalizer=normalizer)
                else:
                    loss = kd_loss(student, b, teacher, args, normalizer)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:   # cosine decay to 10%
            group["lr"] = args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / args.steps)))
        opt.step()
        step, tokens = step + 1, tokens + n
        if step % 10 == 0 or step == args.steps:
            dt = time.perf_counter() - t0
            mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            on = f"  on-policy {on_micro}/{all_micro}" if args.on_policy_fraction > 0 else ""
            print(f"step {step}  loss {float(total):.4f}  {tokens / dt:.0f} tok/s  peak {mem:.2f} GiB{on}")
            t0, tokens, on_micro, all_micro = time.perf_counter(), 0, 0, 0
        if step % args.save_every == 0 or step == args.steps:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            torch.save({"model": student.state_dict(), "optimizer": opt.state_dict(), "step": step},
                       ckpt)
            save_adapter(student, args.out)      # LoRA student: --out/adapter (PeftModel.from_pretrained)


if __name__ == "__main__":
    main()
