"""The expansion op: one definition of the math (``reference``), several backends behind it.

``expand`` is the front door the engine calls for every target tensor. It prepares what every
backend shares (split-group layout, mean row/column computed once in float64), checks the maps
and dispatches to a backend:

- ``torch``:  ``reference.expand_reference`` (pure PyTorch, any device; the definition).
- ``cpu``:    C++ kernel of ``lemon_ext::expand`` (``csrc/expand_cpu.cpp``), bit-identical.
- ``cuda``:   CUDA kernel of ``lemon_ext::expand`` (``csrc/cuda``), bit-identical by design.
- ``triton``: ``lemon_ext::expand_triton`` (``_triton.py``), within 1 ulp of the output dtype.

``backends()`` says which are usable here and why the others are not.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ..errors import LemonError
from . import _native, reference
from .reference import FREE, MAX_GROUP_SIZE, MEAN, SPLIT_MODES, ZERO, axis_means, group_layout

__all__ = ["expand", "backends", "FREE", "MEAN", "ZERO", "SPLIT_MODES"]

BACKENDS = ("cuda", "triton", "cpu", "torch")  # "auto" takes the first usable one for the device


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    # find_spec walks sys.path: ~3 ms, paid on every op call before this cache.
    return importlib.util.find_spec("triton") is not None


def backends() -> dict[str, str | None]:
    """Each backend name -> None when usable on this machine, else the reason it is not."""
    hint = _native.BUILD_HINT
    if _native.IMPORT_ERROR is not None:
        cpu = f"C++ kernels not built (lemon_ext._C failed to import: {_native.IMPORT_ERROR}); {hint}"
        cuda = f"CUDA kernels not built (lemon_ext._C failed to import); {hint} with a CUDA torch"
    else:
        cpu = None if _native.has_kernel("CPU") else f"lemon_ext._C has no CPU kernel; {hint}"
        if not _native.has_kernel("CUDA"):
            cuda = (
                "CUDA kernels not built: this torch has no CUDA (CPU wheel)"
                if torch.version.cuda is None
                else "CUDA kernels not built (no CUDA toolkit at build time, or "
                f"LEMON_EXT_SKIP_CUDA_BUILD=1); set CUDA_HOME and {hint}"
            )
        elif not torch.cuda.is_available():
            cuda = "no GPU visible"
        else:
            cuda = None
    if not _triton_installed():
        triton = "triton is not installed (pip install triton)"
    elif not torch.cuda.is_available() and not _interpreting():
        triton = "no GPU (set TRITON_INTERPRET=1 before the first Triton call to interpret on CPU)"
    else:
        triton = None
    return {"torch": None, "cpu": cpu, "cuda": cuda, "triton": triton}


def _resolve_backend(backend: str, device: torch.device) -> str:
    status = backends()
    if backend == "auto":
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        return next(name for name in order if status[name] is None)
    if backend not in status:
        raise LemonError(f"unknown backend {backend!r}; choose one of {sorted(status)} or 'auto'")
    if status[backend] is not None:
        raise LemonError(f"backend {backend!r} is not available: {status[backend]}")
    if backend == "cuda" and device.type != "cuda" or backend == "cpu" and device.type != "cpu":
        raise LemonError(f"backend {backend!r} cannot run on a {device.type} tensor; use backend='auto'")
    if backend == "triton" and device.type != "cuda" and not _interpreting():
        raise LemonError("backend 'triton' runs CPU tensors only under TRITON_INTERPRET=1")
    return backend


def _check_maps(source: torch.Tensor, row_map: torch.Tensor, col_map: torch.Tensor,
                group_size: torch.Tensor) -> None:
    rs, cs = source.shape
    for name, m, lo, hi in (("row_map", row_map, MEAN, rs), ("col_map", col_map, FREE, cs)):
        if m.numel() and (int(m.min()) < lo or int(m.max()) >= hi):
            raise LemonError(
                f"{name} entries must be source indices in [0, {hi}) or sentinels >= {lo}; "
                f"got range [{int(m.min())}, {int(m.max())}]"
            )
    if group_size.numel() and int(group_size.max()) > MAX_GROUP_SIZE:
        raise LemonError(
            f"a source column is copied to {int(group_size.max())} target columns; "
            f"at most {MAX_GROUP_SIZE} are supported"
        )


def _as_int64(x: int) -> int:
    """The int64 with x's low 64 bits: the schema's ``int`` is int64, Philox uses the bits."""
    return (int(x) + 2**63) % 2**64 - 2**63


def expand(
    source: torch.Tensor,
    row_map: torch.Tensor,
    col_map: torch.Tensor,
    *,
    row_factor: torch.Tensor | None = None,
    col_factor: torch.Tensor | None = None,
    split: str = "none",
    noise_std: float = 0.0,
    seed: int = 0,
    key: int = 0,
    out_dtype: torch.dtype | None = None,
    row_offset: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Build one target tensor from a 2-D source view (see ``reference`` for the exact math).

    Args:
        source: (R_S, C_S) float tensor (bf16, fp16, fp32 or fp64), any strides.
        row_map: int64 (R_T,): source row, ``ZERO`` or ``MEAN`` per target row.
        col_map: int64 (C_T,): source column, ``ZERO``, ``MEAN`` or ``FREE`` per target column.
        row_factor / col_factor: float32 (R_T,) / (C_T,) scale factors, or None for 1.
        split: one of ``SPLIT_MODES``: how target columns sharing a source column share its value.
        noise_std: std of the uniform noise for FREE columns and the projection split.
        seed, key: Philox key material (see ``lemon_ext.noise``).
        out_dtype: dtype of the result (default: the source's).
        row_offset: index of row_map[0] in the whole target tensor, for computing a tensor in row
            blocks (row_map = full_row_map[a:b], row_offset = a gives exactly rows a:b of the whole).
        backend: "auto" (fastest usable for source's device) or one of ``backends()``.
    Returns:
        (R_T, C_T) tensor of ``out_dtype`` on the source's device.
    """
    if source.dim() != 2:
        raise LemonError(f"expand takes a 2-D source view, got shape {tuple(source.shape)}")
    if split not in SPLIT_MODES:
        raise LemonError(f"unknown split mode {split!r}; choose one of {sorted(SPLIT_MODES)}")
    out_dtype = out_dtype or source.dtype
    device = source.device
    row_map = row_map.to(device=device, dtype=torch.int64)
    col_map = col_map.to(device=device, dtype=torch.int64)
    group_size, group_pos = group_layout(col_map)
    _check_maps(source, row_map, col_map, group_size)
    row_mean, col_mean = axis_means(source, row_map, col_map)
    name = _resolve_backend(backend, device)
    # float64 work (the engine's losslessness tests) runs the reference in float64 throughout;
    # factors stay float64 there (an fp32 eta alone costs 1e-8 relative error).
    wide = source.dtype == torch.float64 or out_dtype == torch.float64
    if wide and backend == "auto":
        name = "torch"
    elif wide and name != "torch":
        raise LemonError(f"float64 expansion runs on the torch backend only (asked for {name!r})")
    factor_dtype = torch.float64 if wide else torch.float32
    args = (
        source, row_map, col_map,
        None if row_factor is None else row_factor.to(device=device, dtype=factor_dtype),
        None if col_factor is None else col_factor.to(device=device, dtype=factor_dtype),
        group_size, group_pos, row_mean, col_mean,
        SPLIT_MODES[split], float(noise_std), _as_int64(seed), int(key) & 0xFFFFFFFF, out_dtype,
        int(row_offset), 0,
    )
    if name == "torch":
        return reference.expand_reference(*args)
    if name == "triton":
        return torch.ops.lemon_ext.expand_triton(*args)
    return torch.ops.lemon_ext.expand(*args)
