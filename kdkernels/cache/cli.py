"""`kdkernels cache build|inspect|verify` (wired by kdkernels/cli.py).

    kdkernels cache build TEACHER DATA... -o DIR [--mode topk|sample] [--k 64] [--draws 64] ...
    torchrun --nproc_per_node=2 -m kdkernels cache build ...      # shards split across ranks
    kdkernels cache inspect DIR [--json]
    kdkernels cache verify DIR                                     # exit 1 and name the bad shards
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cache_command", required=True)
    b = sub.add_parser("build", help="run the teacher over text and write a cache")
    b.add_argument("teacher", help="model directory or .gguf file (loaded offline)")
    b.add_argument("data", nargs="+", type=Path,
                   help="text files (one document each), .jsonl files, a saved HF dataset "
                        "directory, or directories of such files")
    b.add_argument("-o", "--out", required=True, type=Path, help="cache directory")
    b.add_argument("--gguf-file", default=None, help="GGUF file name inside the teacher directory")
    b.add_argument("--mode", choices=("topk", "sample"), default="topk")
    b.add_argument("--k", type=int, default=64, help="entries per position in topk mode")
    b.add_argument("--draws", type=int, default=64, help="draws per position in sample mode")
    b.add_argument("--temperature", type=float, default=1.0)
    b.add_argument("--seq-len", type=int, default=512)
    b.add_argument("--no-pack", action="store_true",
                   help="cut each document on its own instead of packing them into one stream")
    b.add_argument("--text-field", default="text", help="JSONL / dataset text field")
    b.add_argument("--tokens-per-batch", type=int, default=None)
    b.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard file")
    b.add_argument("--lossless", action="store_true", help="exact float32 log-probs")
    b.add_argument("--value-step", type=float, default=None,
                   help="log-prob quantization step in nats (error <= step/2), default 1/64")
    b.add_argument("--seed", type=int, default=0, help="sampling seed (sample mode)")
    b.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    b.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    b.add_argument("--backend", default=None, help="kdkernels backend for linear_topk/linear_sample")
    b.add_argument("--host-workers", type=int, default=None,
                   help="0: encode inline; 1 (default): one encoding thread overlapping the device; "
                        ">= 2: that many encoding processes. Never changes the bytes")
    b.add_argument("--no-progress", action="store_true")
    i = sub.add_parser("inspect", help="print totals, bytes per token/entry, tail-mass statistics")
    i.add_argument("dir", type=Path)
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    v = sub.add_parser("verify", help="check every shard's sha256 and structure")
    v.add_argument("dir", type=Path)


def main(args: argparse.Namespace) -> int:
    from . import build, summarize, verify
    from .builder import DEFAULT_SHARD_TOKENS, DEFAULT_TOKENS_PER_BATCH, DEFAULT_VALUE_STEP
    from .manifest import SettingsMismatch
    from .summary import format_summary

    if args.cache_command == "build":
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        try:
            out = build(args.teacher, list(args.data), args.out, mode=args.mode, k=args.k,
                        draws=args.draws, temperature=args.temperature, seq_len=args.seq_len,
                        tokens_per_batch=args.tokens_per_batch or DEFAULT_TOKENS_PER_BATCH,
                        lossless=args.lossless, gguf_file=args.gguf_file, pack=not args.no_pack,
                        text_field=args.text_field, seed=args.seed,
                        shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS,
                        value_step=args.value_step or DEFAULT_VALUE_STEP, dtype=args.dtype,
                        device=args.device, backend=args.backend, progress=not args.no_progress,
                        host_workers=args.host_workers)
        except (SettingsMismatch, FileNotFoundError, ValueError) as e:
            print(f"kdkernels cache build: error: {e}", file=sys.stderr)
            return 2
        import os
        if int(os.environ.get("RANK", "0")) == 0:
            print(format_summary(summarize(out)))
        return 0
    if args.cache_command == "inspect":
        try:
            s = summarize(args.dir)
        except (FileNotFoundError, ValueError) as e:
            print(f"kdkernels cache inspect: error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(s, indent=1) if args.json else format_summary(s))
        return 0
    if args.cache_command == "verify":
        problems = verify(args.dir)
        if problems:
            for p in problems:
                print(f"FAIL {p}", file=sys.stderr)
            print(f"kdkernels cache verify: {args.dir}: {len(problems)} problem(s)", file=sys.stderr)
            return 1
        print(f"kdkernels cache verify: {args.dir}: OK")
        return 0
    return 2
