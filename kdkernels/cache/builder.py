"""Building a cache: run the teacher body once per token, keep what distillation needs.

Work unit = one shard = a fixed run of `shard_sequences` consecutive sequences. Shard j's bytes are
a function of the settings and of its sequences only (its batches are cut the same way, a sampled
shard draws from a generator seeded by (seed, j)), so a shard can be built by any rank, and a resumed
or distributed build writes the same bytes as a single uninterrupted one. Rank r of W builds the
shards j with j % W == r; a shard file under its final name is complete (shard.py), so a rerun skips
it. Rank 0 owns manifest.json: it is written before any shard (to pin the settings), after each of
rank 0's shards, and once more, complete, after all ranks have finished.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import teacher as T
from . import manifest as M
from .codec import Codec
from .data import Sequences, tokenize
from .pipeline import HostPipeline, to_host
from .shard import entry_from_file, write_shard

_log = logging.getLogger("kdkernels.cache")

DEFAULT_TOKENS_PER_BATCH = 8192
DEFAULT_SHARD_TOKENS = 1 << 18
DEFAULT_VALUE_STEP = 1.0 / 64.0


def _dist_context():
    """(rank, world, dist module or None, whether we initialized the process group)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist, False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available")
        from datetime import timedelta
        # ranks meet only at the start and the end; a resumed build can leave some idle for long
        dist.init_process_group("gloo", timeout=timedelta(days=1))
        return dist.get_rank(), dist.get_world_size(), dist, True
    return 0, 1, None, False


def _load(model_or_path, gguf_file, dtype, device):
    """(model, tokenizer, teacher path, gguf file name) from any accepted `model_or_path`."""
    if isinstance(model_or_path, (str, os.PathLike)):
        directory, gguf = T.resolve_source(model_or_path, gguf_file)
        model, tok = T.load_teacher(directory, gguf_file=gguf, dtype=dtype, device=device)
        return model, tok, str(directory), gguf
    if isinstance(model_or_path, (tuple, list)):
        model, tok = model_or_path
    else:
        model, tok = model_or_path, None
    return model, tok, str(getattr(model.config, "_name_or_path", "") or ""), gguf_file


def _shard_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"kdkernels-cache:{seed}:{index}".encode()).digest()[:8],
                          "little") >> 1


def _batches(lengths: list[int], budget: int) -> list[range]:
    """Consecutive runs of sequences whose padded size (count x longest) fits the token budget."""
    out, start, longest = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and (i - start + 1) * max(longest, n) > budget:
            out.append(range(start, i))
            start, longest = i, 0
        longest = max(longest, n)
    if start < len(lengths):
        out.append(range(start, len(lengths)))
    return out


def encode_batch(codec: Codec, settings: dict, part: list, tid: np.ndarray, tval: np.ndarray,
                 lp_next: np.ndarray, tail) -> tuple[list, int]:
    """The host side of one teacher batch: rows of `part`'s sequences (sequence-major, as the head
    ops return them) -> ([(tokens, side arrays, stream, entries) per sequence], max id)."""
    max_id = int(tid.max(initial=-1))
    lens = np.array([len(q) for q in part], dtype=np.int64)
    side, streams = codec.encode_many(tid, tval, lp_next, tail, lens)
    edges = np.concatenate([[0], np.cumsum(lens)])
    if settings["mode"] == "topk":
        entries = (lens * settings["k"]).tolist()
    else:
        entries = np.add.reduceat(side["count"].astype(np.int64), edges[:-1]).tolist()
    return [(q.astype(codec.id_dtype), {name: a[edges[i]:edges[i + 1]] for name, a in side.items()},
             streams[i], entries[i]) for i, q in enumerate(part)], max_id


def encode_arrays(codec: Codec, settings: dict, part: list, arrays: list) -> tuple[list, int]:
    tid, tval, lp_next, tail = arrays
    return encode_batch(codec, settings, part, tid, tval, lp_next, tail)


