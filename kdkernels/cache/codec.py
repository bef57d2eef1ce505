"""Per-position encodings of a teacher cache (docs/cache-format.md, "Encodings").

A sequence of L positions becomes per-position side arrays (fixed width, indexable) and one
byte-aligned bit stream. Per position p with n_p entries (n_p = k for top-k, the number of unique
ids for sampled caches), the stream holds, in order:

    Elias-Fano ids (bits.py), ids ascending                      n_p * l + U bits
    Rice-coded value fields d_i, one per id in the same order:
        low parts  d_i & (2^r_p - 1)                              n_p * r_p bits
        unary part for each i: (d_i >> r_p) zeros, then a one     vlen_p = sum_i (d_i >> r_p) + n_p bits

with r_p = argmin_r n_p r + sum_i (d_i >> r) (smallest on ties) in the side array `vrice` and vlen_p
in `vlen`. Value fields:
    topk, compact ("q_rice"): c_i = clip(rint(-lp_i / step), 0, 65535); vbase_p = max_i c_i (the
                           code of the row's smallest log-prob, uint16 side array); d_i = vbase_p - c_i.
                           Decoded lp_i = -(vbase_p - d_i) * step, so |error| <= step / 2 (+ float32
                           rounding) for lp_i >= -65535 * step; lower log-probs decode to -65535 * step.
    topk, lossless ("f32"): no value fields; values are a float32 (T, k) side array in the same
                           (id-ascending) order, bit-exact.
    sample ("count_rice"): d_i = count_i - 1 (counts are exact integers, so every sampled cache is
                           lossless); weight_i = count_i / draws.
Scalars per position: logprob of the next token and log tail mass, as float32 (lossless) or as a
uint16 code c with value -c / 1024 (|error| <= 2^-11 nats for values >= -63.99; lower values clamp;
code 65535 = NaN).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import bits

SCALAR_STEP = 1.0 / 1024.0
SCALAR_NAN = 65535
VALUE_CODE_MAX = 65535


def quantize_scalar(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    code = np.clip(np.rint(-np.minimum(x, 0.0) / SCALAR_STEP), 0, SCALAR_NAN - 1)
    code = np.where(np.isnan(x), SCALAR_NAN, code)
    return code.astype("<u2")


def dequantize_scalar(code: np.ndarray) -> np.ndarray:
    code = np.asarray(code)
    out = (-code.astype(np.float64) * SCALAR_STEP).astype(np.float32)
    return np.where(code == SCALAR_NAN, np.float32(np.nan), out)


def rice_parameter(d: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Per row, r minimizing n r + sum_i (d_i >> r) (the Rice-coded size; smallest r on ties).
    d: (L, m) nonnegative integers < 2^16 (any int dtype), zero in unused slots."""
    return rice_choice(d, n)[0]


