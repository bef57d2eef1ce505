"""Timing: warm-up, then `reps` timed calls; median, p20, p80 in milliseconds.

On CUDA every call is bracketed by torch.cuda.synchronize(), so a row is the wall time of the
op's kernels, launch overhead included (what a training step pays).
"""
from __future__ import annotations

import time
from typing import Callable

import torch


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device_type: str, reps: int = 5, warmup: int = 1,
            max_seconds: float = 30.0) -> dict:
    """{'median', 'p20', 'p80', 'reps'} of fn() in ms. Stops early after max_seconds of timed
    calls (at least 1 call), so a slow provider cannot stall a sweep."""
    for _ in range(warmup):
        fn()
    _sync(device_type)
    times = []
    t_all = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device_type)
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - t_all > max_seconds:
            break
    t = torch.tensor(times, dtype=torch.float64)
    return {"median": float(torch.quantile(t, 0.5)), "p20": float(torch.quantile(t, 0.2)),
            "p80": float(torch.quantile(t, 0.8)), "reps": len(times)}
