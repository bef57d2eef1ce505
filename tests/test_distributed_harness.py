"""One gloo process group per world size (spawned on 127.0.0.1) runs the checks of every
distributed test module; the pytest processes only read what each rank measured.

Spawning costs seconds per process on a 2-core machine, so the vocab-parallel suite
(test_distributed_vocab.suite) and the data-parallel suite (test_distributed_dp.suite) share one
group per world size. A suite returns {check name: measurements or a traceback string}; an
exception inside one check is recorded, not raised, and a 180 s collective timeout turns a hang
into a failure.
"""
from __future__ import annotations

import importlib
import os
import socket
import tempfile
import traceback
from datetime import timedelta

import torch

SUITES = ("test_distributed_vocab", "test_distributed_dp")
_RESULTS: dict = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=180))
    res = {}
    try:
        for name in SUITES:
            try:
                res[name] = importlib.import_module(name).suite(rank, world, dist.group.WORLD)
            except Exception:
                res[name] = traceback.format_exc()
    finally:
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def results(world: int, suite: str) -> list:
    """Per rank, the dict that `suite` measured in the `world`-process group."""
    if world not in _RESULTS:
        import torch.multiprocessing as mp
        with tempfile.TemporaryDirectory() as tmp:
            try:
                mp.start_processes(_worker, args=(world, _free_port(), tmp), nprocs=world,
                                   start_method="spawn")
                why = "no result file"
            except mp.ProcessRaisedException as e:   # keep what the other ranks measured
                why = str(e)
            _RESULTS[world] = [torch.load(f) if os.path.exists(f) else {}
                               for f in (os.path.join(tmp, f"rank{r}.pt") for r in range(world))]
            _RESULTS[(world, "why")] = why
    out = []
    for rank, res in enumerate(_RESULTS[world]):
        got = res.get(suite, f"rank {rank} wrote no result: {_RESULTS[(world, 'why')]}")
        if isinstance(got, str):
            raise AssertionError(f"suite {suite} failed on rank {rank}:\n{got}")
        out.append(got)
    return out
