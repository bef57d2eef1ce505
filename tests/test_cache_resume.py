"""Crash safety: a build SIGKILLed at any moment and rerun finishes with the same bytes as an
uninterrupted build; the manifest never lists an incomplete shard."""
import inspect
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import kdkernels
import kdkernels.cache as C

pytest.importorskip("transformers")

KW = dict(k=8, seq_len=64, shard_tokens=128, tokens_per_batch=128, progress=False)
REPO = Path(kdkernels.__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread_per_module")   # tests/conftest.py


def _texts():
    import json
    import shutil
    return [inspect.getdoc(o) or "" for o in (json, shutil, shutil.copy, inspect.getdoc)]


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def reference(tiny_cache_teacher, tmp_path_factory):
    return C.build(tiny_cache_teacher, _texts(), tmp_path_factory.mktemp("ref") / "c", **KW)


def _crash_build(model_tok, texts, out, spec):
    os.environ["KDKERNELS_CACHE_CRASH"] = spec
    C.build(model_tok, texts, out, **KW)
    os._exit(0)                               # not reached when the crash point fires


def _assert_manifest_lists_only_complete_shards(d: Path):
    m = C.manifest.read(d) if (d / "manifest.json").exists() else None
    if m is None:
        return
    assert not m["complete"]
    for s in m["shards"]:
        assert C.shard.file_sha256(d / s["name"]) == s["sha256"]


@pytest.mark.parametrize("spec", ["shard_partial:2", "shard_before_rename:1", "shard_after_rename:3",
                                  "manifest_before_rename:1", "manifest_before_rename:4"])
def test_sigkill_at_crash_points_then_rerun_gives_identical_bytes(tiny_cache_teacher, reference, tmp_path, spec):
    out = tmp_path / "c"
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_crash_build, args=(tiny_cache_teacher, _texts(), out, spec))
    p.start()
    p.join(120)
    assert p.exitcode == -signal.SIGKILL, f"the child was not killed at {spec}: exit {p.exitcode}"
    assert out.exists() and _files(out) != _files(reference)
    _assert_manifest_lists_only_complete_shards(out)
    with pytest.raises((ValueError, FileNotFoundError), match="incomplete|manifest.json missing"):
        C.open(out)
    assert C.verify(out)                     # verify reports the incomplete build
    C.build(tiny_cache_teacher, _texts(), out, **KW)
    assert _files(out) == _files(reference)
    assert C.verify(out) == []


@pytest.mark.slow   # ~25 s: a fresh interpreter; the fork-based crash tests above cover the same path
def test_subprocess_killed_mid_build_resumes_identically(tiny_cache_teacher, tmp_path):
    """A real `kdkernels cache build` process, SIGKILLed from outside while it writes shards."""
    model, tok = tiny_cache_teacher
    model_dir = tmp_path / "teacher"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "data.txt"
    data.write_text("\n\n".join(inspect.getdoc(o) or "" for o in (inspect, os, subprocess)) * 2)
    args = ["--k", "8", "--seq-len", "64", "--shard-tokens", "64", "--tokens-per-batch", "64",
            "--no-progress"]
    ref = C.build(str(model_dir), [data], tmp_path / "ref", k=8, seq_len=64, shard_tokens=64,
                  tokens_per_batch=64, progress=False)
    out = tmp_path / "c"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "kdkernels", "cache", "build", str(model_dir),
                             str(data), "-o", str(out)] + args, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("shard-*.kdc"))) < 3:
        if proc.poll() is not None:
            pytest.fail(f"build ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    m = C.manifest.read(out)
    assert m is not None and not m["complete"], "the build finished before the kill: test is void"
    _assert_manifest_lists_only_complete_shards(out)
    C.build(str(model_dir), [data], out, k=8, seq_len=64, shard_tokens=64, tokens_per_batch=64,
            progress=False)
    assert _files(out) == _files(ref)