class _ShardBuilder:
    def __init__(self, model, head: T.TeacherHead, codec: Codec, settings: dict, backend):
        self.model, self.head, self.codec, self.s, self.backend = model, head, codec, settings, backend
        self.device = head.weight.device

    def _put(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    @torch.no_grad()
    def run(self, index: int, seqs: list[np.ndarray], bar, pipe: HostPipeline) -> None:
        """Enqueue shard `index`'s batches: device work here, encoding in `pipe` (no host sync here
        beyond what the head ops do)."""
        s = self.s
        gen = None
        if s["mode"] == "sample":
            gen = torch.Generator(device=self.device)
            gen.manual_seed(_shard_seed(s["seed"], index))
        for batch in _batches([len(q) for q in seqs], s["tokens_per_batch"]):
            part = [seqs[i] for i in batch]
            lens = np.array([len(q) for q in part], dtype=np.int64)
            width = int(lens.max())
            ids = np.zeros((len(part), width), dtype=np.int64)
            mask = np.zeros_like(ids)
            nxt = np.zeros(int(lens.sum()), dtype=np.int64)   # next token per row, 0 at a sequence's end
            starts = np.cumsum(lens) - lens
            for b, q in enumerate(part):
                ids[b, :len(q)] = q
                mask[b, :len(q)] = 1
                nxt[starts[b]:starts[b] + len(q) - 1] = q[1:]
            flat = (np.arange(len(part))[:, None] * width + np.arange(width)[None, :])[mask.astype(bool)]
            last = np.zeros(int(lens.sum()), dtype=bool)
            last[starts + lens - 1] = True
            ids_d, mask_d = self._put(ids), self._put(mask)
            flat_d, nxt_d, last_d = self._put(flat), self._put(nxt), self._put(last)
            hidden = T.hidden_states(self.model, ids_d, mask_d)
            rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_d)   # (N, H), sequence-major
            if s["mode"] == "topk":
                res = self.head.topk(rows, s["k"], s["temperature"], backend=self.backend)
                tid, tval = res.ids, res.logprobs
                inside = torch.logsumexp(res.logprobs.double(), 1).clamp_max(0.0)
                tail = torch.log(-torch.expm1(inside)).float()
            else:
                res = self.head.sample(rows, s["draws"], s["temperature"], generator=gen,
                                       backend=self.backend)
                tid, tval, tail = res.ids, res.weights, None
            lp_next = self.head.logprob_of(rows, nxt_d, res.logsumexp, s["temperature"])
            lp_next = torch.where(last_d, torch.nan, lp_next)
            # ids < 2^31: half the copy; the codec takes any integer dtype
            pipe.add_batch(part, to_host([tid.to(torch.int32), tval, lp_next, tail]))
            bar.update(int(lens.sum()))


