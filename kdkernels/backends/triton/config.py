"""Launch configurations (tile sizes, vocabulary splits) for the triton backend.

Chosen by device kind, not autotuned: on the CPU interpreter large tiles mean fewer interpreted
steps; on CUDA, GEMM-shaped tiles (64 rows x 128 vocabulary x 64 hidden, 8 warps, 3 stages) are a sane
default for Hopper and Ampere, and the vocabulary is split across programs until the grid covers the
SMs a few times over.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class Tiles:
    block_n: int
    block_v: int
    block_h: int
    num_warps: int = 4
    num_stages: int = 2

    def launch(self) -> dict:
        """Keyword arguments of a kernel launch (the interpreter ignores warps and stages)."""
        return dict(BLOCK_N=self.block_n, BLOCK_V=self.block_v, BLOCK_H=self.block_h,
                    num_warps=self.num_warps, num_stages=self.num_stages)


def linear_tiles(device: torch.device) -> Tiles:
    """Tiles for kernels that compute logits from an LM head with tl.dot."""
    if device.type != "cuda":
        return Tiles(block_n=64, block_v=256, block_h=64)
    return Tiles(block_n=64, block_v=128, block_h=64, num_warps=8, num_stages=3)


def logits_tiles(device: torch.device) -> Tiles:
    """Tiles for kernels that read a logits tensor (bandwidth bound, no tl.dot)."""
    if device.type != "cuda":
        return Tiles(block_n=64, block_v=512, block_h=16)
    return Tiles(block_n=8, block_v=1024, block_h=16, num_warps=8, num_stages=1)


def vocab_splits(device: torch.device, n_rows: int, vocab: int, tiles: Tiles) -> tuple[int, int]:
    """(columns per split, number of splits): enough programs to fill the GPU, splits a multiple
    of the tile width so no tile straddles two splits."""
    row_blocks = triton.cdiv(max(n_rows, 1), tiles.block_n)
    col_tiles = triton.cdiv(vocab, tiles.block_v)
    if device.type != "cuda":
        want = 2          # the interpreter gains nothing, but the tests exercise the split merge
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = max(1, triton.cdiv(4 * sms, row_blocks))
    splits = min(col_tiles, want)
    per = triton.cdiv(col_tiles, splits) * tiles.block_v
    return per, triton.cdiv(vocab, per)


def chunk_columns(n_rows: int, vocab: int, bytes_per_element: int, budget: int, tiles: Tiles) -> int:
    """Vocabulary columns per backward chunk: the (n_rows, chunk) gradient buffer fits `budget`."""
    cols = budget // max(1, n_rows * bytes_per_element)
    cols = max(tiles.block_v, cols // tiles.block_v * tiles.block_v)
    return min(cols, vocab)
