"""Triton kernel of lemon_ext::expand: persistent programs, one target row at a time.

The definition is ``reference.py``; the draws are ``tl.philox`` with the counter layout of
``lemon_ext.noise`` (c0 = column >> 2, c1 = row, c2 = stream, c3 = 0; word column & 3) and
``tl.uint_to_uniform_float``, the functions noise.py reproduces bit for bit.

Design (measured leads, shared/ENVIRONMENT.md, H100): a program per output row keeps the source
row hot in L1/L2 while its columns are gathered (2.1 TB/s vs 0.25-0.48 TB/s for 2-D tiles), and one
Philox call per 4 draws keeps 2.0 TB/s where a call per element (``tl.rand``) fell to 0.8. So, as
the CUDA and C++ kernels do, each row first makes one Philox call per (source-column quad, stream)
the split reads and keeps all four words in a draw table; the replicas then gather their draws
from it. Triton has no gather from shared memory, so the table is a per-program scratch row in
global memory (L1/L2-resident: 4 x C_S bytes per stream), written and read by the same program
between two barriers; the grid is persistent (a few programs per SM, each walking rows) so the
scratch stays small. FREE columns (random init, rare) draw per element at their target column,
as the CUDA kernel does. ``draws="element"`` keeps the earlier per-element draws (one Philox call
per element and tree level) for comparison on a GPU.

Exactness: roundings to the output dtype are done with integer bit operations (round to nearest
even), divisions with ``div_rn`` and FMA contraction is switched off at launch, so results match
the reference bit for bit in the interpreter; the tests still allow 1 ulp of the output dtype.
The interpreter truncates float32 -> bf16 casts; the final cast here only ever sees values that
are already representable, so truncation is exact. All offsets are int64.

Maps are host data: given as CPU tensors beside a GPU source (what ``lemon_ext.ops.expand``
passes), everything the launch needs from them (largest group, FREE columns) is read on the host
and they go up through pinned memory without a device sync.

Import this module only after setting ``TRITON_INTERPRET=1`` when running on CPU tensors.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import noise
from .reference import MAX_GROUP_SIZE, SPLIT_CANCEL, SPLIT_CANCEL_EQUAL, SPLIT_LEMON, SPLIT_NONE, SPLIT_PROJECTION

# Output kinds (constexpr OUT): how a float32 is rounded before the store.
_OUT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# Launch defaults (GPU), to be tuned on the H200 (benchmarks/bench_expand.py --triton-sweep):
# columns per step, warps per program, persistent programs per SM.
CONFIG = {"block": 1024, "num_warps": 4, "programs_per_sm": 4}
SCRATCH_BYTES = 256 << 20  # cap on the draw tables of all programs together


@triton.jit
def _round(x, OUT: tl.constexpr):
    """Round float32 x to the nearest OUT value (RNE), returned as float32 (NaN payloads aside)."""
    if OUT == 1:  # bf16: add 0x7FFF + lsb, keep the high half
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    elif OUT == 2:  # fp16: F. Giesen's float_to_half_fast3_rtne, then back to float32
        u = x.to(tl.uint32, bitcast=True)
        sign = u & 0x80000000
        a = u ^ sign
        inf = tl.where(a > 0x7F800000, 0x7E00, 0x7C00).to(tl.uint32)
        sub = (a.to(tl.float32, bitcast=True) + 0.5).to(tl.uint32, bitcast=True) - 0x3F000000
        norm = (a + 0xC8000FFF + ((a >> 13) & 1)) >> 13
        h = tl.where(a >= 0x47800000, inf, tl.where(a < 0x38800000, sub, norm)) | (sign >> 16)
        return h.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        return x


@triton.jit
def _draw(seed, row, col, stream):
    """U(row, col, stream) per element: Philox counter (col >> 2, row, stream, 0), word col & 3."""
    zero = tl.zeros_like(col).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, (col >> 2).to(tl.uint32), zero + row, zero + stream, zero)
    lane = col & 3
    w = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
    return tl.uint_to_uniform_float(w)


@triton.jit
def _row_draws(tbl, seed, row, num_quads, slots, stride, base_stream, QBLOCK: tl.constexpr):
    """tbl[t * stride + 4 q + k] = U(row, 4 q + k, base_stream + t): one Philox call per quad."""
    for t in range(0, slots):
        for q0 in range(0, num_quads, QBLOCK):
            q = q0 + tl.arange(0, QBLOCK).to(tl.int64)
            qm = q < num_quads
            z = tl.zeros_like(q).to(tl.uint32)
            stream = z + tl.cast(base_stream + t, tl.uint32)
            w0, w1, w2, w3 = tl.philox(seed, q.to(tl.uint32), z + row, stream, z)
            at = tbl + t * stride + 4 * q
            tl.store(at + 0, tl.uint_to_uniform_float(w0), mask=qm)
            tl.store(at + 1, tl.uint_to_uniform_float(w1), mask=qm)
            tl.store(at + 2, tl.uint_to_uniform_float(w2), mask=qm)
            tl.store(at + 3, tl.uint_to_uniform_float(w3), mask=qm)


@triton.jit
def _expand_kernel(
    src, s0, s1, row_map, col_map, row_factor, col_factor, group_size, group_pos, row_mean,
    col_mean, out, scratch, num_rows, num_cols, num_quads, slots, noise_std, seed, row_offset, col_offset,
    HAS_RF: tl.constexpr, HAS_CF: tl.constexpr, HAS_RMEAN: tl.constexpr, HAS_CMEAN: tl.constexpr,
    HAS_FREE: tl.constexpr, SPLIT: tl.constexpr, DEPTH: tl.constexpr, MAXN: tl.constexpr,
    OUT: tl.constexpr, TABLE: tl.constexpr, BLOCK: tl.constexpr, QBLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    stride = tl.cast(num_quads, tl.int64) * 4  # tl.cast: an int arg equal to 1 arrives as a constexpr
    tbl = scratch + pid.to(tl.int64) * slots * stride  # this program's draw table (TABLE only)
    base_stream = 0
    if SPLIT == 3:
        base_stream = 64
    elif SPLIT == 4:
        base_stream = 128
    for ii in range(pid, num_rows, tl.num_programs(0)):
        i = tl.cast(ii, tl.int64)
        r = tl.load(row_map + i)
        row = (i + row_offset).to(tl.uint32)
        if TABLE:
            tl.debug_barrier()  # every thread is done reading the previous row's table
            _row_draws(tbl, seed, row, num_quads, slots, stride, base_stream, QBLOCK)
            tl.debug_barrier()  # the table is complete before any thread gathers from it
        rf = 1.0
        if HAS_RF:
            rf = tl.load(row_factor + i)
        for j0 in range(0, num_cols, BLOCK):
            j = j0 + tl.arange(0, BLOCK).to(tl.int64)
            mask = j < num_cols
            c = tl.load(col_map + j, mask=mask, other=-1)
            v = tl.load(src + r * s0 + c * s1, mask=mask & (r >= 0) & (c >= 0), other=0.0).to(tl.float32)
            if HAS_RMEAN:
                v = tl.where((r == -2) & (c >= 0), tl.load(row_mean + c, mask=mask & (r == -2) & (c >= 0), other=0.0), v)
            if HAS_CMEAN:
                v = tl.where((r >= 0) & (c == -2), tl.load(col_mean + r + 0 * c, mask=mask & (r >= 0) & (c == -2), other=0.0), v)
            if HAS_RF:
                v = v * rf
            if HAS_CF:
                v = v * tl.load(col_factor + j, mask=mask, other=1.0)
            n = tl.load(group_size + j, mask=mask, other=0)
            m = tl.load(group_pos + j, mask=mask, other=0)
            ucol = tl.maximum(c, 0)
            if SPLIT == 1:  # LEMON tree, DEPTH levels (the deepest group's)
                val = _round(v, OUT)
                cnt = n
                lo = tl.zeros_like(n)
                node = tl.zeros_like(n)
                for _ in tl.static_range(DEPTH):
                    active = cnt > 1
                    nl = (cnt + 1) // 2
                    nr = cnt // 2
                    if TABLE:
                        u = tl.load(tbl + node.to(tl.int64) * stride + ucol, mask=mask & active, other=0.0)
                    else:
                        u = _draw(seed, row, ucol, node.to(tl.uint32))
                    even = nl == nr
                    swap = even & (u >= 0.5)
                    a_even = 0.5 + 0.25 * (2.0 * u - swap.to(tl.float32))
                    base = tl.math.div_rn(nl.to(tl.float32), tl.maximum(cnt, 1).to(tl.float32))
                    a_odd = base + (base - 0.5) * (2.0 * u - 1.0)
                    first = _round(tl.where(even, a_even, a_odd) * val, OUT)
                    second = val - first
                    left = m < lo + nl
                    val = tl.where(active, tl.where(left != swap, first, second), val)
                    lo = tl.where(active, tl.where(left, lo, lo + nl), lo)
                    node = tl.where(active, tl.where(left, 2 * node + 1, 2 * node + 2), node)
                    cnt = tl.where(active, tl.where(left, nl, nr), cnt)
                part = val
            elif SPLIT == 2:  # EQUAL
                part = tl.math.div_rn(v, tl.maximum(n, 1).to(tl.float32))
            elif SPLIT == 3:  # PROJECTION
                nf = tl.maximum(n, 1).to(tl.float32)
                total = tl.zeros_like(v)
                mine = tl.zeros_like(v)
                for q in tl.static_range(MAXN):
                    if TABLE:
                        uq = tl.load(tbl + q * stride + ucol, mask=mask & (n > q), other=0.0)
                    else:
                        uq = _draw(seed, row, ucol, tl.zeros_like(n).to(tl.uint32) + 64 + q)
                    r_q = (2.0 * uq - 1.0) * 1.7320507764816284
                    total = tl.where(n > q, total + r_q, total)
                    mine = tl.where((m == q) & (n > q), r_q, mine)
                part = tl.math.div_rn(v, nf) + noise_std * (mine - tl.math.div_rn(total, nf))
            elif SPLIT >= 4:  # CANCEL (4) / CANCEL_EQUAL (5)
                vd = _round(v, OUT)
                paired = (n > 1) & ((m != n - 1) | (n % 2 == 0))
                if SPLIT == 5:
                    a = tl.full(v.shape, 0.5, tl.float32)
                elif TABLE:
                    a = 0.5 + 0.25 * tl.load(tbl + (m // 2).to(tl.int64) * stride + ucol, mask=mask & paired, other=0.0)
                else:
                    a = 0.5 + 0.25 * _draw(seed, row, ucol, (128 + m // 2).to(tl.uint32))
                e = _round(a * vd, OUT)
                part = tl.where(paired, tl.where(m % 2 == 0, e, -e), 0.0)
            else:
                part = v
            if HAS_FREE:
                uf = _draw(seed, row, j + col_offset, tl.zeros_like(n).to(tl.uint32) + 192)
                fv = noise_std * ((2.0 * uf - 1.0) * 1.7320507764816284)
                part = tl.where(c == -3, tl.where(noise_std == 0.0, 0.0, fv), part)
            part = tl.where((c == -1) | (r == -1), 0.0, part)
            part = _round(part, OUT)  # exact RNE here, so the cast below is exact
            tl.store(out + i * num_cols + j, part.to(out.dtype.element_ty), mask=mask)


def _lemon_depth(max_n: int) -> int:
    return max((n - 1).bit_length() for n in range(1, max_n + 1)) if max_n > 1 else 0


def _lemon_node_bound(cnt: int, node: int = 0) -> int:
    """1 + the largest internal node id (heap numbering) of the tree for ``cnt`` parts."""
    if cnt <= 1:
        return 0
    return max(node + 1, _lemon_node_bound((cnt + 1) // 2, 2 * node + 1), _lemon_node_bound(cnt // 2, 2 * node + 2))


def stream_slots(split: int, max_n: int) -> int:
    """Streams a split mode draws per source column (csrc/expand_math.h num_stream_slots)."""
    if split == SPLIT_LEMON:
        return max([0] + [_lemon_node_bound(n) for n in range(2, max_n + 1)])
    if split == SPLIT_PROJECTION:
        return max_n
    if split == SPLIT_CANCEL:
        return max_n // 2
    return 0


def _pack(tensors, pin: bool):
    """The host tensors among ``tensors`` in one uint8 block (page-locked when ``pin``), larger
    elements first so every part is aligned; returns (block, unpack), unpack(copy of the block on
    any device) -> ``tensors`` with those parts replaced by views of the copy."""
    todo = sorted((k for k, t in enumerate(tensors) if t is not None and t.device.type == "cpu"),
                  key=lambda k: -tensors[k].element_size())
    spans, n = {}, 0
    for k in todo:
        nbytes = tensors[k].numel() * tensors[k].element_size()
        spans[k], n = (n, nbytes), n + nbytes
    block = torch.empty(n, dtype=torch.uint8, pin_memory=pin)
    for k, (a, nbytes) in spans.items():
        block[a:a + nbytes].view(tensors[k].dtype).copy_(tensors[k].reshape(-1))

    def unpack(up):
        return [up[spans[k][0]:spans[k][0] + spans[k][1]].view(t.dtype).view(t.shape) if k in spans else t
                for k, t in enumerate(tensors)]

    return block, unpack


def _upload(device, *tensors):
    """Host tensors -> a CUDA ``device`` in one asynchronous copy from one page-locked block (no
    sync; the caching host allocator keeps the block until the copy ran); tensors already there
    (or None) pass through."""
    if device.type != "cuda" or not any(t is not None and t.device.type == "cpu" for t in tensors):
        return list(tensors)
    block, unpack = _pack(tensors, pin=True)
    return unpack(block.to(device, non_blocking=True))


def expand_triton(
    source, row_map, col_map, row_factor, col_factor, group_size, group_pos, row_mean, col_mean,
    split, noise_std, seed, key, out_dtype, row_offset=0, col_offset=0, *, draws: str = "table",
    config: dict | None = None,
) -> torch.Tensor:
    """Launcher (same arguments as ``reference.expand_reference``); CUDA tensors, or CPU tensors
    under ``TRITON_INTERPRET=1``; maps, groups and factors may be CPU tensors beside a CUDA source
    (read on the host, uploaded asynchronously). Returns (R_T, C_T) ``out_dtype``.

    draws: "table" (one Philox call per source-column quad and stream, the default) or "element"
    (one per element and tree level: the earlier kernel, kept for GPU comparisons). config:
    overrides of ``CONFIG`` (block, num_warps, programs_per_sm)."""
    if out_dtype not in _OUT_KIND or source.dtype not in _OUT_KIND:
        raise ValueError(f"triton expand: float32/bf16/fp16 only, got {source.dtype} -> {out_dtype}")
    if not SPLIT_NONE <= split <= SPLIT_CANCEL_EQUAL:
        raise ValueError(f"triton expand: unknown split mode {split}")
    if draws not in ("table", "element"):
        raise ValueError(f"triton expand: draws must be 'table' or 'element', got {draws!r}")
    cfg = {**CONFIG, **(config or {})}
    device = source.device
    rt, ct = row_map.numel(), col_map.numel()
    out = torch.empty(rt, ct, dtype=out_dtype, device=device)
    if rt == 0 or ct == 0:
        return out
    row_map = row_map.to(torch.int64).contiguous()
    col_map = col_map.to(torch.int64).contiguous()
    group_size = group_size.to(torch.int32).contiguous()
    group_pos = group_pos.to(torch.int32).contiguous()
    # host maps: these reads are free; device maps: two syncs (direct callers only)
    max_n = int(group_size.max())
    has_free = bool((col_map == -3).any())
    if max_n > MAX_GROUP_SIZE:
        raise ValueError(f"triton expand: group size {max_n} > {MAX_GROUP_SIZE}")
    f32 = lambda t: None if t is None else t.to(torch.float32).contiguous()  # noqa: E731
    row_map, col_map, group_size, group_pos, row_factor, col_factor, row_mean, col_mean = _upload(
        device, row_map, col_map, group_size, group_pos, *map(f32, (row_factor, col_factor, row_mean, col_mean)))
    cs = source.shape[1]
    num_quads = (cs + 3) // 4
    slots = stream_slots(split, max_n) if draws == "table" else 0
    # constexpr loop bounds rounded up to powers of two: fewer compiled variants (extra
    # iterations are masked: cnt <= 1 / q >= n leave values unchanged)
    max_n = triton.next_power_of_2(max_n) if max_n > 1 else max_n
    k0, k1 = noise.philox_key(seed, key)
    dummy = row_map
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interpreting:
        # each program step costs ~2-3 ms whatever its size: whole rows per block, few programs
        block = triton.next_power_of_2(ct)
        qblock = triton.next_power_of_2(max(num_quads, 1))
        programs = min(rt, 2)
        extra = {}
    else:
        block = min(cfg["block"], triton.next_power_of_2(ct))
        qblock = min(max(cfg["block"] // 4, 16), triton.next_power_of_2(max(num_quads, 1)))
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        programs = min(rt, sms * cfg["programs_per_sm"])
        extra = {"enable_fp_fusion": False, "num_warps": cfg["num_warps"]}
    table_bytes = slots * num_quads * 16
    if slots:
        programs = max(1, min(programs, SCRATCH_BYTES // table_bytes))
        scratch = torch.empty(programs * slots * num_quads * 4, dtype=torch.float32, device=device)
    else:
        scratch = out
    _expand_kernel[(programs,)](
        source, source.stride(0), source.stride(1), row_map, col_map,
        dummy if row_factor is None else row_factor, dummy if col_factor is None else col_factor,
        group_size, group_pos, dummy if row_mean is None else row_mean,
        dummy if col_mean is None else col_mean, out, scratch, rt, ct, num_quads, slots,
        float(torch.tensor(noise_std, dtype=torch.float32)), (k1 << 32) | k0, row_offset, col_offset,
        HAS_RF=row_factor is not None, HAS_CF=col_factor is not None,
        HAS_RMEAN=row_mean is not None, HAS_CMEAN=col_mean is not None,
        HAS_FREE=has_free, SPLIT=split, DEPTH=_lemon_depth(max_n),
        MAXN=max_n, OUT=_OUT_KIND[out_dtype], TABLE=slots > 0, BLOCK=block, QBLOCK=qblock, **extra,
    )
    return out