def rice_choice(d: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(r, sum_i (d_i >> r)) per row for rice_parameter's r. r = 0, 1, ... is scanned up to the bit
    length of max d (beyond it d >> r = 0 and the cost n r only grows). The rows are summed as
    columns of d's transpose: numpy reduces a short last axis slowly."""
    dt = np.ascontiguousarray(np.asarray(d).T, dtype=np.uint32)     # (m, L)
    n = np.asarray(n, dtype=np.int64)
    best = dt.sum(axis=0, dtype=np.int64)                 # cost at r = 0
    arg = np.zeros(dt.shape[1], dtype=np.int64)
    top = int(dt.max(initial=0)).bit_length()
    for r in range(1, min(16, top) + 1):
        dt >>= 1
        cost = n * r + dt.sum(axis=0, dtype=np.int64)
        better = cost < best
        best = np.where(better, cost, best)
        arg = np.where(better, r, arg)
    return arg, best - n * arg


@dataclass(frozen=True)
class Codec:
    mode: str                 # "topk" | "sample"
    vocab_size: int
    width: int                # k (topk) or draws (sample): the most entries per position
    lossless: bool
    step: float               # log-prob quantization step (topk compact)

    @property
    def id_dtype(self) -> str:
        return "<u2" if self.vocab_size <= 65536 else "<u4"

    @property
    def count_dtype(self) -> str:
        return "u1" if self.width <= 256 else "<u2"

    @property
    def scalar_dtype(self) -> str:
        return "<f4" if self.lossless else "<u2"

    @property
    def encodings(self) -> dict:
        values = "count_rice" if self.mode == "sample" else ("f32" if self.lossless else "q_rice")
        return {"ids": "elias_fano", "values": values,
                "value_step": self.step if values == "q_rice" else None,
                "scalars": "f32" if self.lossless else "u16_step_1/1024",
                "tokens": self.id_dtype}

    # ------------------------------------------------------------------ encode

    def encode(self, ids: np.ndarray, values: np.ndarray, lp_next: np.ndarray,
               tail: Optional[np.ndarray]) -> tuple[dict, np.ndarray]:
        """One sequence of L positions -> (side arrays, stream bytes).

        topk: ids (L, k) distinct per row, values (L, k) log-probs, any order.
        sample: ids (L, m) ascending with -1 padding at the end, values (L, m) weights count/draws.
        """
        side, streams = self.encode_many(ids, values, lp_next, tail, [len(ids)])
        return side, streams[0]

    def encode_many(self, ids: np.ndarray, values: np.ndarray, lp_next: np.ndarray,
                    tail: Optional[np.ndarray], lengths) -> tuple[dict, list]:
        """Consecutive sequences of `lengths` positions (rows of ids/values, sequence-major) in one
        vectorized pass -> (side arrays of all rows, [stream bytes per sequence]). Each sequence's
        stream is exactly `encode`'s for it alone: its row offsets start at bit 0 of its own bytes."""
        ids = np.asarray(ids)
        values = np.ascontiguousarray(values, dtype=np.float32)
        L, m = ids.shape
        side: dict = {"lp_next": self._scalar(lp_next)}
        if self.mode == "topk":
            # sort each row by id, carrying the value's float32 bits in the low half of one int64 key
            # (ids are distinct per row, so the order is the id order and no argsort is needed)
            key = (ids.astype(np.int64) << 32) | values.view(np.uint32).astype(np.int64)
            key.sort(axis=1)
            ids = key >> 32
            values = (key & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
            n = np.full(L, m, dtype=np.int64)
            side["tail"] = self._scalar(tail)
            if self.lossless:
                side["values"] = values.astype("<f4")
                return side, self._streams(ids, None, n, lengths)
            codes = np.clip(np.rint(-np.minimum(values, np.float32(0.0)).astype(np.float64) / self.step),
                            0, VALUE_CODE_MAX).astype(np.int32)
            base = codes.max(axis=1) if m else np.zeros(L, np.int32)
            d = base[:, None] - codes
            side["vbase"] = base.astype("<u2")
        else:
            ids = ids.astype(np.int64, copy=False)
            valid = ids >= 0
            n = valid.sum(axis=1).astype(np.int64)
            counts = np.rint(values.astype(np.float64) * self.width).astype(np.int32)
            d = np.where(valid, counts - 1, 0)
            side["count"] = n.astype(self.count_dtype)
        r, unary = rice_choice(d, n)
        side["vrice"] = r.astype("u1")
        side["vlen"] = (unary + n).astype(self.vlen_dtype)
        return side, self._streams(ids, (d, r, side["vlen"].astype(np.int64)), n, lengths)

    @property
    def vlen_dtype(self) -> str:
        return "<u2" if self.width <= 16384 else "<u4"

    def _scalar(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return x.astype("<f4") if self.lossless else quantize_scalar(x)

    def _layout(self, n, r, vlen):
        low = bits.ef_low_bits(n, self.vocab_size)
        high = bits.ef_high_bits(n, low, self.vocab_size)
        length = n * low + high + n * r + vlen
        off = np.concatenate([[0], np.cumsum(length)[:-1]]) if len(n) else np.zeros(0, np.int64)
        return low, high, off, int(length.sum())

    def _streams(self, ids, rice, n, lengths) -> list:
        """One pack for all rows; sequence s's stream starts on a byte boundary at bit 0 of its own.
        Row offsets: off_p = 8 * (bytes of the sequences before p's) + (bits of p's sequence rows
        before p). Returns per-sequence uint8 views into one buffer."""
        L, m = ids.shape
        lengths = np.asarray(lengths, dtype=np.int64)
        zeros = np.zeros(L, dtype=np.int64)
        r, vlen = (rice[1], rice[2]) if rice is not None else (zeros, zeros)
        low = bits.ef_low_bits(n, self.vocab_size)
        high = bits.ef_high_bits(n, low, self.vocab_size)
        length = n * low + high + n * r + vlen
        seq_first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        seq_bits = np.add.reduceat(length, seq_first) if L else np.zeros(len(lengths), np.int64)
        seq_bits = np.where(lengths > 0, seq_bits, 0)
        seq_bytes = (seq_bits + 7) // 8
        seq_start = 8 * np.concatenate([[0], np.cumsum(seq_bytes)[:-1]])
        within = np.cumsum(length) - length                  # exclusive cumsum over all rows
        seq_of_row = np.repeat(np.arange(len(lengths)), lengths)
        off = seq_start[seq_of_row] + within - within[seq_first][seq_of_row] if L else zeros
        total = int(8 * seq_bytes.sum())
        buf = self._pack_rows(ids, rice, n, low, high, off, r, total)
        edges = np.concatenate([[0], np.cumsum(seq_bytes)])
        return [buf[edges[i]:edges[i + 1]] for i in range(len(lengths))]

    @staticmethod
    def _group(width: int) -> int:
        """Fields per packed group: the largest power of 2 with group * width <= 64."""
        g = 1
        while 2 * g * width <= 64:
            g *= 2
        return g

    @staticmethod
    def _combine(f: np.ndarray, width) -> np.ndarray:
        """(L, a, g) fields of `width` bits (a scalar or (L, 1)) -> (L, a) of g * width bits,
        field t at bit t * width (a loop over t: numpy reduces a short last axis slowly)."""
        out = f[:, :, 0].copy()
        for t in range(1, f.shape[2]):
            out |= f[:, :, t] << (np.uint64(t) * width)
        return out

    def _pack_rows(self, ids, rice, n, low, high, off, r, total) -> np.ndarray:
        """The fields of all rows, computed on (L, m) matrices (slots j >= n_p are unused: their
        fields are 0 and their 1-bits are dropped). G consecutive fields of one row are contiguous
        and of equal width w, so they go to the packer as one field of G*w bits, sum_t f_t << (t*w);
        a group of unused slots only adds zeros (its position is clipped into the stream)."""
        L, m = ids.shape
        if L == 0 or m == 0:
            return bits.pack(total, np.zeros(0, np.int64), np.zeros(0, np.uint64))
        used = None if (n == m).all() else np.arange(m)[None, :] < n[:, None]
        x = ids.astype(np.int64, copy=False)
        if used is not None:
            x = np.where(used, x, 0)
        d = rice[0].astype(np.int64, copy=False) if rice is not None else None
        lc = low[:, None]
        j = np.arange(m, dtype=np.int64)[None, :]
        pos, val = [], []

        def fields(f, width, start, wmax):
            g = self._group(wmax)
            if m % g:
                f = np.concatenate([f, np.zeros((L, g - m % g), f.dtype)], axis=1)
            f = f.astype(np.uint64).reshape(L, -1, g)
            val.append(self._combine(f, width.astype(np.uint64)).ravel())
            p = start[:, None] + np.arange(f.shape[1], dtype=np.int64)[None, :] * (g * width)
            pos.append(np.minimum(p, max(total - 1, 0)).ravel())

        if low.max():
            fields(x & ((1 << lc) - 1), lc, off, int(low.max()))
        ones = [off[:, None] + n[:, None] * lc + (x >> lc) + j]
        if rice is not None:
            rc = r[:, None]
            vstart = off + n * low + high
            if r.max():
                fields(d & ((1 << rc) - 1), rc, vstart, int(r.max()))
            # unary: (d >> r) zeros then a one; entry j's one ends the first sum_{i<=j} ((d_i >> r) + 1) bits
            ones.append(vstart[:, None] + n[:, None] * rc + np.cumsum((d >> rc) + 1, axis=1) - 1)
        if used is not None:
            ones = [np.where(used, o, -1) for o in ones]
        return bits.pack(total, np.concatenate(pos) if pos else np.zeros(0, np.int64),
                         np.concatenate(val) if val else np.zeros(0, np.uint64),
                         ones=np.concatenate([o.ravel() for o in ones]))

    # ------------------------------------------------------------------ decode

    def decode(self, stream: np.ndarray, side: dict, L: int) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of encode for one sequence -> ids (L, m) int64, values (L, m) float32.
        topk: m = k, sorted by value descending, ties by smaller id. sample: m = the most entries of
        any position, ids ascending, padded with -1 / 0. Raises ValueError on an inconsistent stream."""
        n = (np.full(L, self.width, dtype=np.int64) if self.mode == "topk"
             else np.asarray(side["count"], dtype=np.int64))
        rice = not (self.mode == "topk" and self.lossless)
        zeros = np.zeros(L, dtype=np.int64)
        r = np.asarray(side["vrice"], dtype=np.int64) if rice else zeros
        vlen = np.asarray(side["vlen"], dtype=np.int64) if rice else zeros
        low, high, off, total = self._layout(n, r, vlen)
        if (total + 7) // 8 + 8 > stream.size:
            raise ValueError("stream shorter than its side arrays imply")
        m = int(n.max()) if L else 0
        valid = np.arange(m)[None, :] < n[:, None]
        rows, j = np.nonzero(valid)
        body = stream[: (total + 7) // 8]
        lo = bits.read(stream, off[rows] + j * low[rows], low[rows])
        ones = bits.region_ones(body, off + n * low, high)
        if ones.size != rows.size:
            raise ValueError(f"Elias-Fano stream holds {ones.size} ids, side arrays say {rows.size}")
        hi = ones - (off + n * low)[rows] - j
        x = (hi << low[rows]) | lo
        if rice:
            vstart = off + n * low + high
            dlo = bits.read(stream, vstart[rows] + j * r[rows], r[rows])
            ustart = vstart + n * r
            ends = bits.region_ones(body, ustart, vlen)
            if ends.size != rows.size:
                raise ValueError(f"Rice stream holds {ends.size} values, side arrays say {rows.size}")
            rel = ends - ustart[rows]                           # position of each terminator
            prev = np.where(j > 0, np.concatenate([[-1], rel[:-1]]), -1)
            f = ((rel - prev - 1) << r[rows]) | dlo
        if x.size and (x.min() < 0 or x.max() >= self.vocab_size):
            raise ValueError("decoded id outside the vocabulary")
        ids = np.full((L, m), -1, dtype=np.int64)
        ids[rows, j] = x
        if x.size > 1:
            same_row = rows[1:] == rows[:-1]
            if (np.diff(x)[same_row] <= 0).any():
                raise ValueError("decoded ids are not strictly increasing within a position")
        vals = np.zeros((L, m), dtype=np.float32)
        if self.mode == "sample":
            vals[rows, j] = ((f + 1).astype(np.float32) / np.float32(self.width))
            return ids, vals
        if self.lossless:
            vals = np.array(side["values"], dtype=np.float32).reshape(L, m)
        else:
            base = np.asarray(side["vbase"], dtype=np.int64)
            codes = np.zeros((L, m), dtype=np.int64)
            codes[rows, j] = base[rows] - f
            vals = (-(codes.astype(np.float64)) * self.step).astype(np.float32)
        order = np.argsort(-vals, axis=1, kind="stable")   # ids ascending, so ties keep smaller id
        return np.take_along_axis(ids, order, 1), np.take_along_axis(vals, order, 1)

    def scalars(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        return np.array(x, dtype=np.float32) if self.lossless else dequantize_scalar(x)
