"""Vectorized bit packing and Elias-Fano coding of sorted id rows (numpy, no Python loop per entry).

Bit order: a bit stream is a little-endian byte string read LSB-first, i.e. bit b of the stream is
`(buf[b >> 3] >> (b & 7)) & 1`, and a w-bit field at bit p holds `sum_i bit(p + i) << i`.

Elias-Fano row (n distinct ids 0 <= x_0 < ... < x_{n-1} < V, with l = ef_low_bits(n, V)):
    low part : n fields of l bits, field i = x_i & (2^l - 1)                       n*l bits
    high part: U = n + ((V-1) >> l) + 1 bits, bit (x_i >> l) + i set, all others 0    U bits
The row costs n*l + U bits, a function of (n, V) only, so offsets are computable without decoding;
l minimizes it (about 2 + log2(V/n) bits per id).
"""
from __future__ import annotations

import numpy as np

_U64 = np.dtype("<u8")


def ef_low_bits(n: np.ndarray | int, vocab: int) -> np.ndarray:
    """l(n, V) = argmin_l n*l + ((V-1) >> l): the low-bit width of an Elias-Fano row (ties: smaller l)."""
    n = np.asarray(n, dtype=np.int64)
    top = max(int(vocab - 1).bit_length(), 0)
    cands = np.arange(top + 1, dtype=np.int64)
    cost = n[..., None] * cands + ((vocab - 1) >> cands)
    return np.argmin(cost, axis=-1).astype(np.int64)


def ef_high_bits(n: np.ndarray, low: np.ndarray, vocab: int) -> np.ndarray:
    """U(n, V) for rows with low-bit width `low`."""
    return n + ((vocab - 1) >> low) + 1


def pack(total_bits: int, pos: np.ndarray, val: np.ndarray,
         ones: np.ndarray | None = None) -> np.ndarray:
    """A zero stream of total_bits (rounded up to bytes) with field i (value val[i] < 2^w_i, w_i <= 64
    bits; the width itself is not needed) written at bit pos[i], and single 1-bits at positions
    `ones` (entries of -1 are skipped). Fields and ones must not overlap. Returns uint8.
    Disjoint bits make OR equal to ADD, so the words are accumulated with np.add.at (numpy's fast
    indexed path, several times faster than bitwise_or.at): a field at p adds val << (p mod 64) to
    word p >> 6 and, if it crosses the word edge, val >> (64 - p mod 64) to the next word. The
    single bits are set in a bool map, packed LSB-first and OR-ed in."""
    nwords = (total_bits + 63) // 64 + 1
    words = np.zeros(nwords, dtype=_U64)
    pos = np.asarray(pos, dtype=np.int64)
    val = np.asarray(val, dtype=np.uint64)
    idx = pos >> 6
    sh = (pos & 63).astype(np.uint64)
    np.add.at(words, idx, val << sh)
    # the part past the word edge, val >> (64 - sh), is 0 unless the field crosses it; written as
    # (val >> 1) >> (63 - sh) so that sh = 0 never shifts by 64. A 0-width field has val = 0.
    np.add.at(words, idx + 1, (val >> np.uint64(1)) >> (np.uint64(63) - sh))
    if ones is not None:                         # a bit map is cheaper than an indexed add per bit
        flags = np.zeros(nwords * 64 + 1, dtype=bool)     # the extra flag takes the -1 entries
        flags[np.asarray(ones, dtype=np.int64)] = True
        words |= np.packbits(flags[:-1], bitorder="little").view(_U64)
    return words.view(np.uint8)[: (total_bits + 7) // 8].copy()


def read(buf: np.ndarray, pos: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Fields of `width` (<= 57) bits at bit positions `pos`; buf must have 8 bytes past the last
    field. Returns int64."""
    pos = np.asarray(pos, dtype=np.int64)
    if pos.size == 0:
        return np.zeros(0, dtype=np.int64)
    win = np.lib.stride_tricks.sliding_window_view(buf, 8)[pos >> 3]
    word = np.ascontiguousarray(win).view(_U64).reshape(-1)
    mask = (np.uint64(1) << np.asarray(width, dtype=np.uint64)) - np.uint64(1)
    return ((word >> (pos & 7).astype(np.uint64)) & mask).astype(np.int64)


def region_ones(buf: np.ndarray, start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Stream positions of all 1-bits inside the regions [start_r, start_r + length_r), in order.
    Regions must be sorted and disjoint."""
    start = np.asarray(start, dtype=np.int64)
    length = np.asarray(length, dtype=np.int64)
    total = int(buf.size) * 8
    gaps = start - np.concatenate([[0], (start + length)[:-1]])
    if (gaps < 0).any() or (start.size and start[-1] + length[-1] > total):
        raise ValueError("regions overlap or run past the stream")
    runs = np.empty(2 * start.size, dtype=np.int64)
    runs[0::2], runs[1::2] = gaps, length
    flags = np.zeros(2 * start.size, dtype=bool)
    flags[1::2] = True
    inside = np.repeat(flags, runs)
    bits = np.unpackbits(buf, bitorder="little")[: inside.size].view(bool)
    return np.flatnonzero(bits & inside)
