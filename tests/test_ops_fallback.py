"""The torch fallback (what a GPU runs without the compiled kernels, and every install without a
compiler on CPU) in row blocks: the same bits as in one piece, and temporary memory bounded by the
block, not the tensor. Also the backend choice: the fixed ``auto`` order and ``LEMON_EXT_BACKEND``."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lemon_ext import ops
from lemon_ext.errors import LemonError
from lemon_ext.ops import reference as R

from helpers_ops import assert_same_bits, make_case, skip_reason

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("split", list(R.SPLIT_MODES))
@pytest.mark.parametrize("kind", ["circular", "random", "sentinel"])
def test_row_blocks_give_the_bits_of_one_piece(kind, split):
    for k, (dtype, out_dtype) in enumerate([(torch.bfloat16, None), (torch.float32, torch.float16),
                                            (torch.float64, None), (torch.float32, torch.float64)]):
        args = make_case(kind, 13, 11, 40, 37, dtype=dtype, out_dtype=out_dtype, split=split, seed=k)
        whole = R.expand_reference(*args, block_elements=10**9)
        for block in (1, 37, 100, 37 * 7 + 5):  # 1 row; 1 row; 2 rows; 7 rows per block
            assert_same_bits(R.expand_reference(*args, block_elements=block), whole, f"{kind}/{split}/{dtype}/{block}")
        # with a row offset (a caller's own row block) too
        tail = args[:1] + (args[1][5:],) + args[2:3] + (args[3][5:],) + args[4:] + (5, 0)
        assert_same_bits(R.expand_reference(*tail, block_elements=74), whole[5:], f"{kind}/{split}/offset")


def test_hints_from_the_host_equal_hints_read_from_the_maps():
    args = make_case("sentinel", 13, 11, 40, 37, split="lemon")
    rm, cm, gs = args[1], args[2], args[5]
    h = R.map_hints(rm, cm, gs)
    assert h.max_group == int(gs.max()) and h.has_row_mean and h.has_col_mean and h.free_cols is not None
    assert R.lemon_levels([2]) == ((0,),) and R.lemon_levels([3]) == ((0,), (1,))
    assert R.lemon_levels([2, 5]) == ((0,), (1, 2), (3,))


_MEMORY_PROBE = textwrap.dedent("""
    import ctypes, json, sys, torch
    from lemon_ext import ops
    from lemon_ext.ops import reference as R
    def peak():
        return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
    def rss():
        return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) * 1024
    rs, cs, rt, ct = 4000, 256, 4000, 512
    src = (torch.randn(rs, cs) * 0.02).to(torch.bfloat16)
    rm, cm = torch.arange(rt) % rs, torch.arange(ct) % cs
    ops.expand(src[:8], rm[:8] % 8, cm, split="lemon", backend="torch")  # warm-up
    res = {}
    for name, block in (("blocks", R.BLOCK_ELEMENTS), ("one_piece", 10**12)):
        R.BLOCK_ELEMENTS = block
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so each run starts from the same RSS
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
        base = rss()
        out = ops.expand(src, rm, cm, split="lemon", backend="torch", seed=1, key=2)
        res[name] = peak() - base - out.nbytes
        res["target"] = out.nbytes
        del out
    print(json.dumps(res))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs")
def test_fallback_temporary_memory_is_bounded_by_the_block():
    res = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    bound = 2 * got["target"] + 256 * 2**20
    assert got["blocks"] < bound, got
    assert got["blocks"] < 0.7 * got["one_piece"], got  # one piece: O(tensor); blocks: O(block)


# ---- backend choice ----------------------------------------------------------------------------

def _count_reference(monkeypatch):
    calls = []
    real = ops.reference.expand_reference
    monkeypatch.setattr(ops.reference, "expand_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_env_backend_overrides_auto(monkeypatch):
    calls = _count_reference(monkeypatch)
    src, rm, cm = torch.randn(6, 5), torch.arange(6), torch.arange(10) % 5
    monkeypatch.setenv(ops.ENV_BACKEND, "torch")
    a = ops.expand(src, rm, cm, split="lemon")
    assert calls == [1]
    monkeypatch.setenv(ops.ENV_BACKEND, "cuda")  # serves no CPU tensor: CPU tensors keep the order
    b = ops.expand(src, rm, cm, split="lemon")
    assert_same_bits(a, b, "cuda override on a CPU tensor")
    assert calls == ([1] if skip_reason("cpu") is None else [1, 1])
    monkeypatch.setenv(ops.ENV_BACKEND, "fortran")
    with pytest.raises(LemonError, match="LEMON_EXT_BACKEND"):
        ops.expand(src, rm, cm)
    monkeypatch.setenv(ops.ENV_BACKEND, "triton")
    if skip_reason("triton") is not None:  # named but unusable: said, not silently replaced
        with pytest.raises(LemonError, match="not available"):
            ops.expand(src, rm, cm)


def test_auto_order_is_fixed_and_bit_identical_first(monkeypatch):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    cpu = torch.device("cpu")
    assert ops._resolve_backend("auto", cpu) == ("cpu" if skip_reason("cpu") is None else "torch")
    # on CUDA tensors: the bit-identical CUDA kernel, then Triton, then the reference
    monkeypatch.setattr(ops, "backends", lambda: {"torch": None, "cpu": None, "cuda": None, "triton": None})
    assert ops._resolve_backend("auto", torch.device("cuda", 0)) == "cuda"
    monkeypatch.setattr(ops, "backends", lambda: {"torch": None, "cpu": None, "cuda": "not built", "triton": None})
    assert ops._resolve_backend("auto", torch.device("cuda", 0)) == "triton"
    monkeypatch.setenv(ops.ENV_BACKEND, "torch")
    assert ops._resolve_backend("auto", torch.device("cuda", 0)) == "torch"
    assert ops._resolve_backend("cpu", cpu) == "cpu"  # an explicit backend is not overridden
