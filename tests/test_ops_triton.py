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
