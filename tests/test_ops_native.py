"""Native harnesses (tests/native/, no torch) against the PyTorch reference, by output hash.

1. Every compiled variant of the C++ CPU row loop. The wheel holds the column passes three times
   (GCC target_clones: AVX-512, AVX2, baseline x86-64) and Philox three ways (AVX-512, AVX2,
   scalar); on an AVX-512 machine only the first of each runs through the op. isa_variants.cpp is
   built with the clones and without them for baseline x86-64, and run natively, with
   LEMON_EXT_PHILOX=avx2/scalar and under valgrind (its CPU has AVX2 but no AVX-512, so the
   resolver picks the AVX2 clones).
2. The CUDA kernel without a GPU. cuda_emulated.cpp runs csrc/cuda/expand_kernel.cu through its
   plain-C launcher on the CPU (cuda_shim.h: blocks in turn, threads as fibers, __syncthreads as
   a switch point, shared memory poisoned with NaN per block), with an H100's shared memory, with
   too little for the draws table (draws per element) and too little to stage the source row
   (reads from global memory), and with a column count that takes the 16-byte stores.

Each harness prints one FNV-1a hash of the output bytes per case (cases.h: 6 split modes x 3
output dtypes x circular / random maps with ZERO / MEAN / FREE sentinels; fp32, bf16 and fp16
sources with padded rows; factors, means, a row offset that wraps the Philox row counter); the
reference computes the same cases here.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lemon_ext.ops import reference as R

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "tests" / "native"
CXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(CXX is None, reason="g++ not found (the harnesses build with the flags of setup.py)")

RS, CS, RT, PAD = 23, 150, 41, 5
SPLITS = [R.SPLIT_NONE, R.SPLIT_LEMON, R.SPLIT_EQUAL, R.SPLIT_PROJECTION, R.SPLIT_CANCEL, R.SPLIT_CANCEL_EQUAL]
OUT = [torch.float32, torch.bfloat16, torch.float16]


class Lcg:
    """cases.h's generator, step for step."""

    def __init__(self, seed: int):
        self.s = seed

    def next(self) -> int:
        self.s = (self.s * 6364136223846793005 + 1442695040888963407) % 2**64
        return self.s >> 33

    def uniform(self, n: int) -> torch.Tensor:  # float32, exact: (x >> 8) * 2^-24
        return torch.tensor([self.next() >> 8 for _ in range(n)], dtype=torch.float64).float() * 2.0**-24


def fnv1a(data: bytes) -> int:
    h = 1469598103934665603
    for b in data:
        h = ((h ^ b) * 1099511628211) % 2**64
    return h


def reference_hashes(ct: int) -> list[str]:
    """The lines for_each_case(ct, ...) prints, computed with the PyTorch reference."""
    g = Lcg(12345)
    values = ((g.uniform(RS * CS) - 0.5) * 4.0).reshape(RS, CS)
    sources = []  # rows PAD longer than CS, the padding 1e30 (65504 in fp16), viewed as (RS, CS)
    for dtype, pad in ((torch.float32, 1e30), (torch.bfloat16, 1e30), (torch.float16, 65504.0)):
        full = torch.full((RS, CS + PAD), pad, dtype=dtype)
        full[:, :CS] = values.to(dtype)
        sources.append(full[:, :CS])
    rf, cf = 0.5 + g.uniform(RT), 0.5 + g.uniform(ct)
    rmean, cmean = g.uniform(CS) - 0.5, g.uniform(RS) - 0.5
    rm = torch.tensor([R.ZERO if i == 7 else R.MEAN if i == 11 else i % RS for i in range(RT)])
    lines = []
    for kind in ("circular", "random"):
        cm = [j % CS if j < CS or kind == "circular" else g.next() % CS for j in range(ct)]
        if kind == "random":
            cm[200], cm[201], cm[250], cm[251] = R.ZERO, R.FREE, R.MEAN, R.FREE
        cm = torch.tensor(cm)
        gs, gp = R.group_layout(cm)
        for split in SPLITS:
            for k, dtype in enumerate(OUT):
                src = sources[(split + k) % 3]  # cases.h: source dtype (split + out) % 3
                out = R.expand_reference(src, rm, cm, rf, cf, gs, gp, rmean, cmean, split, 0.02, 1234, 5678, dtype,
                                         row_offset=4294967280, col_offset=3)
                lines.append(f"{kind} split={split} out={k} {fnv1a(out.contiguous().view(torch.uint8).numpy().tobytes()):016x}")
    return lines


