"""GPU benchmark of the triton backend (issue 3): time and peak memory of every provider, side by side.

Ops (loss forward + backward unless noted), bf16 by default, shapes of issue 3
(N=16384 rows, H=4096, V=128256, k=64; --quick: N=4096, H=2048, V=32000):

  sparse  fused_linear_sparse_kd_loss, cached top-k teacher, forward KL, tail="bucket"
  dense   fused_linear_kd_loss, online teacher head (H_t = H), JSD beta=0.5 (Liger's loss)
  kd      kd_loss on materialized logits, forward KL
  topk    linear_topk (inference, no backward)
  sample  linear_sample with 64 draws (inference)

Providers: naive (materialized logits, fp32 softmax math), compile (torch.compile of naive),
torch / triton / native (kdkernels backends, native when it can run on CUDA), liger
(LigerFusedLinearJSD, dense only, when importable), gemm (the bare cuBLAS GEMMs of the op: the floor;
sparse 3 GEMMs, dense 4, topk/sample 1; for kd the floor is reading both logits and writing the
gradient once at the device's measured copy bandwidth).

Every row: median / p20 / p80 milliseconds over --repeat runs after --warmup runs (CUDA events),
peak memory above the inputs (torch.cuda.max_memory_allocated), the ratio to the floor, GPU name,
torch / triton / CUDA versions and git SHA. Writes results.csv and results.md under
benchmarks/results/<gpu>-<date>/ (or --out) and prints the Markdown table.

    python benchmarks/gpu_kernels.py [--quick] [--ops sparse,dense,kd,topk,sample]
                                     [--providers naive,compile,torch,triton,native,liger,gemm]
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import re
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
OPS = ("sparse", "dense", "kd", "topk", "sample")
PROVIDERS = ("naive", "compile", "torch", "triton", "native", "liger", "gemm")
FULL = dict(rows=16384, hidden=4096, vocab=128256, k=64)
QUICK = dict(rows=4096, hidden=2048, vocab=32000, k=64)
DRAWS = 64

# issue 3's targets: (op, ratio to the floor or to a provider, limit)
TARGETS = {
    "sparse": "triton <= 1.3 x gemm (3 GEMMs); peak extra memory <= 5% of the bf16 logits",
    "dense": "triton >= 2 x faster than liger, peak memory <= 1/5 of liger's",
    "topk": "triton <= 1.15 x gemm (1 GEMM)",
}


# ------------------------------------------------------------------------------------------------
# pure-Python parts (tested on CPU in tests/test_triton_benchmark.py)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller shapes (N=4096, H=2048, V=32000)")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--ops", type=_names(OPS), default=OPS)
    ap.add_argument("--providers", type=_names(PROVIDERS), default=PROVIDERS)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=None, help="timed runs (default 10, --quick 5)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default "
                    "benchmarks/results/<gpu>-<date>)")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else FULL
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeat is None:
        args.repeat = 5 if args.quick else 10
    return args


def _names(allowed):
    def parse(text: str) -> tuple:
        names = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in names if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(allowed)}")
        return names
    return parse


def summarize(times_ms: list) -> tuple[float, float, float]:
    """(median, p20, p80) of a list of times (nearest-rank percentiles)."""
    if not times_ms:
        return (math.nan, math.nan, math.nan)
    s = sorted(times_ms)
    rank = lambda f: s[min(len(s) - 1, max(0, math.ceil(f * len(s)) - 1))]
    return statistics.median(s), rank(0.2), rank(0.8)


@dataclass
class Row:
    op: str
    provider: str
    shape: str
    dtype: str
    median_ms: float = math.nan
    p20_ms: float = math.nan
    p80_ms: float = math.nan
    peak_mib: float = math.nan
    extra_mib: float = math.nan     # peak minus the gradient outputs (issue 3's "extra memory")
    vs_floor: float = math.nan
    note: str = ""
    meta: dict = field(default_factory=dict)


def add_floor_ratios(rows: list) -> None:
    """vs_floor = median / the op's gemm-provider median (when measured)."""
    floors = {r.op: r.median_ms for r in rows if r.provider == "gemm" and not math.isnan(r.median_ms)}
    for r in rows:
        if r.op in floors and not math.isnan(r.median_ms):
            r.vs_floor = r.median_ms / floors[r.op]


