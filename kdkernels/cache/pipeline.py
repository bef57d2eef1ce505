"""The host side of a cache build, off the device loop: encode batches and write shards in threads.

The device loop (builder.py) hands over each teacher batch as soon as its head ops are enqueued:
the results travel to pinned host buffers with non-blocking copies and a CUDA event, and a worker
thread waits on that event, then encodes (numpy releases the GIL in its array loops, zlib and
hashlib in their checksums). Shards are written by one writer thread in shard order, which also saves
the manifest after each shard, so the order of file operations, and every byte, is that of the
sequential build: encode_batch is a pure function of its batch, and a shard concatenates its
batches' results in batch order. With workers = 0 everything runs inline (the sequential build).

Threads alone do not scale: the encoder's numpy calls are short and hold the GIL (measured: two
threads encode no faster than one). So workers = 1 is one thread (it overlaps the host work with
the device's), and workers >= 2 are that many encoding processes (spawned, so safe with CUDA),
each fed by a thread of this process that waits for the copy and ships the arrays (a 2,048-token
top-k batch is about 1 MB).

Memory bound: at most `max_batches` encoded-or-pending batches and `max_shards` shards waiting for
the writer; the device loop blocks (on the oldest) beyond that.
"""
from __future__ import annotations

import os
from collections import deque
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np
import torch


def default_workers() -> int:
    """1: one encoding thread. Encoding processes (workers >= 2) are opt-in: on the 2-core machine
    they were measured slower than one thread (docs/caches.md); not yet measured on a many-core one."""
    return 1


def to_host(tensors: list) -> Callable[[], list]:
    """Start the device-to-host copy of `tensors` (None entries pass through); returns a function
    that waits for it and gives numpy arrays. CUDA: one pinned buffer per tensor, non_blocking
    copies on the current stream, one event; the device loop never waits for the copy."""
    dev = next((t.device for t in tensors if t is not None), torch.device("cpu"))
    if dev.type != "cuda":
        host = [None if t is None else t.detach().cpu() for t in tensors]
        return lambda: [None if t is None else t.numpy() for t in host]
    host = [None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for h, t in zip(host, tensors):
        if t is not None:
            h.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record()

    def ready() -> list:
        event.synchronize()
        return [None if h is None else h.numpy() for h in host]
    return ready


class _Done:
    """A finished Future stand-in for the inline path."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value

    def done(self) -> bool:
        return True


class HostPipeline:
    def __init__(self, encode: Callable, workers: Optional[int] = None, max_batches: Optional[int] = None,
                 max_shards: int = 2, processes: Optional[ProcessPoolExecutor] = None):
        """processes: an existing pool to use for workers >= 2 (kept open; benchmarks reuse one)."""
        self.encode = encode                     # (part, arrays) -> (encoded list, max_id)
        self.workers = default_workers() if workers is None else int(workers)
        self.pool = ThreadPoolExecutor(self.workers, "kdk-encode") if self.workers > 0 else None
        self._own_procs = processes is None
        self.procs = None if self.workers < 2 else (
            processes or ProcessPoolExecutor(self.workers, multiprocessing.get_context("spawn")))
        self.writer = ThreadPoolExecutor(1, "kdk-write") if self.workers > 0 else None
        self.max_batches = max_batches or 2 * self.workers + 2
        self.max_shards = max_shards
        self._batches: deque = deque()           # futures of batches not yet claimed by a shard
        self._current: list = []                 # batch futures of the shard being fed
        self._shards: deque = deque()
        self._failed = False

    def __enter__(self) -> "HostPipeline":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.close(cancel=True)
        else:
            self.finish()

    def _job(self, part, fetch):
        if self.procs is not None:
            return self.procs.submit(self.encode, part, fetch()).result()
        return self.encode(part, fetch())

    def add_batch(self, part: list, fetch: Callable[[], list]) -> None:
        """Queue one batch of the current shard: `fetch()` gives its numpy arrays."""
        if self.pool is None:
            self._current.append(_Done(self._job(part, fetch)))
            return
        while len(self._batches) >= self.max_batches:
            self._batches.popleft().result()    # bound memory; raises a worker's error here
        f = self.pool.submit(self._job, part, fetch)
        self._batches.append(f)
        self._current.append(f)

    def end_shard(self, write: Callable[[list, int], None]) -> None:
        """The current shard has all its batches: `write(encoded, max_id)` runs in shard order."""
        batches, self._current = self._current, []

        def job():
            if self._failed:                     # no shard is written after a failed one
                return
            try:
                encoded, max_id = [], -1
                for f in batches:
                    enc, mid = f.result()
                    encoded.extend(enc)
                    max_id = max(max_id, mid)
                write(encoded, max_id)
            except BaseException:
                self._failed = True
                raise
        if self.writer is None:
            job()
            return
        while len(self._shards) >= self.max_shards:
            self._shards.popleft().result()
        self._shards.append(self.writer.submit(job))
        while self._shards and self._shards[0].done():
            self._shards.popleft().result()      # surface a writer error early

    def finish(self) -> None:
        """Wait for every queued shard; raise the first error."""
        try:
            while self._shards:
                self._shards.popleft().result()
        finally:
            self.close(cancel=False)

    def close(self, cancel: bool) -> None:
        for ex in (self.pool, self.writer, self.procs if self._own_procs else None):
            if ex is not None:
                ex.shutdown(wait=True, cancel_futures=cancel)
        self.pool = self.writer = self.procs = None
