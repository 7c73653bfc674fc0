"""Load the compiled kernels (``lemon_ext._C``) without ever failing on import.

A source checkout, a wheel built for another torch, or a machine without the build toolchain
must still import lemon_ext and run the reference backend; so the import error is kept and
raised (with the rebuild command) only when a native backend is asked for.
"""
from __future__ import annotations

import functools

import torch

from . import _schema  # noqa: F401  (schemas first: _C only attaches kernels to them)

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` from the repository root"

try:
    from .. import _C  # noqa: F401  (registers the CPU / CUDA kernels of lemon_ext::expand)

    IMPORT_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch (undefined symbols)
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


@functools.lru_cache(maxsize=None)
def has_kernel(dispatch_key: str, op: str = "lemon_ext::expand") -> bool:
    """Whether a compiled kernel of ``op`` is registered for ``dispatch_key`` ("CPU", "CUDA").
    Cached: _C registers its kernels when it is imported, above, and never later (the dispatcher
    lookup cost ~35 us per op call, 2 ms of a 57-tensor expand_state_dict)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)
