"""Check the triton shard protocol (shard.py) on one device without a process group:

    python -m kdkernels.backends.triton.shard_check [--rows 1029 --vocab 32007 --hidden 512
                                                     --dtype bfloat16 --device cuda]

For each loss (kd_loss logits, fused_linear_kd_loss, fused_linear_sparse_kd_loss) and a few
divergences / options, the vocabulary is cut into two uneven shards; on each shard every pass
(stats, terms, backward) runs through the triton backend and through the torch reference passes
(kdkernels/distributed/shard_torch.py) on the same inputs, with the same local labels (target here,
-1 no CE, -2 target on another shard), local ids and global per-row statistics. Both are compared
with the reference passes in float64 on the same rounded inputs: the triton error may be at most
2x the torch passes' error plus 16 fp32 ulps of the quantity's scale. Prints one line per pass and
exits 1 on a failure. On CPU it needs TRITON_INTERPRET=1 (small shapes only). bf16 on CUDA only (the
interpreter's bf16 tl.dot is wrong).
"""
from __future__ import annotations

import argparse
import sys

import torch

CASES = (
    # (form, options)
    ("logits", dict(divergence="jsd", beta=0.3, temperature=2.0, ce_weight=0.5)),
    ("linear", dict(divergence="forward_kl", ce_weight=0.5, student_softcap=30.0)),
    ("linear", dict(divergence="skew_reverse_kl", alpha=0.3, temperature=0.7)),
    ("sparse", dict(divergence="forward_kl", ce_weight=0.2)),
    ("sparse", dict(divergence="jsd", tail="renorm_both", temperature=2.0)),
)


def _f(x, dtype):
    return x.to(dtype) if x is not None and x.is_floating_point() else x


def _three(mod, fn, args, kinds, dtype):
    """(triton, torch passes, torch passes in float64) results of pass `fn`; kinds: "x" model
    inputs (dtype), "s" per-row statistics (fp32; fp64 for the truth), "-" passed as is."""
    from ...distributed import shard_torch
    out = []
    for m, dt in ((mod, dtype), (shard_torch, dtype), (shard_torch, torch.float64)):
        st = torch.float64 if dt == torch.float64 else torch.float32
        a = [_f(x, dt) if k == "x" else _f(x, st) if k == "s" else x for x, k in zip(args, kinds)]
        r = getattr(m, fn)(*a)
        out.append(r if isinstance(r, tuple) else (r,))
    return out


def _compare(name, res, report):
    for i, (got, ref, truth) in enumerate(zip(*res)):
        if got is None:
            continue
        g, r, t = got.double(), ref.double(), truth.double()
        fin = torch.isfinite(t)
        same_inf = bool((torch.isfinite(g) == fin).all()) and torch.equal(g[~fin], t[~fin])
        e_got = float((g - t)[fin].abs().max()) if fin.any() else 0.0
        e_ref = float((r - t)[fin].abs().max()) if fin.any() else 0.0
        scale = float(t[fin].abs().max()) if fin.any() else 0.0
        bound = 2 * e_ref + 16 * 2.0 ** -23 * max(scale, 1e-3)
        ok = same_inf and got.dtype == ref.dtype and e_got <= bound
        report(f"{'ok  ' if ok else 'FAIL'} {name}[{i}] triton {e_got:.2e} torch {e_ref:.2e} "
               f"bound {bound:.2e} scale {scale:.2e}", ok)


