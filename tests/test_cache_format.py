"""Cache encodings and shard files without a teacher: round trips through every encoding, the
quantization bound, odd vocabularies, and corruption / truncation detection."""
import json

import numpy as np
import pytest

from kdkernels.cache import bits
from kdkernels.cache.codec import SCALAR_STEP, Codec, dequantize_scalar, quantize_scalar
from kdkernels.cache.shard import CorruptShard, Shard, entry_from_file, write_shard

STEP = 1.0 / 64


def _topk_rows(rng, L, k, V, spread=6.0):
    ids = np.stack([rng.choice(V, k, replace=False) for _ in range(L)])
    vals = np.sort(-np.abs(rng.normal(0, spread, (L, k))), axis=1)[:, ::-1].astype(np.float32)
    return ids, vals


def _roundtrip(codec, ids, vals, lp_next, tail):
    side, stream = codec.encode(ids, vals, lp_next, tail)
    padded = np.concatenate([stream, np.zeros(8, np.uint8)])
    return side, stream, codec.decode(padded, side, ids.shape[0])


def _as_maps(ids, vals):
    return [{int(i): float(v) for i, v in zip(r_i, r_v) if i >= 0} for r_i, r_v in zip(ids, vals)]


@pytest.mark.parametrize("V,k", [(1031, 7), (1031, 1), (65537, 64), (262144, 64), (50, 50)])
def test_topk_compact_roundtrip_within_bound(V, k):
    rng = np.random.default_rng(V + k)
    ids, vals = _topk_rows(rng, 37, k, V)
    vals[3] = vals[3, 0]                     # all equal: zero-width value fields
    codec = Codec("topk", V, k, False, STEP)
    _, _, (dids, dvals) = _roundtrip(codec, ids, vals, np.zeros(37), np.zeros(37))
    for a, b in zip(_as_maps(ids, vals), _as_maps(dids, dvals)):
        assert set(a) == set(b)
        err = max(abs(a[i] - b[i]) for i in a)
        assert err <= STEP / 2 + 1e-5 * max(1.0, max(abs(v) for v in a.values()))
    # decoded rows are sorted by value descending, ties by the smaller id
    assert (np.diff(dvals, axis=1) <= 0).all()
    tie = np.diff(dvals, axis=1) == 0
    assert (np.diff(dids, axis=1)[tie] > 0).all()


def test_quantization_error_bound_is_tight_and_documented():
    # every value in a dense grid decodes within step/2, and the bound is attained (not loose)
    codec = Codec("topk", 4096, 64, False, STEP)
    v = -np.linspace(0, 40, 64 * 200).reshape(200, 64).astype(np.float32)
    ids = np.tile(np.arange(64), (200, 1))
    _, _, (dids, dvals) = _roundtrip(codec, ids, v, np.zeros(200), np.zeros(200))
    ref = np.take_along_axis(v, dids, 1)
    err = np.abs(ref.astype(np.float64) - dvals)
    assert err.max() <= STEP / 2 + 40 * 2 ** -23 * 2
    assert err.max() > 0.4 * STEP


def test_topk_extreme_values_clamp_not_garbage():
    codec = Codec("topk", 1031, 4, False, STEP)
    ids = np.array([[0, 1030, 5, 7]])
    vals = np.array([[1e-7, -np.inf, -5000.0, -3.0]], np.float32)  # +tiny, -inf, below range
    _, _, (dids, dvals) = _roundtrip(codec, ids, vals, np.array([np.nan]), np.array([-np.inf]))
    got = dict(zip(dids[0].tolist(), dvals[0].tolist()))
    assert got[0] == 0.0 and abs(got[7] + 3.0) <= STEP / 2
    assert got[1030] == got[5] == pytest.approx(-65535 * STEP)   # documented floor, exp() == 0
    assert np.exp(np.float32(got[5])) == 0.0


@pytest.mark.parametrize("V", [1031, 262144])
def test_topk_lossless_is_bit_exact(V):
    rng = np.random.default_rng(1)
    ids, vals = _topk_rows(rng, 29, 16, V)
    vals[0, 3] = vals[0, 4]                   # a tie
    lp_next, tail = rng.normal(size=29).astype(np.float32), rng.normal(size=29).astype(np.float32)
    codec = Codec("topk", V, 16, True, STEP)
    side, _, (dids, dvals) = _roundtrip(codec, ids, vals, lp_next, tail)
    for r in range(29):   # reference order: value descending, ties by the smaller id
        ref = sorted(zip((-vals[r]).tolist(), ids[r].tolist()))
        assert dids[r].tolist() == [i for _, i in ref]
        want = np.array([-v for v, _ in ref], np.float32)
        assert np.array_equal(dvals[r].view(np.uint32), want.view(np.uint32))
    assert np.array_equal(codec.scalars(side["lp_next"]), lp_next)
    assert np.array_equal(codec.scalars(side["tail"]), tail)


