"""python/train_minimal.py end to end on CPU: a tiny cache built by kdkernels.cache, a student from
a config.json, a few steps, a checkpoint, and a resume that continues from it."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_minimal_runs_and_resumes(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    from kdkernels import cache
    cfg = LlamaConfig(vocab_size=1031, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 1031, (40,), generator=g).tolist() for _ in range(6)]
    path = cache.build(teacher, docs, tmp_path / "cache", k=8, seq_len=16, progress=False)
    student_cfg = tmp_path / "student.json"
    cfg.to_json_file(str(student_cfg))
    cmd = [sys.executable, str(ROOT / "python" / "train_minimal.py"), "--cache", str(path),
           "--student", str(student_cfg), "--batch-size", "2", "--grad-accum", "2",
           "--out", str(tmp_path / "ckpt"), "--save-every", "2", "--lr", "1e-3", "--ce-weight", "0.5"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    first = subprocess.run(cmd + ["--steps", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    loss = float(re.search(r"step 2\s+loss (\S+)", first.stdout).group(1))
    assert 0 < loss < 20
    assert (tmp_path / "ckpt" / "checkpoint.pt").exists()
    second = subprocess.run(cmd + ["--steps", "3"], capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed at step 2" in second.stdout and re.search(r"step 3\s+loss", second.stdout)
