"""Shared helpers of the op tests (tests/test_ops*.py): devices, random cases, bit comparisons."""
from __future__ import annotations

import os

import torch

from lemon_ext import ops
from lemon_ext.ops import reference as R

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available_devices() -> list[str]:
    """CPU always; "cuda" when a GPU is visible (the same tests then run there too)."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def native_backends(device: str) -> list[str]:
    """Backends (other than the reference) that serve tensors on ``device``. On a GPU the Triton
    backend joins the full matrix unless LEMON_OPS_TRITON_MATRIX=0 (each constexpr variant costs
    a compile; benchmarks/gpu_check.sh sets it to stay in its time budget, test_ops_triton.py
    still covers every split)."""
    if device != "cuda":
        return ["cpu"]
    return ["cuda", "triton"] if os.environ.get("LEMON_OPS_TRITON_MATRIX", "1") != "0" else ["cuda"]


def make_maps(kind: str, rs: int, cs: int, rt: int, ct: int, gen: torch.Generator):
    """int64 (rt,), (ct,) maps. kind: "circular" (i % n), "random" (identity then random picks),
    "sentinel" (random with ZERO / MEAN / FREE entries sprinkled in)."""
    if kind == "circular":
        return torch.arange(rt) % rs, torch.arange(ct) % cs

    def pick(n_src, n_tgt):
        head = torch.arange(min(n_src, n_tgt))
        return torch.cat([head, torch.randint(0, n_src, (n_tgt - head.numel(),), generator=gen)])

    rm, cm = pick(rs, rt), pick(cs, ct)
    if kind == "sentinel":
        rm[torch.randperm(rt, generator=gen)[: max(1, rt // 8)]] = R.ZERO
        rm[torch.randperm(rt, generator=gen)[: max(1, rt // 8)]] = R.MEAN
        for sentinel in (R.ZERO, R.MEAN, R.FREE):
            cm[torch.randperm(ct, generator=gen)[: max(1, ct // 10)]] = sentinel
    return rm, cm


def make_case(kind="random", rs=37, cs=29, rt=75, ct=61, dtype=torch.float32, out_dtype=None,
              split="lemon", noise_std=0.02, factors=True, seed=0, device="cpu"):
    """Raw-op arguments (the positional tuple of lemon_ext::expand) for a random case."""
    gen = torch.Generator().manual_seed(seed)
    source = (torch.randn(rs, cs, generator=gen) * 3).to(dtype)
    rm, cm = make_maps(kind, rs, cs, rt, ct, gen)
    gs, gp = R.group_layout(cm)
    row_mean, col_mean = R.axis_means(source, rm, cm)
    rf = torch.rand(rt, generator=gen) + 0.5 if factors else None
    cf = torch.rand(ct, generator=gen) + 0.5 if factors else None
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    return (dev(source), dev(rm), dev(cm), dev(rf), dev(cf), dev(gs), dev(gp), dev(row_mean),
            dev(col_mean), R.SPLIT_MODES[split], noise_std, 1234 + seed, 0xC0FFEE + seed,
            out_dtype or dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a float tensor (same bits), on the CPU."""
    view = {4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()]
    return t.detach().cpu().contiguous().view(view)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bitwise equality, printing the first mismatching indices and values."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{what}: {actual.shape} {actual.dtype} vs {expected.shape} {expected.dtype}")
    # NaN payloads are no part of the contract: torch's own scalar and vectorised casts differ
    both_nan = actual.detach().cpu().isnan() & expected.detach().cpu().isnan()
    diff = ((bits(actual) != bits(expected)) & ~both_nan).nonzero()
    if diff.numel():
        first = diff[:5].tolist()
        vals = [(actual[tuple(i)].item(), expected[tuple(i)].item()) for i in first]
        raise AssertionError(f"{what}: {diff.shape[0]} elements differ; first {first}: (got, want) {vals}")


def assert_within_ulp(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 1, what: str = "") -> None:
    """|bits(actual) - bits(expected)| <= ulps for same-sign values (1 ulp of the output dtype)."""
    a, e = bits(actual).to(torch.int64), bits(expected).to(torch.int64)
    same_sign = (a < 0) == (e < 0)
    both_nan = actual.detach().cpu().isnan() & expected.detach().cpu().isnan()
    bad = ~((same_sign & ((a - e).abs() <= ulps)) | (actual.cpu().float() == expected.cpu().float()) | both_nan)
    if bool(bad.any()):
        first = bad.nonzero()[:5].tolist()
        vals = [(actual[tuple(i)].item(), expected[tuple(i)].item()) for i in first]
        raise AssertionError(f"{what}: {int(bad.sum())} elements beyond {ulps} ulp; first {first}: {vals}")


def reference(args) -> torch.Tensor:
    return R.expand_reference(*args)


def skip_reason(backend: str) -> str | None:
    return ops.backends()[backend]
