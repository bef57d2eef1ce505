"""Building and reading caches with a tiny randomly initialized Llama teacher (CPU, seconds):
cached top-k against torch.topk of the full teacher logits, lossless bit-exactness, sampled caches in
a chi-square test, alignment through collate and the sparse KD loss, refusals and mismatch errors."""
import inspect
import json
import os
import shutil

import numpy as np
import pytest
import torch

import kdkernels
import kdkernels.cache as C
from kdkernels import teacher as T
from kdkernels.cache.builder import DEFAULT_VALUE_STEP

pytest.importorskip("transformers")

STEP = DEFAULT_VALUE_STEP


pytestmark = pytest.mark.usefixtures("one_thread_per_module")   # tests/conftest.py


def _texts(n=6):
    objs = [json, json.dumps, json.loads, inspect, inspect.getdoc, shutil, shutil.copy, os.path.join]
    return [inspect.getdoc(o) or "" for o in objs[:n]]


@pytest.fixture(scope="module")
def caches(tiny_cache_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    kw = dict(seq_len=96, shard_tokens=300, progress=False)
    # tokens_per_batch = seq_len: one sequence per batch, so hidden states can be recomputed exactly
    out = {"topk": C.build(tiny_cache_teacher, _texts(), root / "topk", k=8, tokens_per_batch=96, **kw),
           "lossless": C.build(tiny_cache_teacher, _texts(), root / "lossless", k=8, lossless=True,
                               tokens_per_batch=96, **kw),
           "t2": C.build(tiny_cache_teacher, _texts(3), root / "t2", k=8, temperature=2.0, **kw),
           "sample": C.build(tiny_cache_teacher, _texts(4), root / "sample", mode="sample", draws=64, **kw)}
    return out


def _teacher_lp(tiny_cache_teacher, ids, temperature=1.0):
    """float64 log-softmax of the model's own full logits (its forward pass, not our head), and the
    error plain fp32 PyTorch makes on the same logits (the oracle's yardstick)."""
    model, _ = tiny_cache_teacher
    logits = model(ids[None]).logits[0]
    lp64 = torch.log_softmax(logits.double() / temperature, -1)
    lp32 = torch.log_softmax(logits.float() / temperature, -1)
    return lp64, float((lp32.double() - lp64).abs().max())


@pytest.mark.parametrize("name", ["topk", "lossless", "t2"])
def test_topk_matches_full_teacher_logits(tiny_cache_teacher, caches, name):
    reader = C.open(caches[name])
    T_ = reader.temperature
    bound = (STEP / 2 if name != "lossless" else 0.0)
    assert len(reader) > 3
    for i in (0, 1, len(reader) - 1):
        item = reader[i]
        lp64, fp32_err = _teacher_lp(tiny_cache_teacher, item["input_ids"], T_)
        tol = bound + 4 * fp32_err + 1e-6
        ids, vals = item["teacher_ids"], item["teacher_values"].double()
        assert ids.shape == (item["input_ids"].shape[0], 8)
        # values are the full-vocabulary log-probs at the returned ids
        assert (vals - lp64.gather(1, ids)).abs().max() <= tol
        # every returned id clears the k-th largest; ids strictly above it are all returned
        kth = torch.topk(lp64, 8).values[:, -1:]
        assert (lp64.gather(1, ids) >= kth - 2 * fp32_err - 1e-9).all()
        must = lp64 > kth + 2 * fp32_err + 1e-9
        got = torch.zeros_like(must).scatter_(1, ids, True)
        assert (got | ~must).all()
        assert (torch.diff(vals, dim=1) <= 0).all()
        # next-token log-prob and tail mass
        nxt = lp64[torch.arange(len(ids) - 1), item["input_ids"][1:]]
        lpn = item["teacher_logprob_next"]
        assert torch.isnan(lpn[-1])
        assert (lpn[:-1].double() - nxt).abs().max() <= 2 ** -11 + 4 * fp32_err + 1e-6
        # tail mass 1 - sum_K p: the fp32 log-probs it is computed from carry fp32_err each
        mass = 1 - lp64.gather(1, ids).exp().sum(1)
        got = item["teacher_tail_logmass"].double().exp()
        assert ((got - mass).abs() <= 2 ** -11 * mass + 2 * 8 * fp32_err + 1e-7).all()


def test_lossless_is_bit_exact_linear_topk(tiny_cache_teacher, caches):
    model, _ = tiny_cache_teacher
    reader = C.open(caches["lossless"])
    head = T.teacher_head(model)
    for i in (0, 2):
        item = reader[i]
        h = T.hidden_states(model, item["input_ids"][None])[0]
        ref = kdkernels.linear_topk(h, head.weight, 8, backend="torch")
        assert torch.equal(item["teacher_ids"], ref.ids)
        assert torch.equal(item["teacher_values"], ref.logprobs)


def test_collate_alignment_through_sparse_kd_loss(tiny_cache_teacher, caches):
    """A student identical to the teacher has ~0 forward KL against the lossless cache, and only if
    teacher rows, student rows and labels are aligned; a shift by one position is far from 0."""
    model, _ = tiny_cache_teacher
    reader = C.open(caches["lossless"])
    batch = C.collate([reader[0], reader[len(reader) - 1]], pad_id=0)
    L = batch["input_ids"].shape[1]
    assert batch["teacher_ids"].shape == (2, L, 8)
    n_last = int(batch["attention_mask"][1].sum())
    assert torch.equal(batch["labels"][0, :-1], batch["input_ids"][0, 1:])
    assert (batch["labels"][0, -1] == -100) and (batch["labels"][1, n_last - 1:] == -100).all()
    assert (batch["teacher_ids"][1, n_last:] == -1).all()
    h = T.hidden_states(model, batch["input_ids"], batch["attention_mask"])
    w = T.teacher_head(model).weight
    loss = kdkernels.fused_linear_sparse_kd_loss(h, w, batch["teacher_ids"], batch["teacher_values"],
                                                 labels=batch["labels"], backend="torch")
    assert float(loss) < 1e-4
    shifted = kdkernels.fused_linear_sparse_kd_loss(
        h[:, 1:], w, batch["teacher_ids"][:, :-1], batch["teacher_values"][:, :-1],
        labels=batch["labels"][:, :-1], backend="torch")
    assert float(shifted) > 100 * max(float(loss), 1e-6)


def _pit_pvalue(lp64, ids, weights, draws, rng):
    """Pooled chi-square p-value of randomized PIT values (CDF(j-1) + U p_j of every draw): under
    the teacher's distribution they are iid uniform on (0, 1)."""
    from scipy.stats import chi2
    p = lp64.exp()
    cdf = torch.cumsum(p, 1) / p.sum(1, keepdim=True)
    u = []
    for r in range(ids.shape[0]):
        ok = ids[r] >= 0
        j = ids[r][ok]
        c = torch.round(weights[r][ok] * draws).long()
        lo = torch.where(j > 0, cdf[r, (j - 1).clamp_min(0)], torch.zeros_like(j, dtype=cdf.dtype))
        hi = cdf[r, j]
        lo, hi = torch.repeat_interleave(lo, c), torch.repeat_interleave(hi, c)
        u.append(lo + torch.from_numpy(rng.random(len(lo))) * (hi - lo))
    u = torch.cat(u).numpy()
    counts = np.histogram(u, bins=20, range=(0, 1))[0]
    exp = len(u) / 20
    return chi2.sf(((counts - exp) ** 2 / exp).sum(), 19)


def test_sampled_cache_matches_teacher_probabilities_chi_square(tiny_cache_teacher, caches):
    pytest.importorskip("scipy")
    reader = C.open(caches["sample"])
    assert reader.values == "weights" and reader.k == 64
    rng = np.random.default_rng(0)
    lps, ids, ws = [], [], []
    for i in range(min(len(reader), 6)):
        item = reader[i]
        lp64, _ = _teacher_lp(tiny_cache_teacher, item["input_ids"])
        m = item["teacher_ids"].shape[1]
        assert m <= 64 and torch.allclose(item["teacher_values"].sum(1), torch.ones(1))
        lps.append(lp64)
        ids.append(torch.nn.functional.pad(item["teacher_ids"], (0, 64 - m), value=-1))
        ws.append(torch.nn.functional.pad(item["teacher_values"], (0, 64 - m)))
    lp64, ids, ws = torch.cat(lps), torch.cat(ids), torch.cat(ws)
    assert _pit_pvalue(lp64, ids, ws, 64, rng) > 1e-3
    # the test has power: the same draws against the teacher at temperature 1.3 are rejected
    assert _pit_pvalue(torch.log_softmax(lp64 / 1.3, -1), ids, ws, 64, rng) < 1e-6


def test_rerun_same_settings_is_noop_and_different_settings_refused(tiny_cache_teacher, caches, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(caches["t2"], d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    C.build(tiny_cache_teacher, _texts(3), d, k=8, temperature=2.0, seq_len=96, shard_tokens=300, progress=False)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    with pytest.raises(C.SettingsMismatch, match=r"k: cache has 8, this build asks for 9"):
        C.build(tiny_cache_teacher, _texts(3), d, k=9, temperature=2.0, seq_len=96, shard_tokens=300,
                progress=False)
    with pytest.raises(C.SettingsMismatch, match=r"data\.sha256"):
        C.build(tiny_cache_teacher, _texts(2), d, k=8, temperature=2.0, seq_len=96, shard_tokens=300,
                progress=False)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_vocabulary_and_tokenizer_mismatch_errors(tiny_cache_teacher, caches):
    from kdkernels.cache.testing import tiny_tokenizer
    reader = C.open(caches["topk"])
    assert reader.check_compatible(1031) == 1031
    with pytest.raises(ValueError, match=r"1032.*1031"):
        reader.check_compatible(1032)
    assert reader.check_compatible(1040, vocab_size=1031) == 1031
    with pytest.raises(ValueError, match="too small"):
        reader.check_compatible(1040, vocab_size=50)
    assert reader.check_compatible(tiny_cache_teacher[1]) == 1031
    other = tiny_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match=r"tokenizer mismatch.*103 tokens.*vocab 1031"):
        reader.check_compatible(other)


def test_dataloader_workers_and_distributed_sampler(caches):
    from torch.utils.data import DataLoader, DistributedSampler
    reader = C.open(caches["topk"])
    seen = []
    for rank in (0, 1):
        sampler = DistributedSampler(reader, num_replicas=2, rank=rank, shuffle=True, seed=1)
        loader = DataLoader(reader, batch_size=3, sampler=sampler, num_workers=2 if rank else 0,
                            collate_fn=reader.collate)
        for batch in loader:
            assert batch["teacher_values"].dtype == torch.float32
            seen += [tuple(x[m.bool()].tolist()) for x, m in zip(batch["input_ids"],
                                                                   batch["attention_mask"])]
    expected = {tuple(reader[i]["input_ids"].tolist()) for i in range(len(reader))}
    assert expected <= set(seen)


def test_verify_and_read_detect_corruption(caches, tmp_path, capsys):
    from kdkernels.cli import main
    d = tmp_path / "c"
    shutil.copytree(caches["topk"], d)
    assert main(["cache", "verify", str(d)]) == 0
    shards = sorted(d.glob("shard-*.kdc"))
    data = bytearray(shards[1].read_bytes())
    data[len(data) // 2] ^= 0x01
    shards[1].write_bytes(bytes(data))
    shards[2].write_bytes(shards[2].read_bytes()[:-10])
    shards[3].unlink()
    capsys.readouterr()
    assert main(["cache", "verify", str(d)]) == 1
    err = capsys.readouterr().err
    assert f"{shards[1].name}: sha256 mismatch" in err
    assert f"{shards[2].name}:" in err and "truncated" in err
    assert f"{shards[3].name}: missing" in err
    assert shards[0].name not in err
    reader = C.open(d)
    counts = [s["sequences"] for s in reader.manifest["shards"]]
    first_of = np.cumsum([0] + counts)
    for bad in (1, 2, 3):
        with pytest.raises(C.CorruptShard, match=shards[bad].name):
            for i in range(first_of[bad], first_of[bad + 1]):
                reader[i]
    reader[0]


def test_inspect_reports_sizes_and_tail(caches, capsys):
    from kdkernels.cli import main
    assert main(["cache", "inspect", str(caches["topk"])]) == 0
    out = capsys.readouterr().out
    assert "bytes/entry" in out and "tail mass" in out
    s = C.summarize(caches["topk"])
    assert s["entries"] == s["tokens"] * 8
    assert s["entry_bytes_per_entry"] < 3.0
    assert 0 < s["tail_mass"]["mean"] < 1
    s = C.summarize(caches["sample"])
    assert 1 <= s["unique_ids_per_position"]["mean"] <= 64


def test_data_sources_jsonl_text_dataset_and_unpacked(tmp_path):
    from kdkernels.cache.data import tokenize
    from kdkernels.cache.testing import tiny_tokenizer
    tok = tiny_tokenizer()
    docs = ["first document.", "second one, longer than the first.", "x"]
    (tmp_path / "a.txt").write_text(docs[0])
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs[1:]) + "\n")
    from pathlib import Path
    packed = tokenize([Path(tmp_path / "a.txt"), Path(tmp_path / "b.jsonl")], tok, 8,
                      text_field="body")
    strings = tokenize(docs, tok, 8)
    assert packed.digest == strings.digest and packed.documents == 3
    stream = [t for d in docs for t in tok(d)["input_ids"] + [tok.eos_token_id]]
    assert np.concatenate([packed[i] for i in range(len(packed))]).tolist() == stream
    unpacked = tokenize(docs, tok, 8, pack=False)
    assert all(len(unpacked[i]) <= 8 for i in range(len(unpacked)))
    assert unpacked[len(unpacked) - 1].tolist() == tok("x")["input_ids"] + [tok.eos_token_id]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "ds"))
    assert tokenize([Path(tmp_path / "ds")], tok, 8).digest == strings.digest
    ids_only = tokenize([[5, 6, 7], [8]], None, 8)
    assert ids_only[0].tolist() == [5, 6, 7, 8]


def test_cli_build_inspect_and_refusal(tiny_cache_teacher, tmp_path, capsys):
    from pathlib import Path
    from kdkernels.cli import main
    model, tok = tiny_cache_teacher
    model.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    data = tmp_path / "d.txt"
    data.write_text(_texts(1)[0])
    args = ["cache", "build", str(tmp_path / "teacher"), str(data), "-o", str(tmp_path / "c"),
            "--k", "4", "--seq-len", "64", "--no-progress"]
    assert main(args) == 0
    assert "bytes/entry" in capsys.readouterr().out
    assert main(args[:-1] + ["--temperature", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "temperature: cache has 1.0, this build asks for 2.0" in err
    assert main(["cache", "inspect", str(tmp_path / "c"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["k"] == 4 and s["teacher"] == str(Path(tmp_path / "teacher").resolve())
