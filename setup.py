"""Build lemon_ext._C: C++ CPU kernels always, CUDA kernels when torch and a toolkit have CUDA.

Switches: LEMON_EXT_SKIP_CUDA_BUILD=1 skips the CUDA sources; TORCH_CUDA_ARCH_LIST is honoured
(default "9.0" so Hopper is always covered); DEBUG=1 builds with -O0 -g.
Always install with ``pip install --no-build-isolation``: an isolated build pulls a different torch.
"""
import glob
import os
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
if build_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
# No -std flag: BuildExtension picks the one the installed torch needs (C++17 for torch 2.11,
# C++20 for 2.13+; torch 2.14 headers refuse C++17). The kernels are C++17-clean.
cxx_flags += ["-fopenmp", "-ffp-contract=off"]  # no FMA contraction: bitwise-equal backends
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

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