def markdown(rows: list, meta: dict) -> str:
    head = ["op", "provider", "shape", "dtype", "median ms", "p20 ms", "p80 ms", "peak MiB", "extra MiB",
            "x floor", "note"]
    lines = [f"# kdkernels GPU benchmark: {meta.get('gpu', '?')}", "",
             " | ".join(f"{k}: {v}" for k, v in meta.items()), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda x, d=2: "" if isinstance(x, float) and math.isnan(x) else f"{x:.{d}f}"
    for r in rows:
        lines.append("| " + " | ".join([r.op, r.provider, r.shape, r.dtype, fmt(r.median_ms), fmt(r.p20_ms),
                                         fmt(r.p80_ms), fmt(r.peak_mib, 0), fmt(r.extra_mib, 0), fmt(r.vs_floor),
                                         r.note]) + " |")
    lines += ["", "peak: allocated above the inputs during the timed runs; extra: peak minus the "
              "gradient outputs; x floor: median / the gemm row of the same op.",
              "", "Targets (issue 3):"] + [f"- {op}: {t}" for op, t in TARGETS.items()]
    return "\n".join(lines) + "\n"


def write_results(rows: list, meta: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "results.csv", out / "results.md"
    fields = [k for k in asdict(rows[0]) if k != "meta"] + list(meta) if rows else list(meta)
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            d = {k: v for k, v in asdict(r).items() if k != "meta"}
            d.update(meta)
            w.writerow(d)
    md_path.write_text(markdown(rows, meta))
    return csv_path, md_path


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "gpu"


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------
# GPU parts


def _time(fn: Callable[[], object], warmup: int, repeat: int):
    """CUDA-event times (ms) of fn() and its peak memory above what was allocated before (MiB)."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return times, peak


class Inputs:
    """Hidden states and heads scaled like a trained model's: logits of std ~2.5, a teacher
    correlated with the student, its top-k cache and labels."""

    def __init__(self, args, dtype):
        import torch
        g = torch.Generator(device="cuda").manual_seed(0)
        n, h, v, k = args.rows, args.hidden, args.vocab, args.k
        std = 2.5 / math.sqrt(h)
        self.hs = torch.randn(n, h, device="cuda", generator=g).to(dtype)
        self.ws = (torch.randn(v, h, device="cuda", generator=g) * std).to(dtype)
        self.ht = (0.8 * self.hs.float() + 0.6 * torch.randn(n, h, device="cuda", generator=g)).to(dtype)
        self.wt = (0.8 * self.ws.float() + 0.6 * std * torch.randn(v, h, device="cuda", generator=g)).to(dtype)
        self.labels = torch.randint(0, v, (n,), device="cuda", generator=g)
        ids, lps = [], []
        for r in range(0, n, 1024):          # the teacher cache, 1024 rows of logits at a time
            lp = torch.log_softmax((self.ht[r:r + 1024] @ self.wt.T).float(), -1)
            top = lp.topk(k, -1)
            ids.append(top.indices)
            lps.append(top.values)
        self.ids, self.vals = torch.cat(ids), torch.cat(lps)
        self.n, self.h, self.v, self.k = n, h, v, k


def _naive_sparse(hs, ws, ids, vals):
    import torch
    lq = torch.log_softmax((hs @ ws.T).float(), -1)
    lqk = lq.gather(1, ids)
    p = vals.exp()
    lP = torch.log1p(-p.sum(1).clamp_max(1 - 1e-6))
    lQ = torch.log1p(-lqk.exp().sum(1).clamp_max(1 - 1e-6))
    d = (p * (vals - lqk)).sum(1) + lP.exp() * (lP - lQ)
    return d.mean()


def _naive_dense_jsd(hs, ws, ht, wt, beta=0.5):
    import torch
    lq = torch.log_softmax((hs @ ws.T).float(), -1)
    lp = torch.log_softmax((ht @ wt.T).float(), -1)
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log(1 - beta))
    d = beta * (lp.exp() * (lp - lm)).sum(1) + (1 - beta) * (lq.exp() * (lq - lm)).sum(1)
    return d.mean()


def _naive_kd(zs, zt):
    import torch
    lq, lp = torch.log_softmax(zs.float(), -1), torch.log_softmax(zt.float(), -1)
    return (lp.exp() * (lp - lq)).sum(1).mean()


def _loss_step(loss_fn, leaves):
    def run():
        for t in leaves:
            t.grad = None
        loss_fn().backward()
    return run


def bench_op(op: str, args, x: Inputs, dtype, providers) -> list:
    import torch
    import kdkernels
    shape = f"N={x.n} H={x.h} V={x.v}" + (f" k={x.k}" if op == "sparse" else "")
    rows = []
    hs = x.hs.clone().requires_grad_(True)
    ws = x.ws.clone().requires_grad_(True)
    leaves = (hs, ws)
    zs = zt = None
    if op == "kd":
        with torch.no_grad():
            zs = (x.hs[: x.n // 4] @ x.ws.T).requires_grad_(True)
            zt = x.ht[: x.n // 4] @ x.wt.T
        shape = f"N={x.n // 4} V={x.v}"
    backends = [b for b in ("torch", "triton", "native") if b in providers]
    runnable = set(kdkernels.available_backends("cuda"))

    def fns():
        if op == "sparse":
            yield "naive", _loss_step(lambda: _naive_sparse(hs, ws, x.ids, x.vals), leaves)
            yield "compile", _loss_step(lambda: _compiled(_naive_sparse)(hs, ws, x.ids, x.vals), leaves)
            for b in backends:
                yield b, _loss_step(lambda b=b: kdkernels.fused_linear_sparse_kd_loss(
                    hs, ws, x.ids, x.vals, backend=b), leaves)
            g = torch.empty(x.n, x.v, dtype=dtype, device="cuda")
            yield "gemm", lambda: (hs.detach() @ ws.detach().T, g @ ws.detach(), g.T @ hs.detach())
        elif op == "dense":
            yield "naive", _loss_step(lambda: _naive_dense_jsd(hs, ws, x.ht, x.wt), leaves)
            yield "compile", _loss_step(lambda: _compiled(_naive_dense_jsd)(hs, ws, x.ht, x.wt), leaves)
            for b in backends:
                yield b, _loss_step(lambda b=b: kdkernels.fused_linear_kd_loss(
                    hs, ws, x.ht, x.wt, divergence="jsd", beta=0.5, backend=b), leaves)
            liger = _liger()
            if liger is not None:
                yield "liger", _loss_step(lambda: liger(hs, ws, x.ht, x.wt), leaves)
            g = torch.empty(x.n, x.v, dtype=dtype, device="cuda")
            yield "gemm", lambda: (hs.detach() @ ws.detach().T, x.ht @ x.wt.T, g @ ws.detach(),
                                   g.T @ hs.detach())
        elif op == "kd":
            yield "naive", _loss_step(lambda: _naive_kd(zs, zt), (zs,))
            yield "compile", _loss_step(lambda: _compiled(_naive_kd)(zs, zt), (zs,))
            for b in backends:
                yield b, _loss_step(lambda b=b: kdkernels.kd_loss(zs, zt, backend=b), (zs,))
            buf = torch.empty_like(zs)
            yield "gemm", lambda: buf.copy_(zs.detach()).add_(zt)   # reads 2 N V, writes N V
        elif op == "topk":
            def naive_topk():
                with torch.no_grad():
                    lp = torch.log_softmax((x.ht @ x.wt.T).float(), -1)
                    return lp.topk(x.k, -1)
            yield "naive", naive_topk
            yield "compile", lambda: _compiled(naive_topk)()
            for b in backends:
                yield b, lambda b=b: kdkernels.linear_topk(x.ht, x.wt, x.k, backend=b)
            yield "gemm", lambda: x.ht @ x.wt.T
        elif op == "sample":
            def naive_sample():
                with torch.no_grad():
                    p = torch.softmax((x.ht @ x.wt.T).float(), -1)
                    return torch.multinomial(p, DRAWS, replacement=True)
            yield "naive", naive_sample
            for b in backends:
                yield b, lambda b=b: kdkernels.linear_sample(x.ht, x.wt, DRAWS, backend=b)
            yield "gemm", lambda: x.ht @ x.wt.T

    for name, fn in fns():
        if name not in providers:
            continue
        row = Row(op, name, shape, args.dtype)
        if name in ("torch", "triton", "native") and name not in runnable:
            row.note = "unavailable"
            rows.append(row)
            continue
        try:
            times, peak = _time(fn, args.warmup, args.repeat)
            row.median_ms, row.p20_ms, row.p80_ms = summarize(times)
            row.peak_mib = peak
            if op in ("sparse", "dense"):
                row.extra_mib = peak - sum(t.numel() * t.element_size() for t in leaves) / 2**20
            elif op == "kd":
                row.extra_mib = peak - zs.numel() * zs.element_size() / 2**20
        except torch.cuda.OutOfMemoryError:
            row.note = "OOM"
        except Exception as e:  # a provider failing must not hide the others' numbers
            row.note = f"error: {type(e).__name__}: {str(e)[:120]}"
        torch.cuda.empty_cache()
        rows.append(row)
        print(f"  {op:7s} {name:8s} {row.median_ms:9.2f} ms  peak {row.peak_mib:9.0f} MiB {row.note}",
              flush=True)
    return rows


_COMPILED: dict = {}


def _compiled(fn):
    import torch
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


def _liger():
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except Exception:
        return None
    return LigerFusedLinearJSD(jsd_beta=0.5, temperature=1.0)


def metadata(args) -> dict:
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda or "?", "git": git_sha(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
            "quick": bool(args.quick)}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("benchmarks/gpu_kernels.py needs a CUDA GPU (none found); nothing measured.", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    meta = metadata(args)
    print(" | ".join(f"{k}: {v}" for k, v in meta.items()), flush=True)
    x = Inputs(args, dtype)
    rows = []
    for op in args.ops:
        rows += bench_op(op, args, x, dtype, args.providers)
    add_floor_ratios(rows)
    out = args.out or ROOT / "benchmarks" / "results" / f"{slug(meta['gpu'])}-{meta['date'][:10]}"
    csv_path, md_path = write_results(rows, meta, out)
    print(markdown(rows, meta))
    print(f"wrote {csv_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
