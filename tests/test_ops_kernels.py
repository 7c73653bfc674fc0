"""Every native backend of lemon_ext::expand equals the reference bit for bit (CPU C++ always;
CUDA kernels on a GPU machine, where Triton may differ by 1 ulp of the output dtype)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lemon_ext import ops
from lemon_ext.ops import reference as R

from helpers_ops import (FLOAT_DTYPES, assert_same_bits, assert_within_ulp, available_devices,
                         make_case, native_backends, reference, skip_reason)

CASES = [(d, b) for d in available_devices() for b in native_backends(d)]


def run_backend(backend: str, args) -> torch.Tensor:
    reason = skip_reason(backend)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    if backend == "triton":
        return torch.ops.lemon_ext.expand_triton(*args)
    return torch.ops.lemon_ext.expand(*args)


def check(backend: str, args, what: str) -> None:
    got = run_backend(backend, args)
    want = reference(args)
    if backend == "triton":
        assert_within_ulp(got, want, 1, what)
    else:
        assert_same_bits(got, want, what)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("split", list(R.SPLIT_MODES))
@pytest.mark.parametrize("kind", ["circular", "random", "sentinel"])
def test_matches_reference_each_split_and_map(device, backend, split, kind):
    # sizes no multiple of any block (vector widths 4/8/16, quads, 512-thread CTAs)
    for k, dtype in enumerate(FLOAT_DTYPES):
        args = make_case(kind, 37, 29, 75, 61, dtype=dtype, split=split, seed=k, device=device)
        check(backend, args, f"{kind}/{split}/{dtype}")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
def test_dtype_pairs(device, backend, dtype, out_dtype):
    for split in ("none", "lemon"):
        args = make_case("sentinel", 23, 41, 40, 83, dtype=dtype, out_dtype=out_dtype, split=split, device=device)
        check(backend, args, f"{dtype}->{out_dtype}/{split}")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("kind", ["circular", "random", "sentinel"])
def test_wide_rows_take_every_vector_path(device, backend, kind):
    # 301 source columns = 76 Philox quads: the CPU kernel's 64-quad and 16-quad SIMD blocks plus
    # padding; 700 target columns: long contiguous runs and gathered stretches in one row.
    for split in ("lemon", "cancel", "none"):
        args = make_case(kind, 9, 301, 11, 700, dtype=torch.bfloat16, split=split, device=device)
        check(backend, args, f"wide rows/{kind}/{split}")


WIDE_ROW_CASES = [(kind, split) for kind in ("circular", "random") for split in ("lemon", "cancel", "projection")]


@pytest.mark.skipif(skip_reason("cpu") is not None, reason=f"cpu: {skip_reason('cpu')}")
@pytest.mark.parametrize("path", ["avx2", "scalar"])
def test_every_philox_path_gives_the_same_bits(path, tmp_path):
    # The C++ kernel picks its Philox path once per process (AVX-512 here); LEMON_EXT_PHILOX makes
    # a fresh process take the narrower ones, so all three are checked on this machine.
    out = tmp_path / "out.pt"
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from helpers_ops import make_case
        outs = [torch.ops.lemon_ext.expand(*make_case(kind, 9, 301, 11, 700, dtype=torch.bfloat16, split=split))
                for kind, split in {WIDE_ROW_CASES!r}]
        torch.save(outs, {str(out)!r})
    """)
    env = dict(os.environ, LEMON_EXT_PHILOX=path)
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for (kind, split), got in zip(WIDE_ROW_CASES, torch.load(out)):
        want = reference(make_case(kind, 9, 301, 11, 700, dtype=torch.bfloat16, split=split))
        assert_same_bits(got, want, f"{path}/{kind}/{split}")


@pytest.mark.parametrize("device,backend", CASES)
def test_wide_groups_and_no_factors(device, backend):
    # groups up to MAX_GROUP_SIZE (5-level LEMON trees, 32 projection streams), no factors
    for split in R.SPLIT_MODES:
        args = make_case("circular", 5, 3, 7, 96, split=split, factors=False, device=device)
        check(backend, args, f"wide/{split}")


