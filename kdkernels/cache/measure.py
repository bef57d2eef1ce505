"""Measure a cache build against the teacher's plain forward pass, on Python stdlib docstrings.

    python -m kdkernels.cache.measure TEACHER [--gguf-file F] [--tokens 16384] [--out DIR]

Prints bytes per stored (id, value) entry for top-k (k=64) and sampled (draws=64) caches, the same
sizes projected to a 262,144-token vocabulary (the Elias-Fano id cost is a function of (n, V) only,
so the projection swaps the measured id bits for the exact id bits at the larger V, and 2-byte
token ids for 4-byte ones), and build throughput vs `model(input_ids)` on the same batches
(body + full LM head). Builds and forward passes are interleaved `--rounds` times and the fastest
of each kind is reported. Times are process CPU seconds by default (`--clock cpu`, meaningful with
`--threads 1`), so other jobs on a shared machine do not distort the ratio.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import time
from pathlib import Path

import numpy as np
import torch

STDLIB = ["abc", "argparse", "array", "asyncio", "base64", "bisect", "calendar", "collections",
          "concurrent.futures", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
          "difflib", "email", "enum", "fractions", "functools", "gettext", "glob", "gzip", "hashlib",
          "heapq", "hmac", "html", "http.client", "imaplib", "inspect", "io", "ipaddress",
          "itertools", "json", "logging", "mailbox", "math", "multiprocessing", "numbers",
          "operator", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched",
          "secrets", "selectors", "shlex", "shutil", "signal", "smtplib", "socket", "sqlite3",
          "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
          "threading", "timeit", "tokenize", "traceback", "typing", "unittest", "urllib.parse",
          "uuid", "warnings", "weakref", "xml.dom", "zipfile", "zlib"]


def stdlib_docstrings(max_chars: int = 10 ** 7) -> list[str]:
    """Docstrings of a fixed list of stdlib modules and their public members, in a fixed order."""
    docs, total = [], 0
    for name in STDLIB:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        objs = [mod] + [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]
        for o in objs:
            d = inspect.getdoc(o) if (inspect.ismodule(o) or inspect.isclass(o) or callable(o)) else None
            if d and len(d) > 200 and d not in docs[-50:]:
                docs.append(d)
                total += len(d)
                if total >= max_chars:
                    return docs
    return docs


def _ef_bits(n: np.ndarray, vocab: int) -> np.ndarray:
    from .bits import ef_high_bits, ef_low_bits
    low = ef_low_bits(n, vocab)
    return n * low + ef_high_bits(n, low, vocab)


def _projected_bytes(directory: Path, vocab_to: int) -> float:
    """Total bytes of the cache with its ids coded for a `vocab_to` vocabulary (exact for ids)."""
    from . import manifest as M
    from .shard import Shard
    m = M.read(directory)
    total = m["totals"]["bytes"]
    extra_bits = 0
    for s in m["shards"]:
        sec = Shard(directory / s["name"], s["bytes"]).sections
        n = (np.asarray(sec["count"], np.int64) if "count" in sec
             else np.full(sec["tokens"].shape[0], m["k"], np.int64))
        extra_bits += int((_ef_bits(n, vocab_to) - _ef_bits(n, m["vocab_size"])).sum())
        if m["vocab_size"] <= 65536 < vocab_to:
            extra_bits += 16 * int(sec["tokens"].shape[0])
    return total + extra_bits / 8


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teacher")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--tokens", type=int, default=16384, help="corpus size in tokens")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--tokens-per-batch", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=2,
                    help="interleaved repetitions; the fastest of each kind is reported")
    ap.add_argument("--out", type=Path, default=Path("cache_measure"))
    ap.add_argument("--backend", default=None,
                    help="backend of linear_topk / linear_sample (default: build's, torch on CPU)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: process CPU time (robust on a shared machine; use with --threads 1), "
                         "wall: elapsed time")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from .. import teacher as T
    from . import build, summarize
    from .data import tokenize

    t0 = time.perf_counter()
    model, tok = T.load_teacher(args.teacher, gguf_file=args.gguf_file)
    load_s = time.perf_counter() - t0
    docs = stdlib_docstrings(max_chars=args.tokens * 8)
    seqs = tokenize(docs, tok, args.seq_len)
    keep = min(len(seqs), max(1, args.tokens // args.seq_len))
    ids = [seqs[i].tolist() for i in range(keep)]
    ntok = sum(len(x) for x in ids)
    per_batch = max(1, args.tokens_per_batch // args.seq_len)

    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    @torch.no_grad()
    def forward_s() -> float:
        t = clock()
        for b in range(0, len(ids), per_batch):
            part = ids[b:b + per_batch]
            L = max(len(x) for x in part)
            x = torch.zeros(len(part), L, dtype=torch.long)
            mask = torch.zeros_like(x)
            for r, q in enumerate(part):
                x[r, :len(q)] = torch.tensor(q)
                mask[r, :len(q)] = 1
            model(input_ids=x, attention_mask=mask, use_cache=False).logits
        return clock() - t

    results = {"teacher": str(args.teacher), "backend": args.backend or "default", "tokens": ntok, "threads": torch.get_num_threads(),
               "clock": args.clock, "load_s": load_s}
    import shutil
    fwd = []
    runs: dict = {"topk": [], "sample": []}
    for _ in range(args.rounds):
        fwd.append(forward_s())
        for mode, extra in (("topk", {"k": 64}), ("sample", {"draws": 64})):
            out = args.out / mode
            if out.exists():
                shutil.rmtree(out)
            t = clock()
            build((model, tok), ids, out, mode=mode, seq_len=args.seq_len,
                  tokens_per_batch=args.tokens_per_batch, progress=False, backend=args.backend,
                  **extra)
            runs[mode].append(clock() - t)
    fwd.append(forward_s())
    for mode in ("topk", "sample"):
        out = args.out / mode
        results[f"{mode}_build_s"] = min(runs[mode])
        results[f"{mode}_build_s_runs"] = runs[mode]
        s = summarize(out)
        results[f"{mode}_bytes_per_entry"] = s["bytes_per_entry"]
        results[f"{mode}_entry_bytes_per_entry"] = s["entry_bytes_per_entry"]
        results[f"{mode}_bytes_per_token"] = s["bytes_per_token"]
        results[f"{mode}_bytes_per_entry_at_262144"] = _projected_bytes(out, 262144) / s["entries"]
        if mode == "topk":
            results["topk_tail_mass_mean"] = s["tail_mass"]["mean"]
        else:
            results["sample_unique_ids_mean"] = s["unique_ids_per_position"]["mean"]
        results["teacher_perplexity"] = s["teacher_next_token"]["perplexity"]
    results["forward_s"] = min(fwd)
    results["forward_s_runs"] = fwd
    results["forward_tok_s"] = ntok / results["forward_s"]
    for mode in ("topk", "sample"):
        results[f"{mode}_tok_s"] = ntok / results[f"{mode}_build_s"]
        results[f"{mode}_overhead"] = results[f"{mode}_build_s"] / results["forward_s"] - 1
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
