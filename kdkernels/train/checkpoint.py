"""Checkpoints that make a resumed run continue exactly like an uninterrupted one.

A checkpoint holds everything the next step depends on: model and optimizer state, the step
counter (the sampler and the LR schedule are pure functions of it), the torch RNG state (dropout),
DDK domain weights and statistics, and the log history. Written atomically (tmp file + rename).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import torch

NAME = "checkpoint.pt"


def save(out_dir, *, model, optimizer, scheduler, step: int, extra: dict,
         model_state: Optional[dict] = None, optimizer_state: Optional[dict] = None) -> Path:
    """model_state / optimizer_state: state dicts already gathered (FSDP2: full state dicts from
    kdkernels.distributed.fsdp.full_state); default model.state_dict() / optimizer.state_dict()."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict() if model_state is None else model_state,
             "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
             "scheduler": scheduler.state_dict(), "step": step, "rng_cpu": torch.get_rng_state(),
             "extra": extra}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["rng_cuda"] = torch.cuda.get_rng_state_all()
    tmp = out / (NAME + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / NAME)
    return out / NAME


def load(out_dir, *, model, optimizer, scheduler, map_location=None,
         set_state: Optional[Callable[[dict, dict], None]] = None) -> Optional[tuple[int, dict]]:
    """Restore in place; returns (step, extra), or None when there is no checkpoint.
    set_state(model_state, optimizer_state) replaces model/optimizer.load_state_dict (FSDP2:
    kdkernels.distributed.fsdp.load_full_state)."""
    path = Path(out_dir) / NAME
    if not path.exists():
        return None
    state = torch.load(path, map_location=map_location, weights_only=False)
    if set_state is not None:
        set_state(state["model"], state["optimizer"])
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if "rng_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state["step"], state["extra"]