@pytest.mark.parametrize("device,backend", CASES)
def test_shapes_edge(device, backend):
    for rs, cs, rt, ct in [(1, 1, 1, 1), (1, 7, 1, 13), (3, 5, 0, 9), (3, 5, 4, 0), (2, 3, 2, 3)]:
        args = make_case("random" if rt and ct else "circular", rs, cs, rt, ct, split="lemon", device=device)
        check(backend, args, f"{rs}x{cs}->{rt}x{ct}")


@pytest.mark.parametrize("device,backend", CASES)
def test_non_contiguous_source(device, backend):
    args = list(make_case("sentinel", 31, 19, 50, 40, dtype=torch.bfloat16, device=device))
    base = torch.randn(19, 31).to(args[0])
    for src in (base.t(), torch.randn(31, 45).to(args[0])[:, 3:41:2]):  # transposed; column step 2
        assert not src.is_contiguous()
        args[0] = src
        args[7], args[8] = R.axis_means(src, args[1], args[2])
        check(backend, tuple(args), f"strides {src.stride()}")


@pytest.mark.parametrize("device,backend", CASES)
def test_special_values_round_like_torch(device, backend):
    # fp16 subnormals, values rounding to fp16/bf16 infinity, ties; split none and lemon
    vals = torch.tensor([0.0, -0.0, 1e-8, -3e-7, 6.0e-5, 65504.0, 65519.0, 65520.0, 1e6, -1e30,
                         1.00390625, 1.0 + 2**-9, 3.4e38, 2.0**-126, 2.0**-140, 0.33333334])
    src = vals.repeat(3, 1).to(device)
    rm, cm = torch.arange(3, device=device), torch.arange(32, device=device) % 16
    gs, gp = R.group_layout(cm)
    for out_dtype in (torch.float16, torch.bfloat16):
        for split in (R.SPLIT_NONE, R.SPLIT_LEMON):
            args = (src, rm, cm, None, None, gs, gp, None, None, split, 0.0, 5, 6, out_dtype)
            check(backend, args, f"special/{out_dtype}/{split}")


@pytest.mark.parametrize("device,backend", CASES)
def test_row_and_column_blocks_give_the_same_bytes(device, backend):
    # draws depend only on (seed, key, target row, column): blocks computed with offsets and the
    # whole tensor's group layout / means reproduce the whole tensor
    args = make_case("sentinel", 37, 29, 75, 61, dtype=torch.bfloat16, split="projection", device=device)
    whole = run_backend(backend, args)
    src, rm, cm, rf, cf, gs, gp, rmean, cmean, split, ns, seed, key, odt = args
    rows = [run_backend(backend, (src, rm[a:b], cm, rf[a:b], cf, gs, gp, rmean, cmean, split, ns, seed, key, odt, a, 0))
            for a, b in ((0, 10), (10, 11), (11, 75))]
    assert_same_bits(torch.cat(rows, 0), whole, "row blocks")
    cols = [run_backend(backend, (src, rm, cm[a:b], rf, cf[a:b], gs[a:b], gp[a:b], rmean, cmean, split, ns, seed, key, odt, 0, a))
            for a, b in ((0, 17), (17, 61))]
    assert_same_bits(torch.cat(cols, 1), whole, "column blocks")


@pytest.mark.parametrize("device", available_devices())
def test_front_door_row_offset(device):
    src = torch.randn(16, 8, device=device)
    rm, cm = torch.arange(32, device=device) % 16, torch.arange(24, device=device) % 8
    kw = dict(split="lemon", seed=3, key=4, out_dtype=torch.bfloat16)
    whole = ops.expand(src, rm, cm, **kw)
    parts = [ops.expand(src, rm[a:b], cm, row_offset=a, **kw) for a, b in ((0, 5), (5, 32))]
    assert_same_bits(torch.cat(parts), whole, "front door row blocks")
    assert_same_bits(whole, ops.expand(src, rm, cm, backend="torch", **kw), "auto vs torch")


def test_seed_and_key_change_the_noise():
    base = make_case("circular", 8, 8, 8, 16, split="lemon", factors=False)
    a = torch.ops.lemon_ext.expand(*base) if skip_reason("cpu") is None else reference(base)
    other = list(base)
    other[12] += 1
    b = reference(tuple(other))
    assert not torch.equal(a, b)
    assert torch.equal(a[:, :8] + a[:, 8:], b[:, :8] + b[:, 8:])  # the parts still sum to v
