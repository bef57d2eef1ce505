"""Results as CSV, a Markdown table and PNG plots (time and peak memory vs N, one panel per V)."""
from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = ("op", "mode", "provider", "n", "v", "h", "k", "dtype", "median_ms", "p20_ms", "p80_ms",
           "reps", "peak_mib", "gemm_ms", "x_floor", "status", "device", "torch", "triton",
           "kdkernels", "liger_kernel", "cut_cross_entropy", "git_sha", "python")


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def _fmt(x, spec: str) -> str:
    return "" if x is None or x == "" else format(x, spec)


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no results)\n"
    env = rows[0]
    head = (f"Device: {env['device']}; torch {env['torch']}, triton {env['triton'] or '-'}, "
            f"kdkernels {env['kdkernels']} ({env['git_sha'] or 'no git'}).\n"
            "Time: median [p20, p80] ms. Peak: extra memory allocated by torch during one call. "
            "x floor: time / (GEMMs the op needs x one N x H x V GEMM on this device).\n\n")
    lines = ["| op | mode | N | V | H | k | dtype | provider | median ms [p20, p80] | peak MiB | x floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            t = r["status"]
        else:
            t = f"{r['median_ms']:.1f} [{r['p20_ms']:.1f}, {r['p80_ms']:.1f}]"
        lines.append(f"| {r['op']} | {r['mode']} | {r['n']} | {r['v']} | {r['h']} | {r['k']} | "
                     f"{r['dtype']} | {r['provider']} | {t} | {_fmt(r.get('peak_mib'), '.1f')} | "
                     f"{_fmt(r.get('x_floor'), '.2f')} |")
    return head + "\n".join(lines) + "\n"


def plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per (op, mode): time vs N (top) and peak memory vs N (bottom), a column per V."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    ok = [r for r in rows if r["status"] == "ok"]
    written = []
    for op, mode in sorted({(r["op"], r["mode"]) for r in ok}):
        sel = [r for r in ok if r["op"] == op and r["mode"] == mode]
        vs = sorted({r["v"] for r in sel})
        fig, axes = plt.subplots(2, len(vs), figsize=(4.2 * len(vs), 7), squeeze=False)
        for j, v in enumerate(vs):
            for prov in sorted({r["provider"] for r in sel}):
                pts = sorted((r["n"], r["median_ms"], r["peak_mib"]) for r in sel
                             if r["v"] == v and r["provider"] == prov)
                if not pts:
                    continue
                ns = [p[0] for p in pts]
                axes[0][j].plot(ns, [p[1] for p in pts], marker="o", label=prov)
                mem = [(p[0], p[2]) for p in pts if p[2] not in (None, "")]
                if mem:
                    axes[1][j].plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=prov)
            axes[0][j].set(title=f"{op} {mode}, V={v}", xlabel="N (tokens)", ylabel="ms",
                           xscale="log", yscale="log")
            axes[1][j].set(xlabel="N (tokens)", ylabel="peak MiB", xscale="log", yscale="log")
            for a in (axes[0][j], axes[1][j]):
                a.grid(alpha=0.3)
                a.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{op}_{mode}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
