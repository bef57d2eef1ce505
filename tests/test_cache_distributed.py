"""`torchrun --nproc_per_node=2 -m kdkernels cache build` (gloo on CPU) writes the same cache, byte
for byte, as a 1-process build: each rank builds the shards j with j % 2 == rank, rank 0 writes the
one manifest."""
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdkernels
import kdkernels.cache as C

from test_distributed_harness import _free_port

pytest.importorskip("transformers")
REPO = Path(kdkernels.__file__).resolve().parents[1]



def _rank_main(rank, port, model_tok, texts, out, opts):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    C.build(model_tok, texts, out, progress=False, **opts)


def test_two_gloo_processes_equal_one_process(tmp_path):
    """Two forked ranks (gloo, CPU) split the shards; the result equals a 1-process build."""
    import multiprocessing
    from kdkernels.cache.testing import tiny_teacher
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    tiny = tiny_teacher(vocab_size=1031)
    texts = [inspect.getdoc(o) or "" for o in (inspect, os.path, subprocess.run)]
    opts = dict(k=8, seq_len=64, shard_tokens=128, tokens_per_batch=128)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = C.build(tiny, texts, tmp_path / "one", progress=False, **opts)
    finally:
        torch.set_num_threads(n)
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, tiny, texts, tmp_path / "two", opts))
             for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0]
    files = lambda d: {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}
    assert C.manifest.read(tmp_path / "two")["num_shards"] >= 4
    assert files(tmp_path / "two") == files(one)


@pytest.mark.slow   # ~60 s on 2 busy cores: torchrun starts three fresh interpreters
def test_torchrun_two_processes_equal_one_process(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    from kdkernels.cache.testing import tiny_teacher
    model, tok = tiny_teacher(vocab_size=1031)
    model.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    data = tmp_path / "data.jsonl"
    import json
    docs = [inspect.getdoc(o) or "" for o in (json, inspect, os.path, subprocess.run)]
    data.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    opts = dict(k=8, seq_len=64, shard_tokens=256, tokens_per_batch=256)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = C.build(str(tmp_path / "teacher"), [data], tmp_path / "one", progress=False, **opts)
    finally:
        torch.set_num_threads(n)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "kdkernels", "cache", "build", str(tmp_path / "teacher"), str(data),
           "-o", str(tmp_path / "two"), "--no-progress"]
    for key, v in opts.items():
        cmd += [f"--{key.replace('_', '-')}", str(v)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rank 1/2" not in res.stdout                # progress bars off, one summary printed
    m = C.manifest.read(tmp_path / "two")
    assert m["complete"] and m["num_shards"] >= 4
    files = lambda d: {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}
    assert files(tmp_path / "two") == files(one)
    assert C.verify(tmp_path / "two") == []
