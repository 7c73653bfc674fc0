"""Every compiled variant of the C++ CPU row loop gives the reference's bytes.

The wheel holds the column passes three times (GCC target_clones: AVX-512, AVX2, baseline x86-64)
and Philox three ways (AVX-512, AVX2, scalar); on an AVX-512 machine only the first of each runs
through the op. tests/native/isa_variants.cpp runs the row loop (csrc/expand_cpu_rows.h, no torch)
on fixed inputs and prints one hash per case; here it is built and run natively, for baseline
x86-64 without clones, with LEMON_EXT_PHILOX=scalar and under valgrind (whose CPU has AVX2 but no
AVX-512, so the resolver picks the AVX2 clones and the AVX2 Philox), and every run must print
the hashes of the PyTorch reference computed on the same inputs.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lemon_ext.ops import reference as R

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "native" / "isa_variants.cpp"
CXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(CXX is None, reason="g++ not found (the harness is built with the flags of setup.py)")

RS, CS, RT, CT = 23, 150, 41, 301
SPLITS = [R.SPLIT_NONE, R.SPLIT_LEMON, R.SPLIT_EQUAL, R.SPLIT_PROJECTION, R.SPLIT_CANCEL, R.SPLIT_CANCEL_EQUAL]
OUT = [torch.float32, torch.bfloat16, torch.float16]


class Lcg:
    """The harness's generator, step for step."""

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


def reference_hashes() -> list[str]:
    g = Lcg(12345)
    src = ((g.uniform(RS * CS) - 0.5) * 4.0).reshape(RS, CS)
    rf, cf = 0.5 + g.uniform(RT), 0.5 + g.uniform(CT)
    rmean, cmean = g.uniform(CS) - 0.5, g.uniform(RS) - 0.5
    rm = torch.tensor([R.ZERO if i == 7 else R.MEAN if i == 11 else i % RS for i in range(RT)])
    lines = []
    for kind in ("circular", "random"):
        cm = [j % CS if j < CS or kind == "circular" else g.next() % CS for j in range(CT)]
        if kind == "random":
            cm[200], cm[201], cm[250], cm[251] = R.ZERO, R.FREE, R.MEAN, R.FREE
        cm = torch.tensor(cm)
        gs, gp = R.group_layout(cm)
        for split in SPLITS:
            for k, dtype in enumerate(OUT):
                out = R.expand_reference(src, rm, cm, rf, cf, gs, gp, rmean, cmean, split, 0.02, 1234, 5678, dtype,
                                         row_offset=4294967280, col_offset=3)
                raw = out.contiguous().view(torch.uint8).numpy().tobytes()
                lines.append(f"{kind} split={split} out={k} {fnv1a(raw):016x}")
    return lines


@pytest.fixture(scope="module")
def expected() -> list[str]:
    return reference_hashes()


def _build(out_dir: Path, name: str, *flags: str) -> Path:
    exe = out_dir / name
    cmd = [CXX, "-O3", "-std=c++17", "-ffp-contract=off", *flags, f"-I{ROOT / 'csrc'}", str(HARNESS), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return exe


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Path]:
    """Two builds (~20 s each on the dev VM): as setup.py compiles the row loop, and one plain
    copy for baseline x86-64 (what the "default" clone is)."""
    d = tmp_path_factory.mktemp("isa")
    return {"clones": _build(d, "iv"), "baseline": _build(d, "iv_base", "-DLEMON_NO_CLONES", "-march=x86-64")}


def _run(cmd: list[str], **env: str) -> tuple[str, list[str]]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert res.returncode == 0, res.stderr[-4000:]
    isa, *hashes = res.stdout.splitlines()
    return isa, hashes


@pytest.mark.parametrize("build,philox", [("clones", ""), ("baseline", ""), ("baseline", "scalar"), ("clones", "avx2")])
def test_native_variants_match_reference(build, philox, builds, expected):
    _, got = _run([str(builds[build])], **({"LEMON_EXT_PHILOX": philox} if philox else {}))
    assert got == expected


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not found (it runs the AVX2 clones here)")
def test_avx2_clones_under_valgrind_match_reference(builds, expected):
    isa, got = _run(["valgrind", "-q", "--error-exitcode=3", str(builds["clones"])])
    if "avx512f=0 avx2=1" not in isa:
        pytest.skip(f"valgrind's CPU reports {isa!r}: the AVX2 clones would not run")
    assert got == expected
