"""The host side of a cache build: batch encoding against a bit-by-bit reference writer of the format
(docs/cache-format.md, codec.py's docstring), the word packer, the Rice parameter, and the threaded
pipeline (same bytes with any number of workers, errors surface)."""
import numpy as np
import pytest

from kdkernels.cache import bits
from kdkernels.cache.codec import VALUE_CODE_MAX, Codec, rice_parameter
from kdkernels.cache.hostbench import make_sample, make_topk
from kdkernels.cache.pipeline import HostPipeline

STEP = 1.0 / 64


def _ref_stream(codec: Codec, ids, vals) -> bytes:
    """One sequence, written one bit at a time from the format's definition."""
    V, out = codec.vocab_size, []
    for row_ids, row_vals in zip(ids, vals):
        pairs = sorted((int(i), float(v)) for i, v in zip(row_ids, row_vals) if i >= 0)
        x = [i for i, _ in pairs]
        n = len(x)
        low = min(range(max(V - 1, 0).bit_length() + 1), key=lambda l: (n * l + ((V - 1) >> l), l))
        for xi in x:
            out += [(xi >> b) & 1 for b in range(low)]
        high = [0] * (n + ((V - 1) >> low) + 1)
        for i, xi in enumerate(x):
            high[(xi >> low) + i] = 1
        out += high
        if codec.mode == "topk" and codec.lossless:
            continue
        if codec.mode == "topk":
            codes = [min(max(int(np.rint(-min(v, 0.0) / codec.step)), 0), VALUE_CODE_MAX)
                     for _, v in pairs]
            d = [max(codes) - c for c in codes]
        else:
            d = [int(np.rint(v * codec.width)) - 1 for _, v in pairs]
        r = min(range(17), key=lambda r: (n * r + sum(di >> r for di in d), r))
        for di in d:
            out += [(di >> b) & 1 for b in range(r)]
        for di in d:
            out += [0] * (di >> r) + [1]
    out += [0] * (-len(out) % 8)
    return np.packbits(np.array(out, dtype=np.uint8), bitorder="little").tobytes()


@pytest.mark.parametrize("mode,lossless,V,width", [("topk", False, 1031, 7), ("topk", True, 1031, 7),
                                                   ("topk", False, 262144, 64), ("sample", False, 1031, 16),
                                                   ("sample", False, 65537, 64)])
def test_encode_many_equals_reference_writer_per_sequence(mode, lossless, V, width):
    rng = np.random.default_rng(V + width)
    lengths = [5, 1, 2, 37, 3]                     # odd lengths, a 1-position sequence
    N = sum(lengths)
    if mode == "topk":
        ids, vals, tail = make_topk(rng, N, V, width)
        vals[4, -1] = -5000.0                      # below the code range: clamps
        vals[6] = vals[6, 0]                       # all equal: zero-width Rice fields
    else:
        ids, vals = make_sample(rng, N, V, width)
        tail = None
    lp_next = rng.normal(-3, 2, N).astype(np.float32)
    lp_next[np.cumsum(lengths) - 1] = np.nan
    codec = Codec(mode, V, width, lossless, STEP)
    side, streams = codec.encode_many(ids.astype(np.int32), vals, lp_next, tail, lengths)
    t0 = 0
    for L, got in zip(lengths, streams):
        sl = slice(t0, t0 + L)
        assert bytes(got) == _ref_stream(codec, ids[sl], vals[sl])
        one_side, one = codec.encode(ids[sl], vals[sl], lp_next[sl], None if tail is None else tail[sl])
        assert bytes(one) == bytes(got)
        for name, arr in one_side.items():
            assert arr.dtype == side[name].dtype and np.array_equal(arr, side[name][sl], equal_nan=True)
        t0 += L


def test_pack_matches_bitwise_reference_all_widths_and_word_edges():
    rng = np.random.default_rng(0)
    width = rng.integers(0, 65, 400)
    width[:70] = np.arange(70) % 65                  # every width, fields crossing word edges
    gap = rng.integers(0, 3, 400)
    pos = np.cumsum(width + gap) - width
    val = np.array([int(rng.integers(0, 1 << 62)) * 4 + 3 & ((1 << int(w)) - 1) for w in width],
                   dtype=np.uint64)
    free = np.setdiff1d(np.arange(int(pos[-1] + width[-1])),
                        np.concatenate([np.arange(p, p + w) for p, w in zip(pos, width)]))
    ones = rng.choice(free, 50, replace=False)
    total = int(pos[-1] + width[-1]) + 5
    ref = np.zeros(total, np.uint8)
    for p, v, w in zip(pos, val, width):
        for b in range(int(w)):
            ref[p + b] = (int(v) >> b) & 1
    ref[ones] = 1
    got = bits.pack(total, pos, val, ones=ones)
    assert bytes(got) == np.packbits(ref, bitorder="little").tobytes()


