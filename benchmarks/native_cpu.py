"""CPU benchmark of the native backend's kd_loss against naive PyTorch (issue 7's CPU figure).

    naive : F.kl_div(F.log_softmax(student), F.log_softmax(teacher), log_target=True, "batchmean")
            -- materializes two (N, V) log-softmax tensors and the (N, V) elementwise KL
    native: kdkernels.kd_loss(..., backend="native") -- the CPU build (C++/OpenMP), O(N) extra memory

Default shape: N=2048, V=50257, fp32, forward KL, T=1. Prints one row per provider and phase (median,
p20, p80 over --repeat runs after one warm-up) and the speed ratio naive / native.

    python benchmarks/native_cpu.py [--rows 2048] [--vocab 50257] [--repeat 5] [--csv out.csv]

With --gpu (needs a CUDA device) it instead times issue 7's GPU target: the native sparse-teacher
fused KD forward+backward (bf16, N=16384, H=4096, V=128256, k=64 unless --rows/--hidden/--vocab/-k
say otherwise) against the 3 bare GEMMs it cannot avoid (h W^T, g W, g^T h), ratio printed (target
<= 1.25x), plus the peak memory.
"""
from __future__ import annotations

import argparse
import csv
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kdkernels  # noqa: E402


def naive(zs, zt):
    return F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), log_target=True, reduction="batchmean")


def native(zs, zt):
    return kdkernels.kd_loss(zs, zt, backend="native")


def timed(fn, zs, zt, backward: bool, repeat: int):
    times = []
    for i in range(repeat + 1):
        x = zs.detach().requires_grad_(backward)
        t0 = time.perf_counter()
        loss = fn(x, zt)
        if backward:
            loss.backward()
        dt = time.perf_counter() - t0
        if i:  # the first run is the warm-up
            times.append(dt)
        del loss, x
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
    return statistics.median(times), q(0.2), q(0.8)


def gpu_sparse(a) -> None:
    """Native sparse KD fwd+bwd vs the 3 bare GEMMs, CUDA events, median of --repeat."""
    dev = torch.device("cuda")
    n, h, v, k = a.rows, a.hidden, a.vocab, a.k
    g = torch.Generator(device=dev).manual_seed(0)
    hid = (torch.randn(n, h, device=dev, generator=g)).to(torch.bfloat16)
    w = (torch.randn(v, h, device=dev, generator=g) / h ** 0.5).to(torch.bfloat16)
    ids = torch.randint(0, v, (n, k), device=dev, generator=g)
    ids = torch.sort(ids, 1).values
    ids = torch.where(torch.cat([torch.ones_like(ids[:, :1], dtype=torch.bool), ids[:, 1:] != ids[:, :-1]], 1),
                      ids, -1)
    vals = torch.where(ids >= 0, torch.full(ids.shape, -7.0, device=dev), 0.0)

    def fused():
        x, ww = hid.detach().requires_grad_(), w.detach().requires_grad_()
        kdkernels.fused_linear_sparse_kd_loss(x, ww, ids, vals, backend="native").backward()

    def gemms():
        z = hid @ w.T
        _ = z @ w
        _ = z.T @ hid

    def bench(fn):
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(a.repeat):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        return statistics.median(ts)

    import os
    os.environ.setdefault("KDKERNELS_CHECK_VALUES", "0")  # no host syncs from argument checks
    torch.cuda.reset_peak_memory_stats()
    t_fused = bench(fused)
    peak = torch.cuda.max_memory_allocated() / 2**30
    t_gemm = bench(gemms)
    print(f"gpu={torch.cuda.get_device_name()} N={n} H={h} V={v} k={k} bf16 torch={torch.__version__}")
    print(f"native sparse KD fwd+bwd {t_fused:.1f} ms, 3 bare GEMMs {t_gemm:.1f} ms, "
          f"ratio {t_fused / t_gemm:.2f}x (target <= 1.25x), peak {peak:.2f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--csv", type=str, default=None)
    ap.add_argument("--gpu", action="store_true", help="time the GPU sparse-teacher target instead")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("-k", type=int, default=64)
    a = ap.parse_args()
    if a.gpu:
        if a.rows == 2048 and a.vocab == 50257:
            a.rows, a.vocab = 16384, 128256
        return gpu_sparse(a)

    g = torch.Generator().manual_seed(0)
    zs = torch.randn(a.rows, a.vocab, generator=g) * 3
    zt = 0.6 * zs + 2.4 * torch.randn(a.rows, a.vocab, generator=g)
    native(zs[:2], zt[:2])  # builds or loads the extension outside the timing

    ref = naive(zs.double(), zt.double()).item() if a.rows * a.vocab <= 2**27 else None
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent).stdout.strip() or "?"
    meta = dict(rows=a.rows, vocab=a.vocab, dtype="float32", threads=torch.get_num_threads(),
                cpu=platform.processor() or platform.machine(), torch=torch.__version__, git=sha)
    print(" ".join(f"{k}={v}" for k, v in meta.items()))
    out = []
    for phase, bwd in (("forward", False), ("forward+backward", True)):
        res = {}
        for name, fn in (("naive", naive), ("native", native)):
            med, p20, p80 = timed(fn, zs, zt, bwd, a.repeat)
            res[name] = med
            out.append(dict(meta, provider=name, phase=phase, median_s=med, p20_s=p20, p80_s=p80))
            print(f"{phase:17s} {name:7s} median {med * 1e3:8.1f} ms  (p20 {p20 * 1e3:.1f}, p80 {p80 * 1e3:.1f})")
        print(f"{phase:17s} speed-up naive/native = {res['naive'] / res['native']:.2f}x")
    l_nat, l_naive = native(zs, zt).item(), naive(zs, zt).item()
    print(f"loss native {l_nat:.6f}  naive {l_naive:.6f}" + (f"  float64 {ref:.6f}" if ref else ""))
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(out[0]))
            w.writeheader()
            w.writerows(out)


if __name__ == "__main__":
    main()
