"""Build lemon_ext._C: C++ CPU kernels always, CUDA kernels when torch and a toolkit have CUDA.

Switches: LEMON_EXT_SKIP_CUDA_BUILD=1 skips the CUDA sources; DEBUG=1 builds with -O0 -g;
TORCH_CUDA_ARCH_LIST is honoured. Without it the CUDA kernels are built for the GPUs visible at
build time (their compute capabilities: the build is for the machine it runs on, and fastest),
else for DEFAULT_CUDA_ARCHS: A100 (8.0), A10/RTX 30xx (8.6), L4/L40/RTX 40xx (8.9), H100/H200
(9.0) and B200 (10.0) as machine code, plus PTX of the newest, which the driver compiles for
later GPUs; architectures the toolkit cannot build (10.0 needs CUDA 12.8) are dropped.
Always install with ``pip install --no-build-isolation``: an isolated build pulls a different torch.
"""
import glob
import os
import re
import subprocess
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

debug = os.getenv("DEBUG", "0") == "1"
cpp_sources = sorted(glob.glob("csrc/*.cpp"))
# csrc/cuda/*.cu: kernels + plain C launchers (no torch headers); csrc/cuda/*.cpp: torch wrappers
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
build_cuda = (
    bool(cuda_sources)
    and torch.version.cuda is not None
    and CUDA_HOME is not None
    and os.getenv("LEMON_EXT_SKIP_CUDA_BUILD", "0") != "1"
)
DEFAULT_CUDA_ARCHS = ("8.0", "8.6", "8.9", "9.0", "10.0")
MIN_CUDA_FOR_ARCH = {"8.9": (11, 8), "9.0": (11, 8), "10.0": (12, 8), "12.0": (12, 8)}


def nvcc_version(cuda_home):
    """(major, minor) of the toolkit's nvcc, or None."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def cuda_arch_list(env=None, visible=None, toolkit=None) -> str:
    """TORCH_CUDA_ARCH_LIST for this build: ``env`` if set; else the visible GPUs' capabilities
    (``visible``: [(major, minor)]); else DEFAULT_CUDA_ARCHS the toolkit can build, PTX on the last."""
    if env:
        return env
    if visible:
        return ";".join(sorted({f"{a}.{b}" for a, b in visible}, key=lambda v: tuple(map(int, v.split(".")))))
    archs = [a for a in DEFAULT_CUDA_ARCHS if toolkit is None or toolkit >= MIN_CUDA_FOR_ARCH.get(a, (0, 0))]
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def visible_capabilities():
    try:
        if torch.cuda.is_available():
            return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    except RuntimeError:  # a driver problem: build the default list
        pass
    return []


if build_cuda:
    os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"),
                                                        visible_capabilities(), nvcc_version(CUDA_HOME))
    print(f"lemon_ext: building CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")

cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
# No -std flag: BuildExtension picks the one the installed torch needs (C++17 for torch 2.11,
# C++20 for 2.13+; torch 2.14 headers refuse C++17). The kernels are C++17-clean.
# -ffp-contract=off: no FMA contraction (bitwise-equal backends). -fno-trapping-math: lets GCC
# compute both sides of a float select, which is what vectorises the LEMON / cancel column passes
# (with trapping math they stay scalar: 32 instructions per target element in callgrind, against
# 4 vectorised); it permits no reassociation, contraction or change of any result.
cxx_flags += ["-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
extra = {"cxx": cxx_flags}
define_macros = [("Py_LIMITED_API", "0x03090000")]
if build_cuda:
    # CUDA torch wheels keep some toolkit headers (cusparse.h, ...) in site-packages/nvidia/cu*/
    # include; ATen's CUDA headers (host wrapper only, the .cu needs none) may need them when the
    # system toolkit lacks them. -idirafter: searched last, never shadowing the toolkit's headers.
    try:
        import nvidia

        for d in sorted(str(p) for d in nvidia.__path__ for p in Path(d).glob("cu*/include")):
            cxx_flags += ["-idirafter", d]
    except ImportError:
        pass
    extra["nvcc"] = (["-O0", "-g", "-G"] if debug else ["-O3"]) + ["--fmad=false"]
    define_macros.append(("LEMON_EXT_WITH_CUDA", "1"))
    ext = CUDAExtension(
        "lemon_ext._C", cpp_sources + cuda_sources, extra_compile_args=extra,
        define_macros=define_macros, extra_link_args=["-fopenmp"], py_limited_api=True,
    )
else:
    ext = CppExtension(
        "lemon_ext._C", cpp_sources, extra_compile_args=extra,
        define_macros=define_macros, extra_link_args=["-fopenmp"], py_limited_api=True,
    )

if __name__ == "__main__":  # pip / setuptools run this file as __main__; tests import cuda_arch_list
    setup(
        ext_modules=[ext],
        cmdclass={"build_ext": BuildExtension},
        options={"bdist_wheel": {"py_limited_api": "cp39"}},
    )
