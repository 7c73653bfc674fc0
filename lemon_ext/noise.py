"""Counter-based noise: Philox4x32-10 in pure PyTorch, the same stream as Triton's ``tl.philox``.

Every random number lemon_ext draws is a pure function of (seed, tensor key, coordinates), so the
same seed gives the same checkpoint on every backend, tiling, chunking and number of processes.

Stream layout (shared by every backend; changing it changes every checkpoint):

- Philox key:      ``k0 = seed & 0xFFFFFFFF``, ``k1 = (tensor_key ^ (seed >> 32)) & 0xFFFFFFFF``
- Philox counter:  ``(c0, c1, c2, c3) = (column >> 2, row, stream, 0)``; the draw for ``column``
  is output word ``column & 3``, so four neighbouring columns share one Philox call.
- Uniform:         Triton's ``uint_to_uniform_float``: reinterpret as int32, ``x < 0 -> -x - 1``,
  ``float(x) * 0x1.fffffep-32`` (float32 multiply), a float32 in [0, 1).

``column`` is the *source* column for draws shared by a split group, the target column for free
(random-init) columns; ``row`` is always the target row. Streams: see ``STREAM_*``.
"""
from __future__ import annotations

import zlib

import torch

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF

# Stream ids (counter word c2). Tree-split node t uses STREAM_SPLIT + t (heap numbering, t < 64).
STREAM_SPLIT = 0
STREAM_PROJECTION = 64  # + replica index m
STREAM_CANCEL = 128  # + pair index p
STREAM_FREE = 192

# Triton's constant: the largest float32 with (2**31 - 1) * scale < 1 after rounding.
UNIFORM_SCALE = float(torch.tensor(4.6566127342e-10, dtype=torch.float32))  # 0x1.fffffep-32


def tensor_key(name: str) -> int:
    """32-bit noise key of a target tensor: CRC-32 of its name (stable across Python runs)."""
    return zlib.crc32(name.encode("utf-8")) & MASK32


def philox_key(seed: int, key: int) -> tuple[int, int]:
    """The two 32-bit Philox key words for a (seed, tensor key) pair."""
    seed &= (1 << 64) - 1
    return seed & MASK32, (key ^ (seed >> 32)) & MASK32


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of ``a * b`` for a Python uint32 ``a`` and an int64 tensor of uint32.

    int64 cannot hold a 64-bit product, so ``b`` is split into 16-bit halves (products < 2**48).
    """
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    x = a * b_lo  # < 2**48
    y = a * b_hi  # < 2**48
    mid = x + ((y & 0xFFFF) << 16)  # < 2**49
    lo = mid & MASK32
    hi = (y >> 16) + (mid >> 32)
    return hi & MASK32, lo


def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 values (broadcastable); returns 4 words."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & MASK32 for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float for uint32 words held in int64: float32 in [0, 1]."""
    signed = torch.where(x >= 2**31, x - 2**32, x)
    signed = torch.where(signed < 0, -signed - 1, signed)  # ~x
    return signed.to(torch.float32) * UNIFORM_SCALE


def uniform(
    rows: torch.Tensor, cols: torch.Tensor, stream: int, seed: int, key: int
) -> torch.Tensor:
    """Uniform draws in [0, 1] for broadcast (row, column) coordinates of one stream.

    Args:
        rows: int64 tensor of target rows, shape broadcastable with ``cols`` (e.g. (R, 1)).
        cols: int64 tensor of columns (source or target, see module doc), e.g. (1, C).
    Returns:
        float32 tensor of the broadcast shape.

    One Philox call is made per *distinct* (row, column >> 2) pair when ``cols`` is a sorted
    unique 1-D range; callers with repeated columns gather from ``uniform_grid`` instead.
    """
    k0, k1 = philox_key(seed, key)
    rows = torch.as_tensor(rows, dtype=torch.int64)
    cols = torch.as_tensor(cols, dtype=torch.int64)
    zero = torch.zeros((), dtype=torch.int64, device=rows.device)  # not a CPU scalar: broadcast with GPU tensors
    words = philox4x32(cols >> 2, rows, zero + stream, zero, k0, k1)
    lane = cols & 3
    w = torch.where(lane == 0, words[0], torch.where(lane == 1, words[1], torch.where(lane == 2, words[2], words[3])))
    return uint32_to_uniform(w)


def uniform_grid(
    num_rows: int, num_cols: int, stream: int, seed: int, key: int, device=None, row_offset: int = 0
) -> torch.Tensor:
    """Draws for every (row_offset <= row < row_offset + num_rows, column < num_cols): float32
    (num_rows, num_cols).

    Makes one Philox call per 4 columns and keeps all four words.
    """
    k0, k1 = philox_key(seed, key)
    quads = (num_cols + 3) // 4
    r = torch.arange(num_rows, dtype=torch.int64, device=device).unsqueeze(1) + row_offset
    q = torch.arange(quads, dtype=torch.int64, device=device).unsqueeze(0)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    words = philox4x32(q, r, zero + stream, zero, k0, k1)
    grid = torch.stack(words, dim=-1).reshape(num_rows, quads * 4)[:, :num_cols]
    return uint32_to_uniform(grid)
