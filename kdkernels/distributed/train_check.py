"""Check kdkernels.train.train with an FSDP2 student on this machine's devices and process group:

    torchrun --standalone --nproc_per_node=N -m kdkernels.distributed.train_check [--vocab 4099
        --hidden 64 --layers 2 --steps 3 --grad-accum 2 --batch-size 2 --k 16 --head-apart]

Every rank builds the same random tiny Llama (seeded; needs transformers) and the same cached top-k
teacher examples of ragged lengths (so the ranks' token counts differ), then trains it three times
on the same global batches:
  (a) replicated, fp32: train()'s plain data-parallel path (gradients summed over the ranks; equal
      to the single-process run, tests/test_distributed_train.py);
  (r) the same in float64: the reference;
  (b) FSDP2, fp32: fully_shard on every decoder layer and on the root, then train(). The head is
      tied and in the root group, or with --head-apart untied and sharded on its own.
With u = theta_end - theta_0 per parameter tensor, FSDP2 passes when
    max |u_b - u_r| <= 2 max |u_a - u_r| + 32 ulp(fp32) * max |u_r|
for every tensor, and likewise for every logged loss: FSDP2 is as close to float64 as plain fp32
data parallelism is. (AdamW divides by sqrt(v), so gradient entries that are rounding noise still
move by ~lr: fp32 runs differ from float64 by ~1e-4 of the update scale.) Rank 0 prints the worst
ratios; exit code 1 on a failure. Uses NCCL on cuda:LOCAL_RANK when CUDA is available, else gloo
on the CPU.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist


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
    ap.add_argument("--head-apart", action="store_true",
                    help="untied LM head, fully_shard(model.lm_head) as its own group")
    args = ap.parse_args(argv)
    from torch.distributed.fsdp import fully_shard
    from kdkernels.train import TrainConfig, train

    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = _data(args, 4 * args.batch_size * args.grad_accum * world)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      lr=1e-2, ce_weight=0.5, device=str(device), bf16=False, log_every=1,
                      max_grad_norm=1.0)

    def run(dtype, shard):
        model = _model(args, device).to(dtype)
        theta0 = {k: p.detach().clone() for k, p in model.named_parameters()}
        if shard:
            for layer in model.model.layers:
                fully_shard(layer)
            if args.head_apart:
                fully_shard(model.lm_head)
            fully_shard(model)
        hist = train(model, data, cfg, log=None).history
        end = {k: (p.full_tensor() if shard else p).detach() for k, p in model.named_parameters()}
        return {k: (end[k] - theta0[k]).double() for k in end}, [h["loss"] for h in hist], hist

    u_r, loss_r, _ = run(torch.float64, False)
    u_a, loss_a, hist = run(torch.float32, False)
    u_b, loss_b, _ = run(torch.float32, True)
    eps = torch.finfo(torch.float32).eps
    rows = []                                 # (name, err FSDP, err replicated fp32, bound)
    for k, r in u_r.items():
        scale = float(r.abs().max())
        err_a, err_b = float((u_a[k] - r).abs().max()), float((u_b[k] - r).abs().max())
        rows.append((k, err_b / scale, err_a / scale, (2 * err_a + 32 * eps * scale) / scale))
    for i, r in enumerate(loss_r):
        err_a, err_b = abs(loss_a[i] - r), abs(loss_b[i] - r)
        rows.append((f"loss step {i + 1}", err_b / abs(r), err_a / abs(r),
                     (2 * err_a + 32 * eps * abs(r)) / abs(r)))
    bad = [row for row in rows if row[1] > row[3]]
    if rank == 0:
        print(f"kdkernels FSDP2 train check: world={world} device={device.type} V={args.vocab} "
              f"H={args.hidden} layers={args.layers} head={'apart' if args.head_apart else 'root'} "
              f"steps={args.steps} grad_accum={args.grad_accum} "
              f"tokens/step={[h['tokens'] for h in hist]}")
        name, e_b, e_a, _ = max(rows[:len(u_r)], key=lambda row: row[1])
        print(f"  parameter updates vs float64: FSDP2 {e_b:.2e}, replicated fp32 {e_a:.2e} "
              f"(rel. to the update scale; worst: {name})")
        name, e_b, e_a, _ = max(rows[len(u_r):], key=lambda row: row[1])
        print(f"  logged losses vs float64:     FSDP2 {e_b:.2e}, replicated fp32 {e_a:.2e}")
        for name, e_b, e_a, bound in bad:
            print(f"  FAIL {name}: {e_b:.2e} > {bound:.2e}")
        print("  ok" if not bad else "  FAIL")
    dist.destroy_process_group()
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
