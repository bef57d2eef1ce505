"""`kdkernels bench`: time and peak memory of every op x provider over a sweep of N and V.

    kdkernels bench                      quick sweep (CPU: about two minutes)
    kdkernels bench --full               N x V over {32000, 50257, 128256, 151936, 262144}
    kdkernels bench --case foundation    fused_linear_sparse_kd_loss, N=4096 H=256 V=131072 k=64
                                         fp32 fwd+bwd on CPU: torch backend vs naive
    kdkernels bench --case floor         fused_linear_sparse_kd_loss, N=2048 H=1024 V=131072 k=64
                                         fp32 fwd+bwd on CPU: native, torch, naive vs 3 bare GEMMs
                                         (about 5 minutes on 2 cores)
Writes results.csv, results.md and one PNG per (op, mode) to --out. See docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

VOCABS = (32000, 50257, 128256, 151936, 262144)
SWEEPS = {  # (device_type, size) -> settings
    ("cpu", "quick"): dict(ops=("sparse_kd", "linear_kd"), n=(128, 512), v=(32000, 128256), h=256,
                           dtype="float32", reps=3),
    ("cpu", "full"): dict(ops=("sparse_kd", "linear_kd", "linear_ce", "kd"), n=(256, 1024, 4096),
                          v=VOCABS, h=256, dtype="float32", reps=3),
    ("cuda", "quick"): dict(ops=("sparse_kd", "linear_kd", "linear_ce"), n=(2048, 8192),
                            v=(32000, 128256), h=2048, dtype="bfloat16", reps=10),
    ("cuda", "full"): dict(ops=("sparse_kd", "linear_kd", "linear_ce", "kd"),
                           n=(1024, 2048, 4096, 8192, 16384), v=VOCABS, h=2048, dtype="bfloat16",
                           reps=10),
}
CASES = {
    "foundation": dict(ops=("sparse_kd",), n=(4096,), v=(131072,), h=256, k=64, dtype="float32",
                       reps=2, modes=("fwd_bwd",), providers=("naive", "kdkernels-torch"),
                       device="cpu"),
    # The CPU proxy of the GPU target (issue "three GEMMs and nothing more"): time per call as a
    # multiple of three bare (N, H) x (H, V) GEMMs on the same BLAS, every provider in one process.
    "floor": dict(ops=("sparse_kd",), n=(2048,), v=(131072,), h=1024, k=64, dtype="float32",
                  reps=2, modes=("fwd_bwd",), providers=("naive", "kdkernels-torch", "kdkernels-native"),
                  device="cpu"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--full", action="store_true", help="the full N x V sweep (default: quick)")
    p.add_argument("--case", choices=sorted(CASES), help="a named case instead of a sweep")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--ops", nargs="*", help="subset of ops (sparse_kd linear_kd linear_ce kd)")
    p.add_argument("--providers", nargs="*", help="subset of providers (default: all available)")
    p.add_argument("--n", type=int, nargs="*", help="token counts N")
    p.add_argument("--v", type=int, nargs="*", help="vocabulary sizes V")
    p.add_argument("--h", type=int, help="hidden size H")
    p.add_argument("--k", type=int, default=64, help="cached teacher slots per token")
    p.add_argument("--dtype", help="float32, bfloat16 or float16")
    p.add_argument("--modes", nargs="*", choices=("fwd", "fwd_bwd"), default=("fwd", "fwd_bwd"))
    p.add_argument("--reps", type=int, help="timed repetitions per row")
    p.add_argument("--compile", action="store_true",
                   help="include torch.compile of naive on CPU (always included on CUDA)")
    p.add_argument("--build-native", action="store_true",
                   help="let the native backend JIT-build its extension if it is not built yet")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="stop timing a row after this many seconds of calls")
    p.add_argument("--out", default="bench-results", help="results directory")


def _settings(args) -> dict:
    import torch
    if args.case:
        s = dict(CASES[args.case])
    else:
        dev = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
            "cpu" if args.device == "auto" else args.device)
        s = dict(SWEEPS[(dev, "full" if args.full else "quick")], device=dev,
                 modes=tuple(args.modes), providers=None, k=args.k)
    for key in ("ops", "n", "v", "providers"):
        if getattr(args, key):
            s[key] = tuple(getattr(args, key))
    for key in ("h", "dtype", "reps"):
        if getattr(args, key):
            s[key] = getattr(args, key)
    if args.device != "auto":
        s["device"] = args.device
    return s


def _native_built(device_type: str) -> bool:
    try:
        from ..backends import native
    except ImportError:
        return False
    return native.is_loaded_or_prebuilt() if device_type == "cpu" else \
        getattr(native, "_prebuilt", lambda cuda: False)(True)


def run(s: dict, *, compile_on_cpu: bool = False, memory: bool = True, max_seconds: float = 20.0,
        build_native: bool = False, log=print) -> list[dict]:
    import torch
    from .env import environment
    from .harness import time_ms
    from .memory import peak_bytes
    from .providers import GEMMS, Case, gemm_runner, make_inputs, providers, runner
    dev = s["device"]
    env = environment(dev)
    provs = []
    for p in providers(dev):
        if s.get("providers") and p.name not in s["providers"]:
            continue
        if p.name == "naive_compile" and dev == "cpu" and not compile_on_cpu and not s.get("providers"):
            continue
        why = p.why_not(dev)
        if why is None and p.name == "kdkernels-native" and not build_native and not _native_built(dev):
            why = "the extension is not built yet (a JIT build takes minutes; pass --build-native)"
        if why is not None:
            log(f"skip {p.name}: {why}")
            continue
        provs.append(p)
    rows = []
    for op in s["ops"]:
        for v in s["v"]:
            for n in s["n"]:
                case = Case(op, n, v, s["h"], s["k"], s["dtype"])
                inp = make_inputs(case, dev)
                g = gemm_runner(case, inp)
                gemm_ms = time_ms(g, dev, reps=s["reps"])["median"] if g is not None else None
                for mode in s["modes"]:
                    floor = gemm_ms * GEMMS[op][mode == "fwd_bwd"] if gemm_ms else None
                    for p in provs:
                        if op not in p.ops:
                            continue
                        row = dict(env, op=op, mode=mode, provider=p.name, n=n, v=v, h=s["h"],
                                   k=s["k"] if op == "sparse_kd" else "", dtype=s["dtype"],
                                   gemm_ms=gemm_ms, status="ok")
                        try:
                            fn = runner(case, inp, p, backward=mode == "fwd_bwd")
                            if memory:   # this first call doubles as the warm-up
                                row["peak_mib"] = peak_bytes(fn, dev) / 2 ** 20
                            t = time_ms(fn, dev, reps=s["reps"], warmup=0 if memory else 1,
                                        max_seconds=max_seconds)
                            row.update(median_ms=t["median"], p20_ms=t["p20"], p80_ms=t["p80"],
                                       reps=t["reps"], x_floor=t["median"] / floor if floor else None)
                        except torch.OutOfMemoryError:
                            row["status"] = "oom"
                        except Exception as e:  # noqa: BLE001 - a provider failing is a result
                            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
                        finally:
                            if dev == "cuda":
                                torch.cuda.empty_cache()
                        rows.append(row)
                        if row["status"] == "ok":
                            peak = f"{row['peak_mib']:.1f} MiB" if "peak_mib" in row else ""
                            xf = f" {row['x_floor']:.2f}x floor" if row.get("x_floor") else ""
                            log(f"{op:9s} {mode:7s} N={n:<6d} V={v:<6d} {p.name:18s} "
                                f"{row['median_ms']:9.2f} ms {peak}{xf}")
                        else:
                            log(f"{op:9s} {mode:7s} N={n:<6d} V={v:<6d} {p.name:18s} {row['status']}")
                del inp
    return rows


def summarize_foundation(rows: list[dict]) -> str:
    by = {r["provider"]: r for r in rows if r["status"] == "ok"}
    if "naive" not in by or "kdkernels-torch" not in by:
        return "foundation case: incomplete (see the table)"
    ours, ref = by["kdkernels-torch"], by["naive"]
    mem = ours["peak_mib"] / ref["peak_mib"] if ref.get("peak_mib") else float("nan")
    t = ours["median_ms"] / ref["median_ms"]
    return (f"foundation case (N=4096 H=256 V=131072 k=64 fp32 fwd+bwd, CPU): torch backend "
            f"{ours['median_ms']:.0f} ms / {ours['peak_mib']:.0f} MiB vs naive {ref['median_ms']:.0f} ms "
            f"/ {ref['peak_mib']:.0f} MiB -> peak {mem:.1%} of naive (target <= 10%), time "
            f"{t:.2f}x naive (target <= 2x)")


def summarize_floor(rows: list[dict]) -> str:
    ok = [r for r in rows if r["status"] == "ok" and r.get("x_floor")]
    if not ok:
        return "floor case: incomplete (see the table)"
    r0 = ok[0]
    parts = [f"{r['provider']} {r['x_floor']:.2f}x" for r in ok]
    return (f"floor case (sparse_kd fwd+bwd, N={r0['n']} H={r0['h']} V={r0['v']} k={r0['k']} "
            f"{r0['dtype']}, {r0.get('device', 'cpu')}): 3 bare GEMMs = {3 * r0['gemm_ms']:.0f} ms; "
            + ", ".join(parts) + " (targets: native <= 1.25x, torch <= naive)")


def main(args) -> int:
    from .report import markdown, plots, write_csv
    s = _settings(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"kdkernels bench on {s['device']}: ops {list(s['ops'])}, N {list(s['n'])}, "
          f"V {list(s['v'])}, H {s['h']}, {s['dtype']}", flush=True)
    rows = run(s, compile_on_cpu=args.compile, memory=not args.no_memory,
               max_seconds=args.max_seconds, build_native=args.build_native,
               log=lambda m: print(m, flush=True))
    write_csv(rows, out / "results.csv")
    md = markdown(rows)
    if args.case == "foundation":
        md += "\n" + summarize_foundation(rows) + "\n"
    if args.case == "floor":
        md += "\n" + summarize_floor(rows) + "\n"
    (out / "results.md").write_text(md)
    pngs = plots(rows, out)
    print()
    print(md)
    print(f"wrote {out / 'results.csv'}, {out / 'results.md'}"
          + (f" and {len(pngs)} PNG(s)" if pngs else " (no matplotlib: no plots)")
          + f" in {time.perf_counter() - t0:.0f} s")
    ours_failed = any(r["status"].startswith("error") and r["provider"].startswith("kdkernels")
                      for r in rows)
    return 1 if ours_failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="kdkernels bench")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
