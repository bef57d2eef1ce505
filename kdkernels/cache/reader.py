"""Reading a cache: random access by sequence over memory-mapped shards, a torch Dataset, collate.

Alignment (docs/cache-format.md): row t of a sequence holds the teacher's distribution over token
t+1 given tokens 0..t, i.e. exactly what the student's logits at position t predict. collate() gives
labels[t] = input_ids[t+1], so a batch's teacher rows, student rows and labels line up without shifts.
"""
from __future__ import annotations

import bisect
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from . import manifest as M
from .codec import Codec
from .shard import CorruptShard, Shard


class CacheReader(torch.utils.data.Dataset):
    """`open(dir)`: len() sequences; reader[i] -> dict of tensors (see `__getitem__`).

    Attributes: mode ("topk" | "sample"), values ("logprobs" | "weights", the `values=` of
    fused_linear_sparse_kd_loss), k (the most entries per position: k, or draws for sampled caches),
    draws, temperature, vocab_size, manifest. Safe to pickle into DataLoader workers (each process
    maps the shards itself) and to index through a DistributedSampler.
    """

    def __init__(self, directory: Union[str, Path], *, allow_incomplete: bool = False):
        self.directory = Path(directory)
        m = M.read(self.directory)
        if m is None:
            raise FileNotFoundError(f"no kdkernels cache in {self.directory} (manifest.json missing)")
        if not m["complete"] and not allow_incomplete:
            raise ValueError(f"the cache in {self.directory} is incomplete ({len(m['shards'])} of "
                             f"{m['num_shards']} shards): rerun the same build command to finish it, "
                             "or pass allow_incomplete=True to read the complete shards")
        self.manifest = m
        self.mode: str = m["mode"]
        self.values: str = m["values"]
        self.temperature: float = float(m["temperature"])
        self.vocab_size: int = int(m["vocab_size"])
        self.draws: Optional[int] = m["draws"]
        self.k: int = int(m["k"] if self.mode == "topk" else m["draws"])
        st = m["settings"]
        enc = m["encodings"]
        self.codec = Codec(self.mode, self.vocab_size, self.k, bool(st["lossless"]),
                           float(enc["value_step"] or 1.0))
        self.shards = [Shard(self.directory / s["name"], s["bytes"]) for s in m["shards"]]
        counts = [s["sequences"] for s in m["shards"]]
        self._starts = list(np.cumsum([0] + counts))

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range for a cache of {n} sequences")
        s = bisect.bisect_right(self._starts, i) - 1
        return s, i - self._starts[s]

    def __getitem__(self, i: int) -> dict:
        """input_ids (L,) int64; teacher_ids (L, m) int64, -1 = empty slot; teacher_values (L, m)
        float32 (log-probs sorted descending for top-k, m = k; count/draws with ids ascending for
        sampled caches, m = the most unique ids at any position of this sequence);
        teacher_logprob_next (L,) float32, log p_teacher(input_ids[t+1]) at the cache temperature,
        NaN at t = L-1; top-k caches also teacher_tail_logmass (L,) = log(1 - sum of the k probs)."""
        s, j = self.locate(int(i))
        shard = self.shards[s]
        side, stream = shard.sequence(j)
        L = side["tokens"].shape[0]
        try:
            ids, vals = self.codec.decode(stream, side, L)
        except ValueError as e:
            raise CorruptShard(f"shard {shard.path.name}: sequence {j} does not decode: {e}") from None
        out = {"input_ids": torch.from_numpy(side["tokens"].astype(np.int64)),
               "teacher_ids": torch.from_numpy(ids),
               "teacher_values": torch.from_numpy(vals),
               "teacher_logprob_next": torch.from_numpy(self.codec.scalars(side["lp_next"]))}
        if "tail" in side:
            out["teacher_tail_logmass"] = torch.from_numpy(self.codec.scalars(side["tail"]))
        return out

    def check_compatible(self, tokenizer_or_vocab_size, vocab_size: Optional[int] = None) -> int:
        """Raise ValueError naming both sides if a student cannot train on this cache; return the
        vocabulary size V to pass to the loss.

        tokenizer: its vocabulary hash must equal the teacher tokenizer's (same text -> ids).
        int: the student's LM-head size must equal the teacher's, unless `vocab_size` names a common
        prefix (docs/semantics.md, "Vocabulary sizes") that holds every cached id and token."""
        m = self.manifest
        cache_v = self.vocab_size
        if isinstance(tokenizer_or_vocab_size, int):
            student_v = tokenizer_or_vocab_size
            who = f"student vocab_size {student_v}"
        else:
            from ..teacher import tokenizer_hash
            tok = tokenizer_or_vocab_size
            mine, theirs = tokenizer_hash(tok), m["teacher"]["tokenizer_sha256"]
            if theirs is None:
                raise ValueError(f"the cache in {self.directory} was built from token ids without a "
                                 "tokenizer; check the student by vocab size instead")
            if mine != theirs:
                raise ValueError(
                    f"tokenizer mismatch: the student's tokenizer {type(tok).__name__} "
                    f"({len(tok)} tokens, sha256 {mine[:12]}) differs from the teacher's tokenizer "
                    f"of the cache {self.directory} ({m['teacher']['class']}, vocab {cache_v}, "
                    f"sha256 {theirs[:12]})")
            student_v = None
            who = f"student tokenizer {type(tok).__name__}"
        if vocab_size is None:
            if student_v is not None and student_v != cache_v:
                raise ValueError(f"vocabulary mismatch: {who} vs the cache's teacher vocab_size "
                                 f"{cache_v} ({self.directory}); if one is a padded version of the "
                                 f"other pass vocab_size=<common prefix>")
            return cache_v
        limit = min(cache_v, student_v if student_v is not None else cache_v)
        if not isinstance(vocab_size, int) or not 0 < vocab_size <= limit:
            raise ValueError(f"vocab_size={vocab_size!r} must be a positive int <= min({who}, cache "
                             f"vocab_size {cache_v})")
        top = max(m["totals"]["max_id"], m["settings"]["data"].get("max_token", -1))
        if top >= vocab_size:
            raise ValueError(f"vocab_size={vocab_size} is too small for the cache {self.directory}: "
                             f"it holds token id {top}")
        return vocab_size

    def collate(self, batch: list, pad_id: int = 0, ignore_index: int = -100) -> dict:
        return collate(batch, pad_id=pad_id, ignore_index=ignore_index)