@pytest.mark.parametrize("V,draws", [(1031, 64), (262144, 300)])
def test_sample_counts_roundtrip_exact(V, draws):
    rng = np.random.default_rng(draws)
    L, m = 41, min(draws, 40)
    ids = np.full((L, m), -1, np.int64)
    w = np.zeros((L, m), np.float32)
    for r in range(L):
        n = int(rng.integers(1, m + 1)) if r else 1
        sel = np.sort(rng.choice(V, n, replace=False))
        cnt = rng.multinomial(draws - n, np.ones(n) / n) + 1
        ids[r, :n], w[r, :n] = sel, cnt.astype(np.float32) / np.float32(draws)
    codec = Codec("sample", V, draws, False, STEP)
    _, _, (dids, dvals) = _roundtrip(codec, ids, w, np.full(L, np.nan), None)
    width = dids.shape[1]
    assert width == (ids >= 0).sum(1).max()
    assert np.array_equal(dids, ids[:, :width]) and np.array_equal(dvals, w[:, :width])
    assert np.allclose(dvals.sum(1), 1.0)


def test_scalar_quantizer_bound_and_nan():
    x = np.array([0.0, -1e-9, -3.14159, -63.5, -70.0, np.nan, 0.5], np.float32)
    y = dequantize_scalar(quantize_scalar(x))
    assert np.all(np.abs(y[:4] - x[:4]) <= SCALAR_STEP / 2 + 1e-6)
    assert y[4] == pytest.approx(-65534 * SCALAR_STEP)     # clamped at about -64 nats
    assert np.isnan(y[5]) and y[6] == 0.0


def test_elias_fano_cost_near_entropy():
    # bits per id stay within 2.1 bits of log2(V / n) at the sizes the format targets
    for V, n in [(49152, 64), (262144, 64), (262144, 12), (1031, 7)]:
        l = int(bits.ef_low_bits(n, V))
        cost = n * l + int(bits.ef_high_bits(np.int64(n), np.int64(l), V))
        assert cost / n <= np.log2(V / n) + 2.1 + 1.0 / n * 2, (V, n, cost / n)


def _write(tmp_path, rng, nseq=5):
    codec = Codec("topk", 1031, 8, False, STEP)
    seqs = []
    for s in range(nseq):
        L = int(rng.integers(2, 40))
        ids, vals = _topk_rows(rng, L, 8, 1031)
        side, stream = codec.encode(ids, vals, rng.normal(size=L), rng.normal(size=L))
        seqs.append((rng.integers(0, 1031, L).astype("<u2"), side, stream, L * 8))
    path = tmp_path / "shard-00000.kdc"
    entry = write_shard(path, 0, seqs, 1030)
    return codec, seqs, path, entry


def test_shard_roundtrip_entry_and_atomic_name(tmp_path):
    rng = np.random.default_rng(3)
    codec, seqs, path, entry = _write(tmp_path, rng)
    assert not list(tmp_path.glob("*.tmp"))
    assert entry == entry_from_file(path)
    shard = Shard(path, entry["bytes"])
    assert len(shard) == 5
    for i, (tokens, side, stream, _) in enumerate(seqs):
        got_side, got_stream = shard.sequence(i)
        assert np.array_equal(got_side["tokens"], tokens)
        a = codec.decode(np.concatenate([stream, np.zeros(8, np.uint8)]), side, len(tokens))
        b = codec.decode(got_stream, got_side, len(tokens))
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.mark.parametrize("where", ["stream", "tokens", "header", "index"])
def test_corrupted_shard_raises_on_read(tmp_path, where):
    rng = np.random.default_rng(4)
    _, seqs, path, entry = _write(tmp_path, rng)
    shard = Shard(path).open()
    sec = {name: (off, nb) for name, _, _, off, nb in shard.header["sections"]}
    off = {"stream": sec["stream"][0] + 3, "tokens": sec["tokens"][0] + 1, "header": 30,
           "index": sec["seq_byte"][0] + 9}[where]
    del shard
    data = bytearray(path.read_bytes())
    data[off] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShard, match="shard-00000.kdc"):
        s = Shard(path, entry["bytes"])
        for i in range(len(s)):
            s.sequence(i)


def test_truncated_and_missing_shard_raise(tmp_path):
    rng = np.random.default_rng(5)
    _, _, path, entry = _write(tmp_path, rng)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CorruptShard, match="truncated"):
        Shard(path, entry["bytes"]).open()
    with pytest.raises(CorruptShard, match="truncated|past the end"):
        Shard(path).open()                   # without the manifest's size: the section table catches it
    path.unlink()
    with pytest.raises(CorruptShard, match="missing"):
        Shard(path, entry["bytes"]).open()


def test_header_is_deterministic_json(tmp_path):
    rng = np.random.default_rng(6)
    _, seqs, path, _ = _write(tmp_path, rng)
    first = path.read_bytes()
    write_shard(path, 0, seqs, 1030)
    assert path.read_bytes() == first
    n = int.from_bytes(first[12:16], "little")
    header = json.loads(first[16:16 + n])
    assert header["sequences"] == 5 and all(s[3] % 64 == 0 for s in header["sections"])


def test_import_is_light():
    import subprocess
    import sys
    from pathlib import Path
    import kdkernels
    code = ("import sys, kdkernels.cache, kdkernels.cache.cli, kdkernels.teacher; "
            "print(sorted(m for m in ('transformers', 'datasets', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(Path(kdkernels.__file__).resolve().parents[1]),
                              "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]"
