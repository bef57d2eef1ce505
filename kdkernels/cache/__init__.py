"""Teacher caches: run a teacher once, store top-k or sampled distributions compactly and
crash-safe, stream them back into training. Format: docs/cache-format.md; guide: docs/caches.md.

    kdkernels.cache.build(model_or_path, texts_or_files, out_dir, mode="topk", k=64, ...) -> Path
    reader = kdkernels.cache.open(out_dir)      # len(reader), reader[i] -> dict of tensors
    batch = kdkernels.cache.collate([reader[0], reader[1]])

Importing this package does not import transformers (only build() does).
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from .builder import build
from .integrity import verify
from .manifest import SettingsMismatch
from .reader import CacheReader, collate
from .shard import CorruptShard
from .summary import summarize


def open(directory: Union[str, Path], *, allow_incomplete: bool = False) -> CacheReader:  # noqa: A001
    """A reader over the cache in `directory` (memory-mapped shards, random access by sequence)."""
    return CacheReader(directory, allow_incomplete=allow_incomplete)


__all__ = ["build", "open", "collate", "verify", "summarize", "CacheReader", "CorruptShard",
           "SettingsMismatch"]
