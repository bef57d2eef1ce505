"""Shard files: a header and 64-byte-aligned arrays, memory-mapped for random access by sequence.

Layout (docs/cache-format.md, "Shard files"), all little-endian:

    b"KDKSHARD" | u32 format version | u32 n = len(header) | header (n bytes of JSON) | u32 crc32(header)
    zero padding to a multiple of 64, then each section at its recorded 64-aligned offset.

Sections: seq_tok (S+1) i8 token offsets, seq_byte (S+1) i8 stream byte offsets, seq_crc (S) u4,
then per-position arrays (tokens, lp_next, tail, vbase, vrice, vlen, count, values (T, k)) and `stream`
(the concatenated byte-aligned per-sequence bit streams, plus 8 zero bytes so 64-bit reads never run
past the end). seq_crc[s] = crc32 over sequence s's rows of every per-position section (in section
order) and then its stream bytes; the header stores crc32 of the three index sections. A reader checks
file size, magic, header crc and index crc on open, and the sequence crc on every read, so a corrupted
or truncated shard raises `CorruptShard` instead of returning garbage. Writers write `name.tmp`,
fsync, rename and fsync the directory: a file under its final name is always complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import zlib
from pathlib import Path
from typing import Optional

import numpy as np

MAGIC = b"KDKSHARD"
SHARD_VERSION = 1
ALIGN = 64
PAD = 8
INDEX = ("seq_tok", "seq_byte", "seq_crc")
PER_POSITION = ("tokens", "lp_next", "tail", "vbase", "vrice", "vlen", "count", "values")


class CorruptShard(ValueError):
    """A shard file is missing, truncated or does not match its checksums."""


def crash_point(name: str) -> None:
    """Test hook: env KDKERNELS_CACHE_CRASH="name:n" SIGKILLs this process the n-th time (1-based)
    execution reaches `name`. Used by the kill-and-resume tests; a no-op otherwise."""
    spec = os.environ.get("KDKERNELS_CACHE_CRASH")
    if not spec:
        return
    point, _, count = spec.partition(":")
    if point != name:
        return
    hits = _crash_hits.get(name, 0) + 1
    _crash_hits[name] = hits
    if hits >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


_crash_hits: dict = {}


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, point: Optional[str] = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if point:
        crash_point(point)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _seq_crc(sections: dict, t0: int, t1: int, b0: int, b1: int) -> int:
    """crc32 of a sequence's rows of every per-position section (in file order), then its stream."""
    crc = 0
    for name, arr in sections.items():
        if name not in INDEX and name != "stream":
            crc = zlib.crc32(memoryview(np.ascontiguousarray(arr[t0:t1])).cast("B"), crc)
    return zlib.crc32(memoryview(np.ascontiguousarray(sections["stream"][b0:b1])).cast("B"), crc)


def _index_crc(sections: dict) -> int:
    crc = 0
    for name in INDEX:
        crc = zlib.crc32(np.ascontiguousarray(sections[name]).tobytes(), crc)
    return crc


