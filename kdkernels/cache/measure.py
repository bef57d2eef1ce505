"""Measure a cache build against the teacher's plain forward pass, on Python stdlib docstrings.

    python -m kdkernels.cache.measure TEACHER [--gguf-file F] [--tokens 16384] [--out DIR]
        [--device cpu|cuda] [--random-init] [--dtype float32|bfloat16] [--backend NAME]

Prints bytes per stored (id, value) entry for top-k (k=64) and sampled (draws=64) caches, the same
sizes projected to a 262,144-token vocabulary (the Elias-Fano id cost is a function of (n, V) only,
so the projection swaps the measured id bits for the exact id bits at the larger V, and 2-byte
token ids for 4-byte ones), and build throughput vs `model(input_ids)` on the same batches
(body + full LM head). Also the head alone, on the same final hidden states: the forward's
`lm_head` vs `linear_topk` / `linear_sample`, whose difference over the forward time
(`*_head_overhead`) is the build's overhead without the body's run-to-run noise. Builds, forward
passes and head timings are interleaved `--rounds` times and the fastest of each kind is reported. On CPU, times are process CPU seconds by default (`--clock cpu`,
meaningful with `--threads 1`), so other jobs on a shared machine do not distort the ratio; on CUDA
(`--device cuda`) they are wall seconds between torch.cuda.synchronize() calls, after one untimed
forward pass and one untimed build of each mode (kernel compilation, cuBLAS and allocator warm-up).
`--random-init` builds the model from TEACHER/config.json with random weights (seed 0), so a machine
without the weights measures the same architecture; the tokenizer still comes from TEACHER.
Random weights give a near-uniform teacher: sizes and perplexity are then not those of the real one.
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


def load_model(args):
    """(model, tokenizer) on args.device: the real weights, or random ones from config.json."""
    from .. import teacher as T
    if not args.random_init:
        return T.load_teacher(args.teacher, gguf_file=args.gguf_file, dtype=args.dtype,
                              device=args.device)
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    directory, gguf = T.resolve_source(args.teacher, args.gguf_file)
    if gguf is not None or not (directory / "config.json").is_file():
        raise SystemExit(f"--random-init needs a model directory with config.json, got {args.teacher}")
    tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to(args.device).eval()
    model.requires_grad_(False)
    return model, tok


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
    ap.add_argument("--clock", choices=("cpu", "wall"), default=None,
                    help="cpu: process CPU time (robust on a shared machine; use with --threads 1), "
                         "wall: elapsed time. Default: cpu on CPU, wall (synchronized) on CUDA")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the model runs and the cache is built")
    ap.add_argument("--random-init", action="store_true",
                    help="random weights from TEACHER/config.json (tokenizer from TEACHER)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--host-workers", type=int, default=None,
                    help="build(host_workers=): 0 inline, 1 one thread (default), >= 2 processes")
    args = ap.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        if args.clock == "cpu":
            raise SystemExit("--clock cpu measures host CPU time, not GPU work: use --clock wall on CUDA")
    clock_kind = args.clock or ("wall" if args.device == "cuda" else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    from . import build, summarize
    from .data import tokenize

    t0 = time.perf_counter()
    model, tok = load_model(args)
    load_s = time.perf_counter() - t0
    docs = stdlib_docstrings(max_chars=args.tokens * 8)
    seqs = tokenize(docs, tok, args.seq_len)
    keep = min(len(seqs), max(1, args.tokens // args.seq_len))
    ids = [seqs[i].tolist() for i in range(keep)]
    ntok = sum(len(x) for x in ids)
    per_batch = max(1, args.tokens_per_batch // args.seq_len)

    cuda = args.device == "cuda"
    base_clock = time.process_time if clock_kind == "cpu" else time.perf_counter

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
        return base_clock()

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
            model(input_ids=x.to(args.device), attention_mask=mask.to(args.device),
                  use_cache=False).logits
        return clock() - t

    import shutil

    def build_s(mode: str, extra: dict) -> float:
        out = args.out / mode
        if out.exists():
            shutil.rmtree(out)
        t = clock()
        build((model, tok), ids, out, mode=mode, seq_len=args.seq_len,
              tokens_per_batch=args.tokens_per_batch, progress=False, backend=args.backend,
              host_workers=args.host_workers, **extra)
        return clock() - t

    from .. import teacher as T
    head = T.teacher_head(model)
    lm_head = model.get_output_embeddings()

    def batches():
        for b in range(0, len(ids), per_batch):
            part = ids[b:b + per_batch]
            x = torch.zeros(len(part), max(len(q) for q in part), dtype=torch.long)
            mask = torch.zeros_like(x)
            for r, q in enumerate(part):
                x[r, :len(q)] = torch.tensor(q)
                mask[r, :len(q)] = 1
            yield x.to(args.device), mask.to(args.device)

    with torch.no_grad():  # final hidden states of every batch, for the head-only timings
        hidden = [T.hidden_states(model, x, m) for x, m in batches()]
        rows = [h[m.bool()] for h, (_, m) in zip(hidden, batches())]

    @torch.no_grad()
    def head_s(kind: str) -> float:
        """The LM-head part alone: the forward's lm_head on (B, L, H) hidden states, or the cache's
        linear_topk / linear_sample on the same (unpadded) rows."""
        gen = torch.Generator(device=args.device).manual_seed(0)
        t = clock()
        for h, r in zip(hidden, rows):
            if kind == "lm_head":
                lm_head(h)
            elif kind == "topk":
                head.topk(r, 64, backend=args.backend)
            else:
                head.sample(r, 64, generator=gen, backend=args.backend)
        return clock() - t

    modes = (("topk", {"k": 64}), ("sample", {"draws": 64}))
    results = {"teacher": str(args.teacher), "random_init": args.random_init, "device": args.device,
               "device_name": (torch.cuda.get_device_name() if cuda else "cpu"), "dtype": args.dtype,
               "backend": args.backend or "default", "tokens": ntok,
               "threads": torch.get_num_threads(), "clock": clock_kind, "load_s": load_s,
               "host_workers": args.host_workers}
    if cuda:  # untimed warm-up: kernel compilation, cuBLAS handles, the caching allocator
        forward_s()
        for mode, extra in modes:
            build_s(mode, extra)
    fwd = []
    runs: dict = {"topk": [], "sample": []}
    heads: dict = {"lm_head": [], "topk": [], "sample": []}
    for _ in range(args.rounds):
        fwd.append(forward_s())
        for mode, extra in modes:
            runs[mode].append(build_s(mode, extra))
        for kind in heads:
            heads[kind].append(head_s(kind))
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
    results["lm_head_s"] = min(heads["lm_head"])
    for mode in ("topk", "sample"):
        results[f"{mode}_tok_s"] = ntok / results[f"{mode}_build_s"]
        results[f"{mode}_overhead"] = results[f"{mode}_build_s"] / results["forward_s"] - 1
        # the same overhead from the head alone (less noise: the body's time cancels out)
        results[f"linear_{mode}_s"] = min(heads[mode])
        results[f"{mode}_head_overhead"] = (min(heads[mode]) - results["lm_head_s"]) / results["forward_s"]
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
