"""Training text -> token sequences for a cache build.

Inputs (a list mixing any of):
  - `str`: one document's text (a string is never taken for a file name);
  - `pathlib.Path` to a text file (one document), a `.jsonl` file (one document per line, the
    `text_field` of each JSON object), a directory saved by `datasets.save_to_disk` (the `text_field`
    column), or a directory of such files (sorted by name, recursively);
  - a sequence of ints: one already tokenized document.
Documents are tokenized without special tokens and each is followed by the tokenizer's EOS id when
it has one. `pack=True` concatenates all documents into one stream cut into `seq_len` pieces;
`pack=False` cuts every document on its own. Pieces shorter than 2 tokens (no next token) are dropped.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


def _is_hf_dataset_dir(p: Path) -> bool:
    return (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or \
        (p / "state.json").exists()


def _path_documents(p: Path, text_field: str) -> Iterator[str]:
    if p.is_dir():
        if _is_hf_dataset_dir(p):
            import datasets
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                splits = [ds[name] for name in sorted(ds)]
            else:
                splits = [ds]
            for split in splits:
                if text_field not in split.column_names:
                    raise ValueError(f"dataset {p} has no column {text_field!r} "
                                     f"(columns: {split.column_names}); pass text_field=")
                for row in split:
                    yield row[text_field]
            return
        files = sorted(f for f in p.rglob("*") if f.is_file() and
                       (f.suffix in TEXT_SUFFIXES or f.suffix in (".jsonl", ".json")))
        for f in files:
            yield from _path_documents(f, text_field)
        return
    if not p.exists():
        raise FileNotFoundError(f"data file not found: {p}")
    if p.suffix in (".jsonl", ".json"):
        with p.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                obj = json.loads(line)
                if text_field not in obj:
                    raise ValueError(f"{p}:{n} has no field {text_field!r}; pass text_field=")
                yield obj[text_field]
        return
    yield p.read_text(encoding="utf-8")


def documents(sources: Iterable, text_field: str = "text") -> Iterator:
    """Yield each document as a str or as a list of token ids."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    for src in sources:
        if isinstance(src, str):
            yield src
        elif isinstance(src, os.PathLike):
            yield from _path_documents(Path(src), text_field)
        else:
            yield [int(t) for t in src]


class Sequences:
    """Token sequences held as one int32 array plus offsets; `digest` identifies the content."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, documents: int):
        self.tokens, self.offsets, self.documents = tokens, offsets, documents
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(offsets, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(tokens, dtype="<i4").tobytes())
        self.digest = h.hexdigest()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])


def tokenize(sources, tokenizer, seq_len: int, pack: bool = True,
             text_field: str = "text") -> Sequences:
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    pieces: list = []
    stream: list = []
    ndocs = 0
    for doc in documents(sources, text_field):
        ndocs += 1
        if isinstance(doc, str):
            if tokenizer is None:
                raise ValueError("text documents need a tokenizer; pass (model, tokenizer) or token ids")
            ids = list(tokenizer(doc, add_special_tokens=False)["input_ids"])
        else:
            ids = doc
        if eos is not None:
            ids = ids + [int(eos)]
        if pack:
            stream.extend(ids)
            while len(stream) >= seq_len:
                pieces.append(np.asarray(stream[:seq_len], dtype=np.int32))
                del stream[:seq_len]
        else:
            for s in range(0, len(ids), seq_len):
                pieces.append(np.asarray(ids[s:s + seq_len], dtype=np.int32))
    if pack and stream:
        pieces.append(np.asarray(stream, dtype=np.int32))
    pieces = [p for p in pieces if len(p) >= 2]
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    return Sequences(tokens, offsets, ndocs)