def check(n=1029, v=32007, h=512, k=64, dtype=torch.bfloat16, device="cuda", seed=0, report=None):
    """Run every case; returns the number of failed comparisons. report(line, ok) gets each line."""
    import kdkernels.backends.triton as TRITON
    from ...backends.torch import sparse as torch_sparse
    from ...distributed import shard_torch
    from ...distributed.vocab_parallel import _local_labels, _local_teacher
    from ...options import KDOptions
    fails = []
    report = report or (lambda line, ok: print(line, flush=True))

    def rep(line, ok):
        fails.append(not ok)
        report(line, ok)

    g = torch.Generator().manual_seed(seed)
    r = lambda t: t.to(dtype).float().to(device)  # noqa: E731  (rounded to dtype, held in fp32)
    hs, ht = r(torch.randn(n, h, generator=g)), r(torch.randn(n, h, generator=g))
    ws = r(torch.randn(v, h, generator=g) * (3.0 / h ** 0.5))
    wt = r(torch.randn(v, h, generator=g) * (3.0 / h ** 0.5))
    bs = r(torch.randn(v, generator=g) * 0.5)
    zs, zt = r(hs @ ws.T), r(ht @ wt.T)
    ignored = (torch.arange(n) % 5 == 0).to(device)
    ce = torch.where(ignored, -1, torch.randint(0, v, (n,), generator=g).to(device))
    grad_rows = torch.where(ignored, 0.0, (torch.rand(n, generator=g) + 0.5).to(device))
    cut = v // 3 + 1
    for form, kw in CASES:
        opts = KDOptions(**kw)
        for start, size in ((0, cut), (cut, v - cut)):
            s = slice(start, start + size)
            lab = _local_labels(ce, start, size)
            name = f"{form} {kw} shard [{start}, {start + size})"
            if form == "sparse":
                lp = torch.log_softmax((ht @ wt.T).double() / opts.temperature, 1)
                vals, ids = torch.topk(lp, k, 1)
                vals = vals.float()
                ids[1::3, -2:], vals[1::3, -2:] = -1, 0.0
                loc = torch.where((ids >= 0) & (ids >= start) & (ids < start + size), ids - start, -1)
                args = (hs, ws[s], bs[s])
                _compare(name + " stats", _three(TRITON, "linear_sparse_kd_shard_stats",
                                                 (*args, loc, lab, opts), "xxx---", dtype), rep)
                _, st = torch_sparse.linear_sparse_kd_forward(hs.double(), ws.double(), bs.double(),
                                                              ids, vals.double(), ce, opts)
                st = st[:, :4]   # float64: the torch backend's lo columns (4, 5) are 0
                lpK, _ = _local_teacher(ids, vals, loc, opts)
                _compare(name + " backward", _three(
                    TRITON, "linear_sparse_kd_shard_backward",
                    (*args, loc, lpK, lab, st.float(), grad_rows, opts, (True, True, True)),
                    "xxx-s-ss--", dtype), rep)
                continue
            pre = "" if form == "logits" else "linear_"
            if form == "logits":
                args, full, kinds = (zs[:, s], zt[:, s]), (zs, zt), "xx"
            else:
                args, full, kinds = (hs, ws[s], bs[s], ht, wt[s], None), (hs, ws, bs, ht, wt, None), "xxxxx-"
            full = tuple(_f(x, torch.float64) for x in full)
            _compare(name + " stats", _three(TRITON, pre + "kd_shard_stats", (*args, lab, opts),
                                             kinds + "--", dtype), rep)
            glse, _ = getattr(shard_torch, pre + "kd_shard_stats")(*full, ce, opts)
            _compare(name + " terms", _three(TRITON, pre + "kd_shard_terms",
                                             (*args, glse.float(), opts), kinds + "s-", dtype), rep)
            S = getattr(shard_torch, pre + "kd_shard_terms")(*full, glse, opts)[:, 1]
            stats = torch.cat([glse, S[:, None]], 1).float()
            extra = () if form == "logits" else ((True, True, True),)
            _compare(name + " backward", _three(
                TRITON, pre + "kd_shard_backward", (*args, lab, stats, grad_rows, opts, *extra),
                kinds + "-ss-" + "-" * len(extra), dtype), rep)
    return sum(fails)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1029)
    ap.add_argument("--vocab", type=int, default=32007)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args(argv)
    failed = check(a.rows, a.vocab, a.hidden, a.k, getattr(torch, a.dtype), a.device)
    print(f"shard_check: {failed} failure(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
