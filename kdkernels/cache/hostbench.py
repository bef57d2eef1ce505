"""Benchmark the host side of a cache build alone: encoding + shard writing, no teacher.

    python -m kdkernels.cache.hostbench [--mode topk|sample|both] [--tokens 65536] [--workers N]
        [--vocab 49152] [--k 64] [--draws 64] [--tokens-per-batch 2048] [--out DIR] [--profile]

`--workers 0` is the sequential host path (encoding inline, then writing); the default runs the build's
HostPipeline (encoding threads and one writer thread), exactly as build() does.

Feeds the builder's post-GPU path (`builder.encode_batch` and the shard writer) with ready-made head
outputs of the shapes and value distributions the GPU ops return: top-k ids (N, k) in value order
with log-probs descending (a Zipf-like teacher, ~10% tail mass), or sampled unique ids ascending
with -1 padding and weights count/draws (draws from a Zipf-like teacher over V, ~19 unique ids per
position as SmolLM2 gives on real text). The data are generated before the clock starts. Reports
wall tokens/s of encoding + writing (checksums, sha256, fsync included): the ceiling the host side
puts on a GPU build with the same settings; and tokens per process CPU second (all threads), which a
shared machine's load does not distort.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np


def make_topk(rng, n: int, vocab: int, k: int):
    """(ids (n, k) int64 in descending-value order, logprobs (n, k) f32 descending, tail (n,) f32)."""
    stride = vocab // k
    bucket = np.argsort(rng.random((n, k)), axis=1)              # which bucket holds rank j
    ids = (rng.integers(0, vocab, (n, 1)) + bucket * stride + rng.integers(0, stride, (n, k))) % vocab
    ranks = np.arange(1, k + 1)
    lp = -1.5 - 1.1 * np.log(ranks)[None, :] + rng.normal(0, 0.3, (n, k))
    lp = -np.sort(-lp, axis=1)
    lp -= np.log(np.exp(lp).sum(1, keepdims=True) / 0.9)         # top-k hold 90% of the mass
    tail = np.log1p(-np.exp(lp).sum(1))
    return ids.astype(np.int64), lp.astype(np.float32), tail.astype(np.float32)


def make_sample(rng, n: int, vocab: int, draws: int, exponent: float = 1.6):
    """(unique ids (n, m) ascending, -1 padded, int64; weights count/draws (n, m) f32)."""
    p = np.arange(1, vocab + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(p / p.sum())
    rank = np.minimum(np.searchsorted(cdf, rng.random((n, draws)), side="right"), vocab - 1)
    raw = np.sort((rank * 7919 + rng.integers(0, vocab, (n, 1))) % vocab, axis=1)
    start = np.ones_like(raw, dtype=bool)
    start[:, 1:] = raw[:, 1:] != raw[:, :-1]
    slot = np.cumsum(start, axis=1) - 1
    m = int(slot[:, -1].max()) + 1
    ids = np.full((n, m), -1, np.int64)
    counts = np.zeros((n, m), np.float32)
    rows = np.repeat(np.arange(n), draws)
    ids[rows, slot.ravel()] = raw.ravel()
    np.add.at(counts, (rows, slot.ravel()), 1.0)
    return ids, counts / np.float32(draws)


def _warm(_):
    from . import builder  # noqa: F401  (the import a worker process needs)
    return os.getpid()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("topk", "sample", "both"), default="both")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--tokens-per-batch", type=int, default=2048)
    ap.add_argument("--shard-tokens", type=int, default=1 << 15)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--draws", type=int, default=64)
    ap.add_argument("--lossless", action="store_true")
    ap.add_argument("--rounds", type=int, default=2, help="the fastest round is reported")
    ap.add_argument("--out", type=Path, default=Path("cache_hostbench"))
    ap.add_argument("--workers", type=int, default=None,
                    help="encoding threads (default: the build's default for this machine; 0 = inline)")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one round")
    args = ap.parse_args(argv)

    from .builder import _batches, encode_arrays
    from .pipeline import HostPipeline, default_workers
    from .codec import Codec
    from .shard import write_shard

    rng = np.random.default_rng(0)
    nseq = max(1, args.tokens // args.seq_len)
    ntok = nseq * args.seq_len
    seqs = [rng.integers(0, args.vocab, args.seq_len) for _ in range(nseq)]
    shard_sequences = max(1, args.shard_tokens // args.seq_len)
    results = {"tokens": ntok, "vocab": args.vocab, "tokens_per_batch": args.tokens_per_batch,
               "shard_tokens": shard_sequences * args.seq_len, "cpus": os.cpu_count(),
               "workers": default_workers() if args.workers is None else args.workers,
               "note": "tok_per_cpu_s counts this process only (not encoding processes)"}
    modes = ("topk", "sample") if args.mode == "both" else (args.mode,)
    workers = default_workers() if args.workers is None else args.workers
    procs = None
    if workers >= 2:      # started once, outside the clock (a build starts its pool once per call)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        procs = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"))
        list(procs.map(_warm, range(workers)))
    for mode in modes:
        width = args.k if mode == "topk" else args.draws
        codec = Codec(mode, args.vocab, width, args.lossless and mode == "topk", 1.0 / 64.0)
        settings = {"mode": mode, "k": args.k if mode == "topk" else None}
        if mode == "topk":
            tid, tval, tail = make_topk(rng, ntok, args.vocab, args.k)
        else:
            (tid, tval), tail = make_sample(rng, ntok, args.vocab, args.draws), None
            results["sample_unique_ids_mean"] = float((tid >= 0).sum(1).mean())
        lp_next = rng.normal(-3, 2, ntok).astype(np.float32)
        lp_next[args.seq_len - 1::args.seq_len] = np.nan
        out = args.out / mode

        def one_round():
            if out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True)
            row = 0
            with HostPipeline(functools.partial(encode_arrays, codec, settings),
                              workers=workers, processes=procs) as pipe:
                for j in range(0, nseq, shard_sequences):
                    part_all = seqs[j:j + shard_sequences]
                    for batch in _batches([len(q) for q in part_all], args.tokens_per_batch):
                        part = [part_all[i] for i in batch]
                        n = sum(len(q) for q in part)
                        arrays = [tid[row:row + n], tval[row:row + n], lp_next[row:row + n],
                                  None if tail is None else tail[row:row + n]]
                        pipe.add_batch(part, lambda a=arrays: a)
                        row += n
                    index = j // shard_sequences
                    pipe.end_shard(lambda enc, mid, i=index: write_shard(
                        out / f"shard-{i:05d}.kdk", i, enc, mid))

        times, cpu = [], []
        for _ in range(args.rounds):
            t, c = time.perf_counter(), time.process_time()
            one_round()
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        if args.profile:
            import cProfile
            import pstats
            prof = cProfile.Profile()
            prof.runcall(one_round)
            print(f"--- {mode}")
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
        results[f"{mode}_s_runs"] = times
        results[f"{mode}_tok_s"] = ntok / min(times)
        results[f"{mode}_cpu_s_runs"] = cpu           # all threads' CPU seconds (load-independent)
        results[f"{mode}_tok_per_cpu_s"] = ntok / min(cpu)
        results[f"{mode}_bytes"] = sum(p.stat().st_size for p in out.iterdir())
    if procs is not None:
        procs.shutdown()
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
