"""Peak extra memory of a callable, on CPU and on CUDA.

CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the memory allocated
before the call.
CPU: tracemalloc does not see torch's allocator, so the call runs under torch.profiler with
profile_memory=True; every tensor allocation and free is an event ([memory], +/- bytes, time).
Sorting the events by time and taking the running sum gives the live bytes allocated by torch
during the call; its maximum is the peak extra memory (tensors freed during the call that were
allocated before it count negatively, so the figure is the peak above the starting point).
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable

import torch


@contextlib.contextmanager
def _quiet_fd2():
    """Kineto prints start/stop lines on the C-level stderr; hide them during profiling."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile
    with _quiet_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cpu = torch.autograd.DeviceType.CPU
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == cpu)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def cuda_peak_bytes(fn: Callable[[], object], device=None) -> int:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def peak_bytes(fn: Callable[[], object], device_type: str = "cpu") -> int:
    """Peak memory allocated by torch during fn() above what was allocated before it."""
    return cuda_peak_bytes(fn) if device_type == "cuda" else cpu_peak_bytes(fn)
