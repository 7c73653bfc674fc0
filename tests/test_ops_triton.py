"""Triton backend: within 1 ulp of the reference (bit-exact in practice), and Triton's own Philox
stream equals lemon_ext.noise. Without a GPU this runs in the Triton interpreter, which must be
switched on before triton.language is first imported: tests/conftest.py sets TRITON_INTERPRET=1
for the whole session (lemon_ext imports its Triton kernels lazily, on first use)."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")
import triton.language as tl  # noqa: E402

from lemon_ext import noise, ops  # noqa: E402
from lemon_ext.ops import reference as R  # noqa: E402

from helpers_ops import assert_within_ulp, make_case, reference, skip_reason  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(skip_reason("triton") is not None, reason=f"triton: {skip_reason('triton')}")


# Interpreter: each program (one target row) costs ~0.1 s here, so cases keep 3-6 rows.
@pytest.mark.parametrize("split", list(R.SPLIT_MODES))
def test_triton_matches_reference(split):
    dtype = (torch.float32, torch.bfloat16, torch.float16)[R.SPLIT_MODES[split] % 3]
    args = make_case("sentinel", 7, 29, 6, 61, dtype=dtype, split=split, device=DEVICE)
    assert_within_ulp(torch.ops.lemon_ext.expand_triton(*args), reference(args), 1, f"triton/{split}")


def test_triton_blocks_offsets_and_edges():
    args = make_case("random", 5, 6, 3, 23, dtype=torch.bfloat16, out_dtype=torch.float16, split="lemon",
                     device=DEVICE)
    src, rm, cm, rf, cf, gs, gp, rmean, cmean, split, ns, seed, key, odt = args
    tail = args[:1] + (rm[1:],) + args[2:3] + (rf[1:],) + args[4:] + (1, 0)
    assert_within_ulp(torch.ops.lemon_ext.expand_triton(*tail), reference(args)[1:], 1, "row offset")
    empty = args[:1] + (rm[:0],) + args[2:3] + (rf[:0],) + args[4:]
    assert torch.ops.lemon_ext.expand_triton(*empty).shape == (0, 23)
    nc = (src.t().contiguous().t(),) + args[1:]  # column-major source
    assert_within_ulp(torch.ops.lemon_ext.expand_triton(*nc), reference(args), 1, "strides")


def test_triton_through_front_door():
    src = torch.randn(3, 4, device=DEVICE)
    out = ops.expand(src, torch.arange(3, device=DEVICE), torch.arange(8, device=DEVICE) % 4,
                     split="lemon", backend="triton", out_dtype=torch.bfloat16)
    ref = ops.expand(src, torch.arange(3, device=DEVICE), torch.arange(8, device=DEVICE) % 4,
                     split="lemon", backend="torch", out_dtype=torch.bfloat16)
    assert_within_ulp(out, ref, 1, "front door")


def test_triton_opcheck():
    args = make_case("sentinel", 3, 5, 2, 9, dtype=torch.bfloat16, split="lemon", device=DEVICE)
    torch.library.opcheck(torch.ops.lemon_ext.expand_triton.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@triton.jit
def _philox_words(out, seed, N: tl.constexpr, ROW: tl.constexpr, STREAM: tl.constexpr):
    q = tl.arange(0, N).to(tl.uint32)
    z = tl.zeros_like(q)
    w0, w1, w2, w3 = tl.philox(seed, q, z + ROW, z + STREAM, z)
    tl.store(out + 4 * tl.arange(0, N) + 0, tl.uint_to_uniform_float(w0))
    tl.store(out + 4 * tl.arange(0, N) + 1, tl.uint_to_uniform_float(w1))
    tl.store(out + 4 * tl.arange(0, N) + 2, tl.uint_to_uniform_float(w2))
    tl.store(out + 4 * tl.arange(0, N) + 3, tl.uint_to_uniform_float(w3))


@triton.jit
def _rand(out, seed, N: tl.constexpr, ROW: tl.constexpr):
    # tl.rand's offset = (ROW << 32) | quad: counter (quad, ROW, 0, 0), word 0
    offs = (tl.arange(0, N).to(tl.int64) + (ROW << 32))
    tl.store(out + tl.arange(0, N), tl.rand(seed, offs))


@pytest.mark.parametrize("seed,key", [(0, 0), (2**40 + 7, 0xDEADBEEF), (-5, 123)])
def test_triton_philox_stream_equals_lemon_noise(seed, key):
    k0, k1 = noise.philox_key(seed, key)
    packed = (k1 << 32) | k0
    out = torch.empty(4 * 64, device=DEVICE)
    _philox_words[(1,)](out, packed, N=64, ROW=7, STREAM=130)
    want = noise.uniform_grid(8, 256, 130, seed, key)[7]
    assert torch.equal(out.cpu(), want), (out[:4], want[:4])
    rand = torch.empty(64, device=DEVICE)
    _rand[(1,)](rand, packed, N=64, ROW=3)
    want0 = noise.uniform(torch.tensor(3), torch.arange(64) * 4, 0, seed, key)
    assert torch.equal(rand.cpu(), want0)


# ---- draw tables: one Philox call per source-column quad and stream (as the CUDA / C++ kernels) --

@pytest.mark.parametrize("split", ["lemon", "projection", "cancel"])
def test_triton_draw_tables_wide_groups_match_the_per_element_draws(split):
    # groups up to 32 (5 LEMON levels, 32 projection / 16 cancel streams); random maps; a row
    # offset; per-quad tables and per-element draws give the reference's bits
    from lemon_ext.ops._triton import expand_triton

    for kind, shape in (("circular", (5, 3, 4, 96)), ("random", (6, 13, 5, 40))):
        args = make_case(kind, *shape, dtype=torch.bfloat16, split=split, device=DEVICE) + (3, 0)
        want = reference(args)
        assert_within_ulp(expand_triton(*args), want, 1, f"table/{kind}/{split}")
        assert_within_ulp(expand_triton(*args, draws="element"), want, 1, f"element/{kind}/{split}")


@pytest.mark.skipif(DEVICE != "cpu", reason="counts Philox lanes in the interpreter")
def test_triton_makes_one_philox_call_per_quad_and_stream(monkeypatch):
    from lemon_ext.ops import _triton as T

    lanes = []
    real = tl.philox
    monkeypatch.setattr(tl, "philox", lambda seed, c0, *a, **k: lanes.append(c0.numel) or real(seed, c0, *a, **k))
    # 29 source columns -> 8 quads; 61 target columns in groups of 2 and 3 (2 LEMON levels, 2 nodes)
    args = make_case("circular", 7, 29, 6, 61, dtype=torch.bfloat16, split="lemon")
    assert_within_ulp(T.expand_triton(*args), reference(args), 1, "table")
    table = sum(int(n) for n in lanes)
    lanes.clear()
    T.expand_triton(*args, draws="element")
    element = sum(int(n) for n in lanes)
    rows, quads, slots = 6, 8, T.stream_slots(R.SPLIT_LEMON, 3)
    assert slots == 2 and table == rows * slots * quads  # one lane (call) per quad and stream
    assert element == rows * 2 * 64  # one per element (block of 64) and level


_COMPILE_FOR_HOPPER = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lemon_ext.ops import _triton as T
fn = T._expand_kernel
names = fn.arg_names
ptrs = {"src": "*bf16", "row_map": "*i64", "col_map": "*i64", "row_factor": "*fp32", "col_factor": "*fp32",
        "group_size": "*i32", "group_pos": "*i32", "row_mean": "*fp32", "col_mean": "*fp32", "out": "*bf16",
        "scratch": "*fp32"}
scalars = {"s0": "i64", "s1": "i64", "num_rows": "i32", "num_cols": "i32", "num_quads": "i32", "slots": "i32",
           "noise_std": "fp32", "seed": "i64", "row_offset": "i64", "col_offset": "i64"}
sig = {n: ptrs.get(n) or scalars.get(n) or "constexpr" for n in names}
base = dict(HAS_RF=True, HAS_CF=True, HAS_RMEAN=True, HAS_CMEAN=True, HAS_FREE=True, OUT=1, BLOCK=1024, QBLOCK=256)
variants = [dict(SPLIT=s, DEPTH=d, MAXN=m, TABLE=t) for s, d, m, t in
            ((1, 2, 4, True), (1, 2, 4, False), (3, 0, 4, True), (4, 0, 4, True), (5, 0, 4, False), (0, 0, 1, False))]
ones = {"num_quads": 1, "slots": 1, "num_cols": 1, "row_offset": 1}  # ints equal to 1 arrive as constexprs
for k, v in enumerate(variants + [dict(variants[0], **ones)]):
    constexprs = {(names.index(n),): x for n, x in {**base, **v}.items()}
    triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 4, "enable_fp_fusion": False})
print("ok")
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile it for the GPU that is there")
def test_triton_kernel_compiles_for_hopper_without_a_gpu(tmp_path):
    """The interpreter runs the kernel's Python, not its compilation: compile every split variant
    (draw tables and per-element draws) to an sm_90 cubin with Triton's own ptxas, no GPU needed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    res = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], capture_output=True, text=True, timeout=300,
                         env=env, cwd=Path(__file__).resolve().parents[1])
    if res.returncode and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("Triton's ptxas is not available here")
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-4000:]


def test_triton_host_arrays_go_up_packed_in_one_block():
    # the launcher's upload: host maps, groups and factors in one block (one copy), aligned views
    from lemon_ext.ops._triton import _pack

    dev_tensor = torch.randn(3)  # stands for a tensor already on the device: passes through
    parts = [torch.arange(7), torch.arange(5, dtype=torch.int32) - 2, None, torch.rand(3), dev_tensor,
             torch.arange(4).reshape(2, 2)]
    block, unpack = _pack([p if p is not dev_tensor else None for p in parts], pin=False)
    assert block.numel() == 7 * 8 + 4 * 8 + 5 * 4 + 3 * 4
    got = unpack(block.clone())
    for want, t in zip(parts, got):
        if want is None or want is dev_tensor:
            continue
        assert t.dtype == want.dtype and t.shape == want.shape and torch.equal(t, want)
        assert t.data_ptr() % t.element_size() == 0