def collate(batch: list, pad_id: int = 0, ignore_index: int = -100) -> dict:
    """Right-pad reader items into a batch.

    input_ids (B, L) pad_id at padding; attention_mask (B, L) 1 on real tokens; labels (B, L) with
    labels[b, t] = input_ids[b, t+1], ignore_index at each sequence's last token and at padding;
    teacher_ids (B, L, m) -1 and teacher_values (B, L, m) 0 at padding (m = widest item);
    teacher_logprob_next (B, L) NaN at padding; teacher_tail_logmass (B, L) when present."""
    if not batch:
        raise ValueError("collate needs at least one item")
    B = len(batch)
    L = max(int(x["input_ids"].shape[0]) for x in batch)
    m = max(int(x["teacher_ids"].shape[1]) for x in batch)
    out = {"input_ids": torch.full((B, L), pad_id, dtype=torch.int64),
           "attention_mask": torch.zeros((B, L), dtype=torch.int64),
           "labels": torch.full((B, L), ignore_index, dtype=torch.int64),
           "teacher_ids": torch.full((B, L, m), -1, dtype=torch.int64),
           "teacher_values": torch.zeros((B, L, m), dtype=torch.float32),
           "teacher_logprob_next": torch.full((B, L), float("nan"), dtype=torch.float32)}
    tail = all("teacher_tail_logmass" in x for x in batch)
    if tail:
        out["teacher_tail_logmass"] = torch.full((B, L), float("nan"), dtype=torch.float32)
    for b, x in enumerate(batch):
        n, w = x["input_ids"].shape[0], x["teacher_ids"].shape[1]
        out["input_ids"][b, :n] = x["input_ids"]
        out["attention_mask"][b, :n] = 1
        out["labels"][b, :n - 1] = x["input_ids"][1:]
        out["teacher_ids"][b, :n, :w] = x["teacher_ids"]
        out["teacher_values"][b, :n, :w] = x["teacher_values"]
        out["teacher_logprob_next"][b, :n] = x["teacher_logprob_next"]
        if tail:
            out["teacher_tail_logmass"][b, :n] = x["teacher_tail_logmass"]
    return out