def test_rice_parameter_is_the_smallest_argmin():
    rng = np.random.default_rng(1)
    d = (rng.geometric(1 / rng.choice([1, 3, 50, 2000, 30000], (300, 1)), (300, 40)) - 1).clip(0, 65535)
    n = rng.integers(0, 41, 300)
    d[np.arange(40)[None, :] >= n[:, None]] = 0
    d[0] = 0                                        # all zero: r = 0
    d[1, :] = 65535
    n[1] = 40
    cost = n[:, None] * np.arange(17) + np.stack([(d >> r).sum(1) for r in range(17)], 1)
    assert np.array_equal(rice_parameter(d, n), np.argmin(cost, 1))


@pytest.mark.parametrize("workers", [1, 2])
def test_hostbench_pipeline_bytes_independent_of_workers(tmp_path, workers):
    from kdkernels.cache import hostbench
    import hashlib
    digests = []
    for w in (0, workers):
        out = tmp_path / f"w{w}"
        hostbench.main(["--tokens", "3000", "--seq-len", "200", "--tokens-per-batch", "700",
                        "--shard-tokens", "1000", "--vocab", "1031", "--k", "8", "--draws", "16",
                        "--rounds", "1", "--workers", str(w), "--out", str(out)])
        digests.append({p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted(out.rglob("*.kdk"))})
    assert len(digests[0]) == 2 * 3 and digests[0] == digests[1]


@pytest.mark.parametrize("workers", [0, 1])
def test_pipeline_surfaces_encoding_and_writing_errors(workers):
    def encode(part, arrays):
        if arrays == "bad":
            raise RuntimeError("encode failed")
        return [arrays], 0

    with pytest.raises(RuntimeError, match="encode failed"):
        with HostPipeline(encode, workers=workers) as pipe:
            pipe.add_batch([], lambda: "ok")
            pipe.add_batch([], lambda: "bad")
            pipe.end_shard(lambda enc, mid: None)

    written = []
    with pytest.raises(OSError, match="disk full"):
        with HostPipeline(encode, workers=workers) as pipe:
            for s in range(4):
                pipe.add_batch([], lambda s=s: s)
                pipe.end_shard(lambda enc, mid: written.append(enc) if enc != [2] else
                               (_ for _ in ()).throw(OSError("disk full")))
    assert written[:2] == [[0], [1]]                 # in shard order, nothing after the failure
    assert [3] not in written


@pytest.mark.parametrize("mode,workers", [("topk", 2), ("sample", 1)])   # 2: encoding processes
def test_build_bytes_independent_of_host_workers(tiny_cache_teacher, tmp_path, mode, workers):
    import inspect
    import json
    import kdkernels.cache as C
    texts = [inspect.getdoc(o) or "" for o in (json.dumps, inspect.getdoc)]
    kw = dict(mode=mode, k=8, draws=16, seq_len=64, shard_tokens=128, tokens_per_batch=100,
              progress=False)
    files = []
    for w in (0, workers):
        out = C.build(tiny_cache_teacher, texts, tmp_path / f"w{w}", host_workers=w, **kw)
        files.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert len(files[0]) > 3 and files[0] == files[1]


@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_encode_many_random_batches_including_word_aligned_ends(mode):
    """Streams whose size is a multiple of 8 bytes put unused-slot groups at the buffer's end."""
    rng = np.random.default_rng(7)
    V, width, aligned = 49152, 64, 0
    codec = Codec(mode, V, width, False, STEP)
    for trial in range(40):
        lengths = list(rng.integers(1, 9, rng.integers(1, 4)))
        N = sum(lengths)
        ids, vals = (make_topk(rng, N, V, width)[:2] if mode == "topk" else make_sample(rng, N, V, width))
        tail = np.zeros(N, np.float32) if mode == "topk" else None
        _, streams = codec.encode_many(ids, vals, np.zeros(N, np.float32), tail, lengths)
        aligned += sum(len(st) % 8 == 0 for st in streams)
        t0 = 0
        for L, got in zip(lengths, streams):
            assert bytes(got) == _ref_stream(codec, ids[t0:t0 + L], vals[t0:t0 + L])
            t0 += L
    assert aligned > 0