def write_shard(path: Path, shard_index: int, sequences: list, max_id: int) -> dict:
    """Write one shard atomically. `sequences`: list of (tokens (L,), side dict, stream uint8, number of
    entries) with identical side-array names. Returns its manifest entry (name, counts, bytes, sha256)."""
    names = [n for n in PER_POSITION if sequences and n in sequences[0][1]] if sequences else []
    tok_dtype = sequences[0][0].dtype if sequences else np.dtype("<u2")
    sections: dict = {"tokens": np.concatenate([s[0] for s in sequences]).astype(tok_dtype)
                      if sequences else np.zeros(0, tok_dtype)}
    for n in names:
        sections[n] = np.concatenate([s[1][n] for s in sequences])
    lengths = np.array([len(s[0]) for s in sequences], dtype=np.int64)
    sizes = np.array([s[2].size for s in sequences], dtype=np.int64)
    sections["seq_tok"] = np.concatenate([[0], np.cumsum(lengths)]).astype("<i8")
    sections["seq_byte"] = np.concatenate([[0], np.cumsum(sizes)]).astype("<i8")
    sections["stream"] = np.concatenate([s[2] for s in sequences] + [np.zeros(PAD, np.uint8)])
    crcs = [_seq_crc(sections, int(sections["seq_tok"][i]), int(sections["seq_tok"][i + 1]),
                     int(sections["seq_byte"][i]), int(sections["seq_byte"][i + 1]))
            for i in range(len(sequences))]
    sections["seq_crc"] = np.array(crcs, dtype="<u4")
    order = list(INDEX) + [n for n in PER_POSITION if n in sections] + ["stream"]
    entries = int(sum(s[3] for s in sequences))
    header = {"shard": shard_index, "sequences": len(sequences), "tokens": int(lengths.sum()),
              "entries": entries, "max_id": int(max_id), "index_crc32": _index_crc(sections), "sections": []}
    # Offsets depend on the header length, which depends on the offsets' digits: iterate to a fixpoint.
    start = 0
    for _ in range(8):
        off, table = start, []
        for n in order:
            arr = np.ascontiguousarray(sections[n])
            off = -(-off // ALIGN) * ALIGN
            table.append([n, arr.dtype.str, list(arr.shape), off, arr.nbytes])
            off += arr.nbytes
        header["sections"] = table
        blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        head = MAGIC + struct.pack("<II", SHARD_VERSION, len(blob)) + blob + struct.pack("<I", zlib.crc32(blob))
        new_start = -(-len(head) // ALIGN) * ALIGN
        if new_start == start:
            break
        start = new_start
    total = off
    sha = hashlib.sha256()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        def put(b: bytes) -> None:
            f.write(b)
            sha.update(b)
        put(head + b"\0" * (start - len(head)))
        pos = start
        for i, (n, _, _, o, nb) in enumerate(table):
            put(b"\0" * (o - pos))
            put(np.ascontiguousarray(sections[n]).tobytes())
            pos = o + nb
            if i == len(table) // 2:
                f.flush()
                crash_point("shard_partial")
        f.flush()
        os.fsync(f.fileno())
    crash_point("shard_before_rename")
    os.replace(tmp, path)
    fsync_dir(path.parent)
    crash_point("shard_after_rename")
    return {"name": path.name, "index": shard_index, "sequences": len(sequences),
            "tokens": int(lengths.sum()), "entries": entries, "max_id": int(max_id), "bytes": total,
            "sha256": sha.hexdigest()}


def entry_from_file(path: Path) -> dict:
    """The manifest entry of a complete shard file (used when resuming)."""
    h = Shard(path).open().header
    return {"name": Path(path).name, "index": h["shard"], "sequences": h["sequences"],
            "tokens": h["tokens"], "entries": h["entries"], "max_id": h["max_id"],
            "bytes": Path(path).stat().st_size, "sha256": file_sha256(path)}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class Shard:
    """A memory-mapped shard. Opening checks size, magic, header and index checksums; `sequence(i)`
    checks that sequence's crc32. Picklable: the map is reopened lazily in each process."""

    def __init__(self, path: Path, expected_bytes: Optional[int] = None):
        self.path = Path(path)
        self.expected_bytes = expected_bytes
        self._mm = None
        self._sections: dict = {}
        self.header: dict = {}

    def __getstate__(self):
        return {"path": self.path, "expected_bytes": self.expected_bytes}

    def __setstate__(self, state):
        self.__init__(state["path"], state["expected_bytes"])

    def _fail(self, why: str):
        raise CorruptShard(f"shard {self.path.name} ({self.path}) is corrupted: {why}; "
                           f"run `kdkernels cache verify {self.path.parent}`")

    def open(self) -> "Shard":
        if self._mm is not None:
            return self
        if not self.path.exists():
            raise CorruptShard(f"shard {self.path.name} is missing ({self.path})")
        size = self.path.stat().st_size
        if self.expected_bytes is not None and size != self.expected_bytes:
            self._fail(f"{size} bytes on disk, the manifest lists {self.expected_bytes} (truncated?)")
        if size < 16:
            self._fail("shorter than a header")
        mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        if bytes(mm[:8]) != MAGIC:
            self._fail("bad magic")
        version, n = struct.unpack("<II", bytes(mm[8:16]))
        if version != SHARD_VERSION:
            self._fail(f"shard format version {version}, this kdkernels reads {SHARD_VERSION}")
        if 20 + n > size:
            self._fail("header runs past the end of the file")
        blob = bytes(mm[16:16 + n])
        (crc,) = struct.unpack("<I", bytes(mm[16 + n:20 + n]))
        if zlib.crc32(blob) != crc:
            self._fail("header checksum mismatch")
        header = json.loads(blob)
        sections = {}
        for name, dtype, shape, off, nbytes in header["sections"]:
            if name not in INDEX + PER_POSITION + ("stream",):
                self._fail(f"unknown section {name!r} (written by another kdkernels version?)")
            if off + nbytes > size:
                self._fail(f"section {name!r} runs past the end of the file (truncated)")
            sections[name] = mm[off:off + nbytes].view(np.dtype(dtype)).reshape(shape)
        if _index_crc(sections) != header["index_crc32"]:
            self._fail("index checksum mismatch")
        self._mm, self._sections, self.header = mm, sections, header
        return self

    def __len__(self) -> int:
        return int(self.open().header["sequences"])

    @property
    def sections(self) -> dict:
        return self.open()._sections

    def sequence(self, i: int) -> tuple[dict, np.ndarray]:
        """(per-position slices, stream bytes with 8 bytes of padding) of local sequence i."""
        s = self.sections
        t0, t1 = int(s["seq_tok"][i]), int(s["seq_tok"][i + 1])
        b0, b1 = int(s["seq_byte"][i]), int(s["seq_byte"][i + 1])
        if not (0 <= t0 <= t1 <= s["tokens"].shape[0] and 0 <= b0 <= b1 <= s["stream"].shape[0] - PAD):
            self._fail(f"sequence {i} has offsets outside the file")
        if _seq_crc(s, t0, t1, b0, b1) != int(s["seq_crc"][i]):
            self._fail(f"checksum mismatch in sequence {i}")
        side = {n: s[n][t0:t1] for n in PER_POSITION if n in s}
        return side, s["stream"][b0:b1 + PAD]

    def check_all(self) -> None:
        for i in range(len(self)):
            self.sequence(i)