def build(model_or_path, texts_or_files, out_dir, *, mode: str = "topk", k: int = 64,
          draws: int = 64, temperature: float = 1.0, seq_len: int = 512,
          tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH, lossless: bool = False,
          gguf_file: Optional[str] = None, pack: bool = True, text_field: str = "text",
          seed: int = 0, shard_tokens: int = DEFAULT_SHARD_TOKENS,
          value_step: float = DEFAULT_VALUE_STEP, dtype="float32", device=None,
          backend: Optional[str] = None, progress: bool = True,
          host_workers: Optional[int] = None) -> Path:
    """Build (or finish building) a teacher cache in `out_dir`; returns its path.

    model_or_path: a model directory or .gguf file (loaded offline with `dtype` on `device`), a
    (model, tokenizer) pair, or a model alone (then the data must be token ids).
    texts_or_files: see kdkernels.cache.data (str = text, Path = file/dataset, list of ints = ids).
    backend: for linear_topk / linear_sample; default "torch" on CPU, "auto" on GPU (recorded in
    the settings: backends may differ in the last bits).
    host_workers: threads that encode and write while the device runs the next batches (default
    pipeline.default_workers(); 0 = inline). Does not change a byte of the result.
    Rerunning the same call finishes an interrupted build with identical bytes; a different call into
    the same directory raises SettingsMismatch. Under torchrun the shards are split across ranks.
    """
    if mode not in ("topk", "sample"):
        raise ValueError(f"mode must be 'topk' or 'sample', got {mode!r}")
    for name, v in (("k", k), ("draws", draws), ("seq_len", seq_len),
                    ("tokens_per_batch", tokens_per_batch), ("shard_tokens", shard_tokens)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not (0 < value_step <= 1):
        raise ValueError(f"value_step must be in (0, 1], got {value_step!r}")
    out = Path(out_dir)
    rank, world, dist, owned_group = _dist_context()
    try:
        if device is None:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        model, tok, path, gguf = _load(model_or_path, gguf_file, dtype, device)
        head = T.teacher_head(model)
        vocab = head.vocab_size
        if backend is None:
            # the reference backend on CPU (bytes then do not depend on which extensions are built)
            backend = "torch" if head.weight.device.type == "cpu" else "auto"
        if mode == "topk" and k > vocab:
            raise ValueError(f"k={k} exceeds the teacher's vocabulary size {vocab}")
        seqs: Sequences = tokenize(texts_or_files, tok, seq_len, pack, text_field)
        if len(seqs) == 0:
            raise ValueError("the data holds no sequence of at least 2 tokens")
        if int(seqs.tokens.max()) >= vocab:
            raise ValueError(f"token id {int(seqs.tokens.max())} >= the teacher's vocabulary size {vocab}")
        shard_sequences = max(1, shard_tokens // seq_len)
        num_shards = -(-len(seqs) // shard_sequences)
        codec = Codec(mode, vocab, k if mode == "topk" else draws, bool(lossless),
                      float(value_step))
        teacher = {"path": path, "gguf_file": gguf, "class": type(model).__name__,
                   "config_sha256": T.config_hash(model), "tokenizer_sha256": T.tokenizer_hash(tok),
                   "vocab_size": vocab, "dtype": str(head.weight.dtype).replace("torch.", ""),
                   "logit_scale": head.scale, "final_logit_softcapping": head.softcap}
        settings = {"mode": mode, "k": k if mode == "topk" else None,
                    "draws": draws if mode == "sample" else None,
                    "temperature": float(temperature), "seq_len": seq_len, "pack": bool(pack),
                    "lossless": bool(lossless), "value_step": codec.encodings["value_step"],
                    "seed": seed if mode == "sample" else None, "shard_sequences": shard_sequences,
                    "tokens_per_batch": tokens_per_batch, "backend": backend,
                    "teacher": {key: teacher[key] for key in ("config_sha256", "tokenizer_sha256",
                                                              "vocab_size", "dtype")},
                    "data": {"sha256": seqs.digest, "documents": seqs.documents,
                             "sequences": len(seqs), "tokens": seqs.num_tokens,
                             "max_token": int(seqs.tokens.max())}}
        from .. import __version__
        existing = M.read(out)
        if existing is not None:
            diff = M.differences(existing["settings"], settings)
            if diff:
                raise M.SettingsMismatch(
                    f"{out} already holds a cache built with different settings; refusing to mix "
                    "them. Use a new directory (or delete this one). Differences:\n  " + "\n  ".join(diff))
            teacher["path"], teacher["gguf_file"] = existing["teacher"]["path"], existing["teacher"]["gguf_file"]
        if existing is not None and existing["complete"]:
            _log.info("kdkernels cache: %s is already complete", out)
            return out
        done = {s["index"]: s for s in existing["shards"]} if existing else {}

        def save(entries: dict) -> None:
            M.write(out, M.compose(settings, teacher, codec.encodings, num_shards,
                                   list(entries.values()), __version__))

        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            if existing is None:
                save(done)
        if dist is not None:
            dist.barrier()
        mine = [j for j in range(num_shards) if j % world == rank]
        todo = [j for j in mine if not (out / M.shard_name(j)).exists()]
        for j in mine:
            if j not in todo and j not in done:
                done[j] = entry_from_file(out / M.shard_name(j))
        def shard_seqs(j):
            return [seqs[i] for i in range(j * shard_sequences, min(len(seqs), (j + 1) * shard_sequences))]
        total = sum(sum(len(q) for q in shard_seqs(j)) for j in todo)
        from tqdm.auto import tqdm
        builder = _ShardBuilder(model, head, codec, settings, backend)
        start = time.perf_counter()
        desc = "cache build" + (f" rank {rank}/{world}" if world > 1 else "")
        with tqdm(total=total, unit="tok", unit_scale=True, desc=desc, disable=not progress,
                  dynamic_ncols=True) as bar:
            if rank == 0 and todo != mine:
                save(done)
            def writer(j):
                def write(encoded, max_id):
                    done[j] = write_shard(out / M.shard_name(j), j, encoded, max_id)
                    if rank == 0:
                        save(done)
                return write
            with HostPipeline(functools.partial(encode_arrays, codec, settings),
                              workers=host_workers) as pipe:
                for j in todo:
                    builder.run(j, shard_seqs(j), bar, pipe)
                    pipe.end_shard(writer(j))
        elapsed = time.perf_counter() - start
        if total:
            _log.info("kdkernels cache: rank %d built %d tokens in %.1f s (%.0f tokens/s)",
                      rank, total, elapsed, total / max(elapsed, 1e-9))
        if dist is not None:
            dist.barrier()
        if rank == 0:
            for j in range(num_shards):
                if j not in done:
                    done[j] = entry_from_file(out / M.shard_name(j))
            save(done)
            for leftover in out.glob("*.tmp"):
                leftover.unlink()
        if dist is not None:
            dist.barrier()
        return out
    finally:
        if owned_group and dist is not None:
            dist.destroy_process_group()
