"""The lemon_ext op namespace: every schema is defined here, once, in Python.

Defining schemas with ``torch.library`` (not ``TORCH_LIBRARY`` in C++) keeps the API, the fake
(meta) kernels, ``torch.compile`` tracing and ``opcheck`` working when ``lemon_ext._C`` was not
built. The C++ kernels attach to these schemas with ``TORCH_LIBRARY_IMPL(lemon_ext, CPU/CUDA)``.

Ops:
- ``lemon_ext::expand``: kernels from ``_C`` (CPU always, CUDA when built with CUDA).
- ``lemon_ext::expand_triton``: same signature, the Triton kernel. A separate op (not a CUDA
  kernel of ``expand``) because both the CUDA C++ kernel and Triton serve CUDA tensors and a
  dispatch key holds one kernel; the front door ``lemon_ext.ops.expand`` picks between them. Its
  CPU kernel runs the Triton interpreter (needs ``TRITON_INTERPRET=1`` before the first use), so
  ``opcheck`` and ``torch.compile`` cover it on CPU-only CI.
"""
from __future__ import annotations

import torch

ARGS = (
    "Tensor source, Tensor row_map, Tensor col_map, Tensor? row_factor, Tensor? col_factor, "
    "Tensor group_size, Tensor group_pos, Tensor? row_mean, Tensor? col_mean, int split, "
    "float noise_std, int seed, int key, ScalarType out_dtype, int row_offset=0, int col_offset=0"
)

_lib = torch.library.Library("lemon_ext", "DEF")  # noqa: TOR901 (kept alive for the process)
_lib.define(f"expand({ARGS}) -> Tensor")
_lib.define(f"expand_triton({ARGS}) -> Tensor")


def _fake(source, row_map, col_map, row_factor, col_factor, group_size, group_pos, row_mean,
          col_mean, split, noise_std, seed, key, out_dtype, row_offset=0, col_offset=0):
    """(R_T, C_T) = (len(row_map), len(col_map)) of out_dtype on source's device."""
    return source.new_empty((row_map.shape[0], col_map.shape[0]), dtype=out_dtype)


torch.library.register_fake("lemon_ext::expand", _fake, lib=_lib)
torch.library.register_fake("lemon_ext::expand_triton", _fake, lib=_lib)


def _expand_triton_impl(*args):
    from ._triton import expand_triton  # imported on first use: TRITON_INTERPRET is read then

    return expand_triton(*args)


_lib.impl("expand_triton", _expand_triton_impl, "CUDA")
_lib.impl("expand_triton", _expand_triton_impl, "CPU")
