"""Check the vocab-parallel losses on this machine's devices and process-group backend:

    torchrun --nproc_per_node=N -m kdkernels.distributed.selfcheck [--rows 512 --hidden 256
        --vocab 32771 --k 32 --backend auto --dtype float32]

Every rank builds the same random heads (seeded), keeps its contiguous vocabulary shard (sizes
differ by one on purpose when N does not divide V), and compares the vocab-parallel loss, dh and its
dW shard with the single-process loss on the full head on its own device. Rank 0 prints one line
per loss and the exit code is 1 if any relative error exceeds --tol. Uses NCCL on cuda:LOCAL_RANK
when CUDA is available, else gloo on the CPU.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from .comm import init_torchrun


def _rel(a, b) -> float:
    if a is None and b is None:
        return 0.0
    scale = float(b.float().abs().max()) if b.numel() else 0.0
    return float((a.float() - b.float()).abs().max()) / scale if scale else 0.0


def _run(name, fn, hs, ws, shard, group):
    """(rel. error of loss, dh, dW shard) of fn(h, w, process_group=group) vs fn(h, w_full)."""
    start, size = shard
    h1, w1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    ref = fn(h1, w1, None)
    ref.backward()
    h2 = hs.clone().requires_grad_()
    w2 = ws[start:start + size].clone().requires_grad_()
    out = fn(h2, w2, group)
    out.backward()
    errs = torch.tensor([_rel(out.detach(), ref.detach()), _rel(h2.grad, h1.grad),
                         _rel(w2.grad, w1.grad[start:start + size])], dtype=torch.float64,
                        device=hs.device)
    dist.all_reduce(errs, op=dist.ReduceOp.MAX, group=group)
    return name, errs.tolist()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdkernels.distributed.selfcheck",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32771)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--backend", default="auto", help="kdkernels backend for the shard math")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--tol", type=float, default=None,
                    help="max relative error (default 1e-4 for float32, 2e-2 for bfloat16)")
    args = ap.parse_args(argv)
    import kdkernels

    device, rank, world = init_torchrun()
    dtype = getattr(torch, args.dtype)
    tol = args.tol if args.tol is not None else (1e-4 if dtype == torch.float32 else 2e-2)
    n, hdim, v = args.rows, args.hidden, args.vocab
    sizes = [v // world + (1 if r < v % world else 0) for r in range(world)]
    shard = (sum(sizes[:rank]), sizes[rank])

    g = torch.Generator(device="cpu").manual_seed(0)
    hs = torch.randn(n, hdim, generator=g).to(device, dtype)
    ws = (torch.randn(v, hdim, generator=g) * hdim ** -0.5 * 3).to(device, dtype)
    ht = torch.randn(n, hdim, generator=g).to(device, dtype)
    wt = (torch.randn(v, hdim, generator=g) * hdim ** -0.5 * 3).to(device, dtype)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    labels[::7] = -100
    with torch.no_grad():
        top = kdkernels.linear_topk(ht, wt, args.k, backend=args.backend)
    t0, t1 = shard[0], shard[0] + shard[1]
    common = dict(labels=labels, ce_weight=0.1, backend=args.backend)

    def dense(h, w, pg):
        full = pg is None
        return kdkernels.fused_linear_kd_loss(h, w, ht, wt if full else wt[t0:t1], divergence="jsd",
                                              process_group=pg, **common)

    def sparse(h, w, pg):
        return kdkernels.fused_linear_sparse_kd_loss(h, w, top.ids, top.logprobs, process_group=pg,
                                                     **common)

    def logits(h, w, pg):
        full = pg is None
        zt = ht @ (wt if full else wt[t0:t1]).T
        # logits shards: the gradient of h through h @ w.T would be a per-rank partial (summing it
        # is the tensor-parallel framework's job), so only the loss and dW are compared here
        return kdkernels.kd_loss(h.detach() @ w.T, zt, divergence="reverse_kl", process_group=pg, **common)

    group = dist.group.WORLD
    results = [_run(name, fn, hs, ws, shard, group)
               for name, fn in (("fused_linear_kd_loss jsd", dense),
                                ("fused_linear_sparse_kd_loss top-k", sparse),
                                ("kd_loss reverse_kl", logits))]
    ok = all(max(e) <= tol for _, e in results)
    if rank == 0:
        print(f"kdkernels vocab-parallel selfcheck: world={world} device={device.type} "
              f"dtype={args.dtype} N={n} H={hdim} V={v} shards={sizes}")
        for name, (e_loss, e_dh, e_dw) in results:
            flag = "ok" if max(e_loss, e_dh, e_dw) <= tol else "FAIL"
            print(f"  {name:36s} rel.err loss {e_loss:.2e}  dh {e_dh:.2e}  dW {e_dw:.2e}  {flag}")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