@pytest.fixture(scope="module")
def expected() -> dict[int, list[str]]:
    hashes = {ct: reference_hashes(ct) for ct in (301, 304)}
    assert len(set(hashes[301])) == len(hashes[301])  # every case its own bytes: the hashes can tell
    return hashes


def _build(out_dir: Path, name: str, source: Path, *flags: str) -> Path:
    exe = out_dir / name
    cmd = [CXX, "-std=c++17", "-ffp-contract=off", "-fno-trapping-math", *flags, f"-I{ROOT / 'csrc'}", f"-I{NATIVE}", str(source), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return exe


def _run(cmd: list[str], **env: str) -> tuple[str, list[str]]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert res.returncode == 0, res.stderr[-4000:]
    head, *hashes = res.stdout.splitlines()
    return head, hashes


x86_only = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                              reason="the target clones and SIMD Philox paths are x86-64 code")


@pytest.fixture(scope="module")
def cpu_builds(tmp_path_factory) -> dict[str, Path]:
    """Two builds of the row loop (~20 s each on the dev VM): as setup.py compiles it (-O3, target
    clones), and one plain copy for baseline x86-64 (what the "default" clone is)."""
    d = tmp_path_factory.mktemp("isa")
    src = NATIVE / "isa_variants.cpp"
    return {"clones": _build(d, "iv", src, "-O3"),
            "baseline": _build(d, "iv_base", src, "-O3", "-DLEMON_NO_CLONES", "-march=x86-64")}


@x86_only
@pytest.mark.parametrize("build,philox", [("clones", ""), ("clones", "avx2"), ("baseline", ""), ("baseline", "scalar")])
def test_cpu_row_loop_variants_match_reference(build, philox, cpu_builds, expected):
    _, got = _run([str(cpu_builds[build])], **({"LEMON_EXT_PHILOX": philox} if philox else {}))
    assert got == expected[301]


@x86_only
@pytest.mark.parametrize("build", ["clones", "baseline"])
def test_cpu_staged_passes_match_reference(build, cpu_builds, expected):
    """LEMON_EXT_CPU_FUSED=0: the staged passes (the path of widths over 2x and of sparse levels)
    on every case the fused row takes by default: both give the reference's bytes."""
    _, got = _run([str(cpu_builds[build])], LEMON_EXT_CPU_FUSED="0")
    assert got == expected[301]


@x86_only
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not found (it runs the AVX2 clones here)")
def test_cpu_avx2_clones_under_valgrind_match_reference(cpu_builds, expected):
    isa, got = _run(["valgrind", "-q", "--error-exitcode=3", str(cpu_builds["clones"])])
    if isa != "isa avx512f=0 avx2=1":
        pytest.skip(f"valgrind's CPU reports {isa!r}: the AVX2 clones would not run")
    assert got == expected[301]


@pytest.fixture(scope="module")
def cuda_emulated(tmp_path_factory) -> Path:
    """The .cu with its one launch rewritten for the shim and <cuda_runtime.h> left out."""
    d = tmp_path_factory.mktemp("cuda_emulated")
    text = (ROOT / "csrc" / "cuda" / "expand_kernel.cu").read_text()
    text = text.replace("#include <cuda_runtime.h>", "// <cuda_runtime.h>: tests/native/cuda_shim.h")
    text, launches = re.subn(r"(\w+)<<<(.*?)>>>\(", r"lemon_shim_launch(\1, \2, ", text)
    assert launches == 1, "expand_kernel.cu: expected one kernel<<<...>>> launch to rewrite"
    kernel = d / "expand_kernel_shim.cu.h"
    kernel.write_text(text)
    return _build(d, "ce", NATIVE / "cuda_emulated.cpp", "-O2", f"-I{ROOT / 'csrc' / 'cuda'}",
                  f'-DLEMON_KERNEL_CU="{kernel}"')


@pytest.mark.parametrize("ct,max_smem,what", [
    (301, None, "source row and draws table in shared memory"),
    (304, None, "16-byte stores (C_T a multiple of 8)"),
    (301, 1024, "source row staged, draws per element (table does not fit)"),
    (301, 512, "source read from global memory (row does not fit)"),
])
def test_cuda_kernel_emulated_on_cpu_matches_reference(ct, max_smem, what, cuda_emulated, expected):
    env = {"LEMON_SHIM_MAX_SMEM": str(max_smem)} if max_smem else {}
    _, got = _run([str(cuda_emulated), str(ct)], **env)
    assert got == expected[ct], what
