"""The expansion op in pure PyTorch: the definition of correct for every backend.

One target tensor, viewed as 2-D (rows = output axis, columns = input axis), is built element by
element from a 2-D source view S of shape (R_S, C_S):

    r = row_map[i], c = col_map[j]
    if r == ZERO or c == ZERO:      T[i, j] = +0.0
    elif c == FREE:                 T[i, j] = noise_std * sqrt(3) * (2 U(i, j, STREAM_FREE) - 1)
                                              (+0.0 when noise_std == 0)
    else:
        v = (S'[r, c] * row_factor[i]) * col_factor[j]      # float32, two roundings, no FMA
        T[i, j] = split(v; n = group_size[j], m = group_pos[j], mode)

S' is S with the mean row appended (r == MEAN: mean over source rows, ``row_mean``) and the mean
column appended (c == MEAN: mean over source columns, ``col_mean``); both means are float64 sums
rounded once to float32 (``axis_means``). A split group is the set of target columns sharing one
source column c; ``group_size[j]`` is its size n and ``group_pos[j]`` the rank m of j inside it.

Split modes (the parts of a group sum to v; all arithmetic float32, rounding named explicitly):
- NONE:        v.
- LEMON:       unequal parts exact in the output dtype. With vd = round_out(v), walk a binary
               tree from the root (node 0, heap numbering) to leaf m. At a node holding value x for
               cnt parts: n_l = ceil(cnt/2), n_r = floor(cnt/2), u = U(i, c, STREAM_SPLIT + node);
               if n_l == n_r: swap = u >= 0.5, a = 0.5 + 0.25 * (2u - swap), else
               base = n_l / cnt, a = base + (base - 0.5) * (2u - 1); so a is in [1/2, 1].
               A = round_out(a * x), B = x - A (exact: Sterbenz), left gets A and right B
               (swapped when swap). Parts stay within a factor ~4 of v/n, so any float32 sum of
               them is exact for 16-bit outputs.
- EQUAL:       v / n (Net2Net / bert2BERT-FPI; exact only for n a power of two).
- PROJECTION:  v / n + noise_std * (r_m - mean_q r_q), r_q = sqrt(3) (2 U(i, c, PROJ + q) - 1),
               the mean a left-to-right float32 sum divided by n (LEMON's code; exact in fp32 up
               to rounding).
- CANCEL:      parts that sum to zero (new layers with zero output): pairs (m = 2p, 2p + 1) get
               +e, -e with e = round_out((0.5 + 0.25 U(i, c, CANCEL + p)) * vd); the last part of an
               odd group and singletons get 0.
- CANCEL_EQUAL: as CANCEL with e = round_out(0.5 * vd).
The result is cast to ``out_dtype`` with round-to-nearest-even.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .. import noise

# Map sentinels (row_map / col_map entries below zero).
ZERO = -1
MEAN = -2
FREE = -3  # column maps only

# Split modes.
SPLIT_NONE = 0
SPLIT_LEMON = 1
SPLIT_EQUAL = 2
SPLIT_PROJECTION = 3
SPLIT_CANCEL = 4
SPLIT_CANCEL_EQUAL = 5
SPLIT_MODES = {
    "none": SPLIT_NONE,
    "lemon": SPLIT_LEMON,
    "equal": SPLIT_EQUAL,
    "projection": SPLIT_PROJECTION,
    "cancel": SPLIT_CANCEL,
    "cancel_equal": SPLIT_CANCEL_EQUAL,
}

SQRT3 = float(torch.tensor(math.sqrt(3.0), dtype=torch.float32))
MAX_GROUP_SIZE = 32  # tree nodes must stay below STREAM_PROJECTION (64)


@dataclass(frozen=True)
class MapHints:
    """What the reference reads from the maps beyond elementwise ops (each a host sync if the maps
    live on a GPU), computed once on the host by ``map_hints``.

    max_group: the largest split group (0 without source columns); num_src_cols: 1 + the largest
    source column a target column reads (the width of the draw grid); lemon_levels: per LEMON tree
    level, the node ids holding more than one part in some group (the streams that level draws);
    has_row_mean / has_col_mean: a MEAN entry in row_map / col_map; free_cols: int64 indices of the
    FREE columns (on the computation's device), or None.
    """

    max_group: int
    num_src_cols: int
    lemon_levels: tuple[tuple[int, ...], ...]
    has_row_mean: bool
    has_col_mean: bool
    free_cols: torch.Tensor | None


def lemon_levels(group_sizes) -> tuple[tuple[int, ...], ...]:
    """Per tree level, the sorted node ids (heap numbering) with more than one part, over groups of
    the given sizes (every rank of a group exists, so every node of its tree is visited)."""
    levels: list[set] = []

    def walk(cnt: int, node: int, depth: int) -> None:
        if cnt <= 1:
            return
        while len(levels) <= depth:
            levels.append(set())
        levels[depth].add(node)
        walk((cnt + 1) // 2, 2 * node + 1, depth + 1)
        walk(cnt // 2, 2 * node + 2, depth + 1)

    for n in sorted(set(int(x) for x in group_sizes)):
        walk(n, 0, 0)
    return tuple(tuple(sorted(s)) for s in levels)


def map_hints(row_map: torch.Tensor, col_map: torch.Tensor, group_size: torch.Tensor) -> MapHints:
    """``MapHints`` read from the maps (on the host: free; on a GPU: a few device syncs)."""
    return with_row_map(column_hints(col_map, group_size), row_map)


def column_hints(col_map: torch.Tensor, group_size: torch.Tensor) -> MapHints:
    """The column side of ``map_hints`` (``has_row_mean`` left False: see ``with_row_map``), which
    many row maps share: the ops digest it once per column map."""
    col_map = col_map.to(torch.int64)
    gs = group_size.to(torch.int64)
    used = col_map[col_map >= 0]
    free = torch.nonzero(col_map == FREE).squeeze(1)
    return MapHints(
        max_group=int(gs.max()) if gs.numel() else 0,
        num_src_cols=int(used.max()) + 1 if used.numel() else 0,
        lemon_levels=lemon_levels(torch.unique(gs[gs > 1]).tolist()),
        has_row_mean=False,
        has_col_mean=bool((col_map == MEAN).any()),
        free_cols=free if free.numel() else None,
    )


def with_row_map(hints: MapHints, row_map: torch.Tensor) -> MapHints:
    """Column ``hints`` completed with the row side of ``row_map``."""
    return dataclasses.replace(hints, has_row_mean=bool((row_map.to(torch.int64) == MEAN).any()))


def group_layout(col_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split groups of a column map.

    Args:
        col_map: int64 (C_T,), source columns >= 0 or sentinels.
    Returns:
        (group_size, group_pos): int32 (C_T,) each. For sentinel columns both are 0 and 0.
        group_size[j] = number of targets sharing col_map[j]; group_pos[j] = rank of j among them.
    """
    col_map = col_map.to(torch.int64)
    size = torch.zeros_like(col_map, dtype=torch.int32)
    pos = torch.zeros_like(col_map, dtype=torch.int32)
    valid = col_map >= 0
    if valid.any():
        src = col_map[valid]
        counts = torch.bincount(src)
        size[valid] = counts[src].to(torch.int32)
        # rank inside the group: stable sort by source column, then position within each run.
        # Run starts come from the counts (O(n)); searchsorted here cost 14 ms per tensor.
        order = torch.sort(src, stable=True).indices
        sorted_src = src[order]
        starts = torch.cumsum(counts, 0) - counts
        ranks = torch.arange(src.numel(), device=src.device) - starts[sorted_src]
        vpos = torch.empty_like(src)
        vpos[order] = ranks
        pos[valid] = vpos.to(torch.int32)
    return size, pos


def axis_means(
    source: torch.Tensor, row_map: torch.Tensor | None, col_map: torch.Tensor | None, *,
    need: tuple[bool, bool] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Mean row (over source rows, (C_S,)) and mean column (over source columns, (R_S,)), float32.

    Computed in float64 and rounded once (kept in float64 for float64 sources), so every backend
    receives the same bits. None where the corresponding map has no MEAN entry. ``need``: (row
    mean?, column mean?) when known on the host (``MapHints``), so the maps are not read here.
    """
    row_mean = col_mean = None
    out = torch.float64 if source.dtype == torch.float64 else torch.float32
    if need is None:
        need = (bool((row_map == MEAN).any()), bool((col_map == MEAN).any()))
    if need[0]:
        row_mean = (source.sum(dim=0, dtype=torch.float64) / source.shape[0]).to(out)
    if need[1]:
        col_mean = (source.sum(dim=1, dtype=torch.float64) / source.shape[1]).to(out)
    return row_mean, col_mean


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float32 values to the nearest ``dtype`` value (RNE), returned as float32."""
    if dtype == torch.float32 or dtype == torch.float64:
        return x
    return x.to(dtype).to(torch.float32)


def _gather(
    source: torch.Tensor,
    row_map: torch.Tensor,
    col_map: torch.Tensor,
    row_mean: torch.Tensor | None,
    col_mean: torch.Tensor | None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """S'[row_map][:, col_map] in compute_dtype with ZERO/FREE -> 0 and MEAN -> the given means.

    Only the source rows this block reads are converted (never a compute_dtype copy of the whole
    source): each becomes [S[r, :], 0, col_mean[r]], the MEAN row [row_mean, 0, 0], a ZERO row 0.
    """
    rs, cs = source.shape
    is_row = row_map >= 0
    if rs:
        rows = source.index_select(0, row_map.clamp(min=0)).to(compute_dtype)
    else:
        rows = torch.zeros(row_map.numel(), cs, dtype=compute_dtype, device=source.device)
    zero = torch.zeros((), dtype=compute_dtype, device=source.device)
    if row_mean is not None:
        rows = torch.where((row_map == MEAN).unsqueeze(1), row_mean.to(compute_dtype).unsqueeze(0), rows)
        rows = torch.where((is_row | (row_map == MEAN)).unsqueeze(1), rows, zero)
    else:
        rows = torch.where(is_row.unsqueeze(1), rows, zero)
    if col_mean is not None and rs:
        mean_col = torch.where(is_row, col_mean.to(compute_dtype).index_select(0, row_map.clamp(min=0)), zero)
    else:
        mean_col = torch.zeros(row_map.numel(), dtype=compute_dtype, device=source.device)
    aug = torch.cat([rows, torch.zeros_like(mean_col).unsqueeze(1), mean_col.unsqueeze(1)], dim=1)
    del rows
    ci = torch.where(col_map >= 0, col_map, torch.where(col_map == MEAN, cs + 1, cs))
    return aug.index_select(1, ci)


class _SourceDraws:
    """Uniform draws U(i, c, stream) for target rows i and each target column's source column c.

    Computed on the (R_T, C_S) grid (one Philox call per 4 source columns) and gathered, so the
    reference costs the same whatever the replication factor.
    """

    def __init__(self, num_rows: int, col_map: torch.Tensor, seed: int, key: int, row_offset: int = 0,
                 dtype: torch.dtype = torch.float32, num_src_cols: int | None = None):
        self.num_rows, self.dtype = num_rows, dtype
        self.row_offset = row_offset
        self.cols = col_map.clamp(min=0)
        if num_src_cols is None:
            num_src_cols = int(self.cols.max()) + 1 if col_map.numel() else 0
        self.num_src_cols = max(1, num_src_cols) if col_map.numel() else 0
        self.seed, self.key = seed, key
        self._cache: dict[int, torch.Tensor] = {}

    def __call__(self, stream: int) -> torch.Tensor:
        if stream not in self._cache:
            grid = noise.uniform_grid(
                self.num_rows, self.num_src_cols, stream, self.seed, self.key, device=self.cols.device,
                row_offset=self.row_offset,
            )
            self._cache[stream] = grid.index_select(1, self.cols).to(self.dtype)
        return self._cache[stream]


def _split_lemon(vd, size, pos, draws, out_dtype, levels):
    """``levels``: per tree level, the node ids with more than one part (``lemon_levels``)."""
    val = vd
    cnt = size.to(torch.int64).unsqueeze(0).expand_as(vd)
    pos = pos.to(torch.int64).unsqueeze(0).expand_as(vd)
    lo = torch.zeros_like(cnt)
    node = torch.zeros_like(cnt)
    for nodes in levels:
        active = cnt > 1
        n_l = (cnt + 1) // 2
        n_r = cnt // 2
        u = torch.zeros_like(val)
        for t in nodes:
            sel = node == t
            u = torch.where(sel, draws(noise.STREAM_SPLIT + t), u)
        even = n_l == n_r
        swap = even & (u >= 0.5)
        a_even = 0.5 + 0.25 * (2.0 * u - swap.to(torch.float32))
        base = n_l.to(torch.float32) / cnt.clamp(min=1).to(torch.float32)
        a_odd = base + (base - 0.5) * (2.0 * u - 1.0)
        a = torch.where(even, a_even, a_odd)
        first = round_to(a * val, out_dtype)
        second = val - first
        left = torch.where(swap, second, first)
        right = torch.where(swap, first, second)
        go_left = pos < lo + n_l
        val = torch.where(active, torch.where(go_left, left, right), val)
        lo = torch.where(active & ~go_left, lo + n_l, lo)
        node = torch.where(active, torch.where(go_left, 2 * node + 1, 2 * node + 2), node)
        cnt = torch.where(active, torch.where(go_left, n_l, n_r), cnt)
    return val


def _split_projection(v, size, pos, draws, noise_std, max_n):
    n = size.to(torch.float32).clamp(min=1).unsqueeze(0)
    total = torch.zeros_like(v)
    mine = torch.zeros_like(v)
    posb = pos.to(torch.int64).unsqueeze(0)
    sizeb = size.to(torch.int64).unsqueeze(0)
    for q in range(max_n):
        r_q = (2.0 * draws(noise.STREAM_PROJECTION + q) - 1.0) * SQRT3
        total = torch.where(sizeb > q, total + r_q, total)
        # (sizeb > q): a size-0 "group" (a MEAN column) is a singleton and gets no noise
        mine = torch.where((posb == q) & (sizeb > q), r_q, mine)
    mean = total / n
    return v / n + noise_std * (mine - mean)


def _split_cancel(vd, size, pos, draws, out_dtype, equal: bool, max_n: int):
    sizeb = size.to(torch.int64).unsqueeze(0)
    posb = pos.to(torch.int64).unsqueeze(0)
    pair = posb // 2
    if equal:
        a = torch.full_like(vd, 0.5)
    else:
        a = torch.zeros_like(vd)
        for p in range(max_n // 2):
            a = torch.where(pair == p, 0.5 + 0.25 * draws(noise.STREAM_CANCEL + p), a)
    e = round_to(a * vd, out_dtype)
    # size 0 (a MEAN column) counts as a singleton: 0, like any unpaired part
    unpaired = (sizeb <= 1) | ((posb == sizeb - 1) & (sizeb % 2 == 1))
    part = torch.where(posb % 2 == 0, e, -e)
    return torch.where(unpaired, torch.zeros_like(part), part)


# Target elements per row block of the reference: its temporaries (float32 values, int64 tree
# state, Philox words) take ~80-100 bytes per element, so a block of 2**20 elements stays near
# 100 MB whatever the tensor (a 64000 x 1024 LM head took 7.1 GB in one piece).
BLOCK_ELEMENTS = 1 << 20


def expand_reference(
    source: torch.Tensor,
    row_map: torch.Tensor,
    col_map: torch.Tensor,
    row_factor: torch.Tensor | None,
    col_factor: torch.Tensor | None,
    group_size: torch.Tensor,
    group_pos: torch.Tensor,
    row_mean: torch.Tensor | None,
    col_mean: torch.Tensor | None,
    split: int,
    noise_std: float,
    seed: int,
    key: int,
    out_dtype: torch.dtype,
    row_offset: int = 0,
    col_offset: int = 0,
    *,
    hints: MapHints | None = None,
    block_elements: int | None = None,
) -> torch.Tensor:
    """Reference kernel. Shapes: source (R_S, C_S) any float dtype; row_map, row_factor (R_T,);
    col_map, col_factor, group_size, group_pos (C_T,); row_mean (C_S,); col_mean (R_S,).
    Returns out_dtype (R_T, C_T) on source's device. See the module doc for the definition.

    row_offset / col_offset: the target row / column index of this block's first row / column,
    as the noise counters see it (i -> i + row_offset in every draw, j -> j + col_offset in FREE
    draws). Computing row or column blocks of a tensor separately with the offsets (and the
    full tensor's group_size / group_pos / means) gives the bytes of the whole.

    hints: ``MapHints`` of these maps, computed on the host (``map_hints``); without them they
    are read from the maps here (device syncs when the maps live on a GPU). block_elements:
    target elements per row block (default ``BLOCK_ELEMENTS``); the blocks are computed one after
    another with their row offsets (same bytes), so temporaries stay O(block), not O(tensor)."""
    row_map = row_map.to(torch.int64)
    col_map = col_map.to(torch.int64)
    num_rows, num_cols = row_map.numel(), col_map.numel()
    if num_rows == 0 or num_cols == 0:
        return torch.empty(num_rows, num_cols, dtype=out_dtype, device=source.device)
    if hints is None:
        hints = map_hints(row_map, col_map, group_size)
    rows_per_block = max(1, (block_elements or BLOCK_ELEMENTS) // num_cols)
    if rows_per_block >= num_rows:
        return _expand_block(source, row_map, col_map, row_factor, col_factor, group_size, group_pos, row_mean,
                             col_mean, split, noise_std, seed, key, out_dtype, row_offset, col_offset, hints)
    out = torch.empty(num_rows, num_cols, dtype=out_dtype, device=source.device)
    for a in range(0, num_rows, rows_per_block):
        b = min(num_rows, a + rows_per_block)
        out[a:b] = _expand_block(source, row_map[a:b], col_map, None if row_factor is None else row_factor[a:b],
                                 col_factor, group_size, group_pos, row_mean, col_mean, split, noise_std, seed,
                                 key, out_dtype, row_offset + a, col_offset, hints)
    return out


def _expand_block(source, row_map, col_map, row_factor, col_factor, group_size, group_pos, row_mean, col_mean,
                  split, noise_std, seed, key, out_dtype, row_offset, col_offset, hints: MapHints) -> torch.Tensor:
    """One row block of ``expand_reference`` (whole-tensor column layout, block rows)."""
    num_rows = row_map.numel()
    # float64 checkpoints are computed in float64 (the losslessness tests); everything else in
    # float32, the precision every native backend reproduces bit for bit.
    wide = source.dtype == torch.float64 or out_dtype == torch.float64
    compute_dtype = torch.float64 if wide else torch.float32
    v = _gather(source, row_map, col_map, row_mean, col_mean, compute_dtype)
    if row_factor is not None:
        v = v * row_factor.to(compute_dtype).unsqueeze(1)
    if col_factor is not None:
        v = v * col_factor.to(compute_dtype).unsqueeze(0)
    draws = _SourceDraws(num_rows, col_map, seed, key, row_offset, compute_dtype, hints.num_src_cols)
    noise_std = float(torch.tensor(noise_std, dtype=torch.float32))
    if split == SPLIT_NONE:
        part = v
    elif split == SPLIT_LEMON:
        part = _split_lemon(round_to(v, out_dtype), group_size, group_pos, draws, out_dtype, hints.lemon_levels)
    elif split == SPLIT_EQUAL:
        part = v / group_size.to(torch.float32).clamp(min=1).unsqueeze(0)
    elif split == SPLIT_PROJECTION:
        part = _split_projection(v, group_size, group_pos, draws, noise_std, hints.max_group)
    elif split in (SPLIT_CANCEL, SPLIT_CANCEL_EQUAL):
        part = _split_cancel(round_to(v, out_dtype), group_size, group_pos, draws, out_dtype,
                             split == SPLIT_CANCEL_EQUAL, hints.max_group)
    else:
        raise ValueError(f"unknown split mode {split}")
    del v
    if hints.free_cols is not None:
        free = (col_map == FREE).unsqueeze(0)
        if noise_std == 0.0:
            free_val = torch.zeros_like(part)
        else:
            free_cols = hints.free_cols
            rows = torch.arange(num_rows, device=source.device).unsqueeze(1) + row_offset
            u = noise.uniform(rows, free_cols.unsqueeze(0) + col_offset, noise.STREAM_FREE, seed, key)
            free_val = torch.zeros_like(part)
            free_val[:, free_cols] = (noise_std * ((2.0 * u - 1.0) * SQRT3)).to(part.dtype)
        part = torch.where(free, free_val, part)
    zero = (row_map == ZERO).unsqueeze(1) | (col_map == ZERO).unsqueeze(0)
    part = torch.where(zero, torch.zeros_like(part), part)
    return part.to(out_dtype)
