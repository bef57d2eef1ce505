"""Check kdkernels.train.train with an FSDP2 student on this machine's devices and process group:

    torchrun --standalone --nproc_per_node=N -m kdkernels.distributed.train_check [--vocab 4099
        --hidden 64 --layers 2 --steps 3 --grad-accum 2 --batch-size 2 --k 16 --head-apart --backend auto]

Every rank builds the same random tiny Llama (seeded; needs transformers) and the same cached top-k
teacher examples of ragged lengths (so the ranks' token counts differ), and trains it on the same
global batches three ways: replicated fp32 (train()'s plain data-parallel path, gradients summed
over the ranks, equal to the single-process run: tests/test_distributed_train.py), replicated
float64 (the reference), and FSDP2 fp32 (fully_shard on every decoder layer and on the root; the
head tied and in the root group, or with --head-apart untied and sharded on its own). It fails
(exit code 1) unless

    |FSDP2 - float64| <= 2 |replicated fp32 - float64| + 32 ulp(fp32) * scale

  1. for every parameter's gradient after one step without clipping (train() leaves it in .grad;
     max norm): the three runs are at the same point, so they differ by rounding only. Without
     clipping, because clipping rescales the gradients to norm 1 and AdamW's step does not depend
     on their scale: a gradient off by a constant factor would show nowhere else;
  2. for the loss and the gradient norm (before clipping) logged at step 1 of a run of --steps
     steps that clips at 1.0 (clip_grad_norm_ on DTensor gradients);

and unless the losses and gradient norms of steps >= 2 agree with the replicated fp32 run within
--later-tol (relative, default 1e-3; measured ~1e-5), which catches a wrong normalizer, a lost
optimizer state or an unsynchronized step. Those steps are not held to the rounding bound, nor
are the parameter updates after --steps steps (reported as a relative Frobenius distance): AdamW
moves an entry whose gradient is near its eps by an amount that depends on the rounding, and later
steps carry that on, so two fp32 runs that differ only in reduction order differ by up to ~1e-3
there (as the replicated run does from float64).
Uses NCCL on cuda:LOCAL_RANK when CUDA is available, else gloo on the CPU.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch
import torch.distributed as dist

from .comm import init_torchrun


def _model(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    heads = max(args.hidden // 16, 1)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=heads,
                      num_key_value_heads=heads, max_position_embeddings=128, pad_token_id=0,
                      tie_word_embeddings=not args.head_apart, initializer_range=0.2)
    return LlamaForCausalLM(cfg).to(device)


def _data(args, n):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        length = int(torch.randint(2, 48, (1,), generator=g))
        ids = torch.randint(1, args.vocab, (length,), generator=g)
        lp, tid = torch.log_softmax(torch.randn(length, args.vocab, generator=g) * 2, -1).topk(args.k, -1)
        out.append({"input_ids": ids, "teacher_ids": tid, "teacher_values": lp})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdkernels.distributed.train_check",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=4099)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--grad-accum", type=int, default=2, help="micro-batches per rank and step")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--k", type=int, default=16, help="cached teacher slots per token")
    ap.add_argument("--later-tol", type=float, default=1e-3,
                    help="max rel. difference of steps >= 2 losses and gradient norms (docstring)")
    ap.add_argument("--backend", default="auto", help="kdkernels backend of the loss (TrainConfig.backend)")
    ap.add_argument("--head-apart", action="store_true",
                    help="untied LM head, fully_shard(model.lm_head) as its own group")
    args = ap.parse_args(argv)
    from torch.distributed.fsdp import fully_shard
    from kdkernels.train import TrainConfig, train

    device, rank, world = init_torchrun()
    data = _data(args, 4 * args.batch_size * args.grad_accum * world)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      lr=1e-2, ce_weight=0.5, device=str(device), bf16=False, log_every=1,
                      max_grad_norm=1.0, backend=None if args.backend == "auto" else args.backend)

    def run(dtype, shard, steps, clip):
        model = _model(args, device).to(dtype)
        theta0 = {k: p.detach().clone() for k, p in model.named_parameters()}
        if shard:
            for layer in model.model.layers:
                fully_shard(layer)
            if args.head_apart:
                fully_shard(model.lm_head)
            fully_shard(model)
        hist = train(model, data, replace(cfg, steps=steps, max_grad_norm=clip), log=None).history
        full = (lambda t: t.full_tensor()) if shard else (lambda t: t)
        # train() leaves the last step's (clipped) gradients in .grad
        grads = {k: full(p.grad).detach().double() for k, p in model.named_parameters()}
        updates = {k: (full(p).detach() - theta0[k]).double() for k, p in model.named_parameters()}
        return grads, updates, [(h["loss"], h.get("grad_norm")) for h in hist], hist

    eps = torch.finfo(torch.float32).eps

    def oracle(got, fp32, ref, scale):
        """(error, bound), both relative to scale: |got - ref| <= 2 |fp32 - ref| + 32 ulp * scale."""
        err, base = abs(got - ref), abs(fp32 - ref)
        return err / scale, (2 * base + 32 * eps * scale) / scale

    # 1. one step without clipping (it would rescale the gradients to norm 1 and hide a wrong
    # scale): the gradients at the same point (rounding only), per tensor, max norm
    g_r, _, l1_r, _ = run(torch.float64, False, 1, None)
    g_a, _, l1_a, _ = run(torch.float32, False, 1, None)
    g_b, _, l1_b, _ = run(torch.float32, True, 1, None)
    rows = []                                 # (what, error, bound, error of replicated fp32)
    for k, r in g_r.items():
        scale = float(r.abs().max())
        err = float((g_b[k] - r).abs().max()) / scale
        base = float((g_a[k] - r).abs().max()) / scale
        rows.append((f"grad {k}", err, 2 * base + 32 * eps, base))
    # 2. --steps steps, clipping at 1 (DTensor gradients): the logged losses and gradient norms
    # (before clipping) per step; the parameter updates are reported (module docstring)
    _, u_r, ls_r, _ = run(torch.float64, False, args.steps, 1.0)
    _, u_a, ls_a, hist = run(torch.float32, False, args.steps, 1.0)
    _, u_b, ls_b, _ = run(torch.float32, True, args.steps, 1.0)
    for i, r in enumerate(l1_r + ls_r[:1]):          # step 1: the same point, rounding only
        a, b = (l1_a + ls_a)[i], (l1_b + ls_b)[i]
        for j, what in enumerate(("loss", "grad norm")):
            if r[j] is not None:
                err, bound = oracle(b[j], a[j], r[j], abs(r[j]))
                rows.append((f"step-1 {what}", err, bound, abs(a[j] - r[j]) / abs(r[j])))
    later = []                                # steps >= 2: FSDP2 vs replicated fp32, rel.
    for i in range(1, len(ls_r)):
        for j, what in enumerate(("loss", "grad norm")):
            later.append((f"step-{i + 1} {what}", abs(ls_b[i][j] - ls_a[i][j]) / abs(ls_a[i][j])))
    bad = [row for row in rows if row[1] > row[2]] + [
        (what, err, args.later_tol) for what, err in later if err > args.later_tol]
    upd = max(float((u_b[k] - u_a[k]).norm()) / float(r.norm()) for k, r in u_r.items())
    upd_64 = max(float((u_a[k] - r).norm()) / float(r.norm()) for k, r in u_r.items())
    if rank == 0:
        print(f"kdkernels FSDP2 train check: world={world} device={device.type} V={args.vocab} "
              f"H={args.hidden} layers={args.layers} head={'apart' if args.head_apart else 'root'} "
              f"backend={args.backend} steps=1 and {args.steps}, grad_accum={args.grad_accum} "
              f"tokens/step={[h['tokens'] for h in hist]}")
        what, err, _, base = max(rows[:len(g_r)], key=lambda row: row[1] / row[2])
        print(f"  step-1 gradients vs float64 (max rel.): FSDP2 {err:.2e}, replicated fp32 {base:.2e} "
              f"(closest to its bound: {what})")
        what, err, _, base = max(rows[len(g_r):], key=lambda row: row[1] / row[2])
        print(f"  step-1 loss, grad norm vs float64:      FSDP2 {err:.2e}, replicated fp32 {base:.2e} "
              f"({what})")
        if later:
            what, err = max(later, key=lambda row: row[1])
            print(f"  steps 2..{args.steps} losses, grad norms: FSDP2 vs replicated fp32 {err:.2e} "
                  f"(<= {args.later_tol:g}; {what})")
        print(f"  updates after {args.steps} steps (rel. Frobenius): FSDP2 vs replicated fp32 {upd:.2e}, "
              f"replicated fp32 vs float64 {upd_64:.2e}")
        for what, err, bound, *_ in bad:
            print(f"  FAIL {what}: {err:.2e} > {bound:.2e}")
        print("  ok" if not bad else "  FAIL")
    dist.destroy_process_group()
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
