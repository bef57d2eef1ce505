"""CPU benchmark of the native backend's kd_loss against naive PyTorch (issue 7's CPU figure).

    naive : F.kl_div(F.log_softmax(student), F.log_softmax(teacher), log_target=True, "batchmean")
            -- materializes two (N, V) log-softmax tensors and the (N, V) elementwise KL
    native: kdkernels.kd_loss(..., backend="native") -- the CPU build (C++/OpenMP), O(N) extra memory

Default shape: N=2048, V=50257, fp32, forward KL, T=1. Prints one row per provider and phase (median,
p20, p80 over --repeat runs after one warm-up) and the speed ratio naive / native.

    python benchmarks/native_cpu.py [--rows 2048] [--vocab 50257] [--repeat 5] [--csv out.csv]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--csv", type=str, default=None)
    a = ap.parse_args()

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
