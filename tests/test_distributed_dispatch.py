"""Which module runs the shard passes under process_group= (no process group needed)."""
from __future__ import annotations

import subprocess
import sys
import types

import pytest

import kdkernels
from kdkernels.distributed import shard_dispatch, shard_torch


def _fake_backend(with_passes: bool):
    mod = types.ModuleType("fake_backend")
    if with_passes:
        for names in shard_dispatch.SHARD_OPS.values():
            for n in names:
                setattr(mod, n, getattr(shard_torch, n))
    return mod


@pytest.mark.parametrize("op", list(shard_dispatch.SHARD_OPS))
def test_explicit_backend_without_shard_passes_raises(monkeypatch, op):
    monkeypatch.setattr(shard_dispatch, "resolve", lambda name, dev, op_: _fake_backend(False))
    with pytest.raises(kdkernels.BackendUnavailable, match="does not export the shard passes"):
        shard_dispatch.resolve_shard("native", "cpu", op)


@pytest.mark.parametrize("op", list(shard_dispatch.SHARD_OPS))
def test_resolution(monkeypatch, op):
    fake = _fake_backend(True)
    monkeypatch.setattr(shard_dispatch, "resolve", lambda name, dev, op_: fake)
    assert shard_dispatch.resolve_shard("native", "cpu", op) is fake       # exports them: used
    assert shard_dispatch.resolve_shard("torch", "cpu", op) is shard_torch
    monkeypatch.setattr(shard_dispatch, "resolve", lambda name, dev, op_: _fake_backend(False))
    assert shard_dispatch.resolve_shard(None, "cpu", op) is shard_torch     # auto: reference passes


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        shard_dispatch.resolve_shard("cuda", "cpu", "kd_loss")


def test_import_touches_no_process_group():
    code = ("import torch.distributed as d, kdkernels, kdkernels.distributed; "
            "print(d.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
