"""The expansion op: one definition of the math (``reference``), several backends behind it.

``expand`` is the front door the engine calls for every target tensor. It prepares what every
backend shares (split-group layout, mean row/column computed once in float64) and dispatches.
"""
from __future__ import annotations

import torch

from ..errors import LemonError
from . import reference
from .reference import FREE, MEAN, SPLIT_MODES, ZERO, axis_means, group_layout

__all__ = ["expand", "backends", "FREE", "MEAN", "ZERO", "SPLIT_MODES"]

_BACKEND_ORDER = ("cuda", "triton", "cpu", "torch")


def backends() -> dict[str, str | None]:
    """Each backend name -> None when usable here, else the reason it is not."""
    return {"torch": None, "cpu": "C++ kernels not built yet", "cuda": "CUDA kernels not built yet",
            "triton": "Triton kernels not written yet"}


def _resolve_backend(backend: str, device: torch.device) -> str:
    status = backends()
    if backend == "auto":
        return "torch"
    if backend not in status:
        raise LemonError(f"unknown backend {backend!r}; choose one of {sorted(status)} or 'auto'")
    if status[backend] is not None:
        raise LemonError(f"backend {backend!r} is not available: {status[backend]}")
    return backend


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
    row_mean, col_mean = axis_means(source, row_map, col_map)
    name = _resolve_backend(backend, device)
    assert name == "torch"
    return reference.expand_reference(
        source, row_map, col_map,
        None if row_factor is None else row_factor.to(device=device, dtype=torch.float32),
        None if col_factor is None else col_factor.to(device=device, dtype=torch.float32),
        group_size, group_pos, row_mean, col_mean,
        SPLIT_MODES[split], float(noise_std), int(seed), int(key), out_dtype,
    )
