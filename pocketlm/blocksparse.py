"""Phi-3-small's block-sparse attention pattern, defined once (PHI3_SMALL.md section 4).

Positions are grouped into blocks of `block_size` tokens (block of position p: p // block_size,
counted from the start of the sequence). Query head h in query block i sees key block j iff

    j <= i  and  ( i - j < local_blocks  or  (j + h * head_step + 1) % vert_stride == 0 )

and, inside the diagonal block, only keys at positions <= the query's (causal). So each head sees
its `local_blocks` most recent blocks plus every `vert_stride`-th block before them, the vertical
blocks shifted by one per head (`head_step` = max(1, vert_stride // n_heads), or 0 for a
"homo head" pattern shared by all heads). Query heads that share a KV head see different blocks.

The runtime's C kernels, the numpy reference and the ONNX exporter's CSR layouts all read this.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BlockSparse:
    block_size: int      # tokens per block (64 in Phi-3-small)
    local_blocks: int    # most recent blocks every head sees (16)
    vert_stride: int     # every vert_stride-th earlier block is visible (8)
    homo_head: bool = False  # True: every head has the same vertical blocks

    def head_step(self, n_heads: int) -> int:
        """Shift of the vertical blocks from one query head to the next (vLLM's head_sliding_step)."""
        return 0 if self.homo_head else max(1, self.vert_stride // n_heads)

    def validate(self) -> BlockSparse:
        for name in ("block_size", "local_blocks", "vert_stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"block-sparse {name} must be a positive integer, got {value!r}")
        return self


def block_mask(bs: BlockSparse, n_heads: int, n_blocks: int) -> np.ndarray:
    """Visible key blocks: bool [n_heads, n_blocks (query block i), n_blocks (key block j)]."""
    i = np.arange(n_blocks)[None, :, None]
    j = np.arange(n_blocks)[None, None, :]
    h = np.arange(n_heads)[:, None, None]
    vertical = (j + h * bs.head_step(n_heads) + 1) % bs.vert_stride == 0
    return (j <= i) & ((i - j < bs.local_blocks) | vertical)


def token_mask(bs: BlockSparse, n_heads: int, q_pos: np.ndarray, k_len: int) -> np.ndarray:
    """Allowed (query, key) pairs: bool [n_heads, len(q_pos), k_len], block rule AND causal."""
    k_pos = np.arange(k_len)
    n_blocks = max(int(q_pos.max()), k_len - 1) // bs.block_size + 1
    blocks = block_mask(bs, n_heads, n_blocks)                         # [H, nb, nb]
    allowed = blocks[:, q_pos[:, None] // bs.block_size, k_pos[None, :] // bs.block_size]
    return allowed & (k_pos[None, None, :] <= q_pos[None, :, None])


def csr_layouts(bs: BlockSparse, n_heads: int, n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime SparseAttention's CSR inputs, one layout per distinct head pattern.

    Returns block_row_indices int32 [n_layouts, n_blocks + 1] and block_col_indices int32
    [n_layouts, max_nnz] (-1 padded). onnxruntime gives head h layout h % n_layouts: the pattern
    repeats every vert_stride / head_step heads, so that many layouts serve all heads (one for a
    homo-head pattern); a head count that is no multiple of the period gets one layout per head.
    """
    step = bs.head_step(n_heads)
    period = 1 if step == 0 else bs.vert_stride // np.gcd(step, bs.vert_stride)
    n_layouts = period if n_heads % period == 0 else n_heads
    mask = block_mask(bs, n_heads, n_blocks)[:n_layouts]
    counts = mask.sum(axis=2)                                          # [L, nb]
    rows = np.zeros((n_layouts, n_blocks + 1), dtype=np.int32)
    rows[:, 1:] = np.cumsum(counts, axis=1)
    nnz = rows[:, -1]
    cols = np.full((n_layouts, int(nnz.max())), -1, dtype=np.int32)
    for layout in range(n_layouts):
        cols[layout, : nnz[layout]] = np.nonzero(mask[layout])[1]       # row-major: by query block
    return rows, cols
