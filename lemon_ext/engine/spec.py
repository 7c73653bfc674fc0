"""TensorSpec: everything needed to build one target tensor, executed by one function.

The planner describes every target tensor by a spec (row and column source maps, factors, split
mode, noise key); ``TensorSpec.execute`` runs it through ``lemon_ext.ops.expand``, the single
definition of the math whatever the backend. The streaming pipeline schedules specs one at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import noise, ops
from ..errors import LemonError


@dataclass(frozen=True, eq=False)
class TensorSpec:
    """How to build target tensor ``name`` from source tensor ``source``.

    The source is viewed as 2-D: ``view="rows"`` -> (shape[0], rest) (weights (out, in), conv
    (out, C*h*w), 1-D vectors as (1, N) through ``view="vector"``), ``view="cols"`` ->
    (rest, shape[-1]) (embeddings whose last axis is the hidden axis). ``transpose`` handles
    Conv1D weights stored (in, out): the op runs on the (out, in) view.
    """

    name: str
    source: str | None  # source tensor name; None with ``fill`` for synthetic constants
    source_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    role: str
    rule: str  # human-readable rule for plans and reports
    row_map: torch.Tensor
    col_map: torch.Tensor
    view: str = "rows"  # "rows", "cols" or "vector"
    transpose: bool = False
    row_factor: torch.Tensor | None = None
    col_factor: torch.Tensor | None = None
    split: str = "none"
    noise_std: float = 0.0
    key_name: str = ""  # noise key; tied tensors share their partner's
    fill: float | None = None
    offset: float = 0.0  # norms computing x * (offset + w): the factors apply to offset + w
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def key(self) -> int:
        return noise.tensor_key(self.key_name or self.name)

    @property
    def numel(self) -> int:
        return math.prod(self.target_shape)

    def source_view_shape(self) -> tuple[int, int]:
        shape = self.source_shape
        if self.view == "vector":
            return (1, math.prod(shape))
        if self.view == "stacked":
            return (shape[0] * shape[1], math.prod(shape[2:]))
        if self.view == "cols":
            return (math.prod(shape[:-1]), shape[-1])
        return (shape[0], math.prod(shape[1:]))

    def execute(
        self,
        source: torch.Tensor | None,
        *,
        seed: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str = "auto",
        split: str | None = None,
    ) -> torch.Tensor:
        """Build the target tensor.

        Args:
            source: the source tensor of shape ``source_shape`` (None for synthetic specs).
            seed: the expansion seed (noise depends on seed, this spec's key and coordinates).
            dtype: output dtype (default: the source's).
            device: where to compute (default: the source's device).
            split: override the split mode (e.g. "none" for the un-split gathered tensor).
        Returns:
            tensor of ``target_shape``.
        """
        if source is None:
            if self.fill is None:
                raise LemonError(f"tensor {self.source!r} is needed to build {self.name!r}")
            source = torch.full(self.source_shape, self.fill, dtype=dtype or torch.float32)
        elif tuple(source.shape) != tuple(self.source_shape):
            raise LemonError(
                f"tensor {self.source!r} has shape {tuple(source.shape)}, the config implies "
                f"{tuple(self.source_shape)}"
            )
        if not source.is_floating_point():
            raise LemonError(f"tensor {self.source!r} has dtype {source.dtype}; expected a float tensor")
        if device is not None:
            source = source.to(device)
        view = source.reshape(self.source_view_shape())
        if self.transpose:
            view = view.t()
        out_dtype = dtype or source.dtype
        if self.offset:
            # (offset + w) scaled, then the offset taken off: in fp32 (fp64 for fp64), one rounding
            # into the output dtype (a gain g = eta (1 + w) of a Gemma norm).
            wide = torch.float64 if torch.float64 in (view.dtype, out_dtype) else torch.float32
            view = view.to(wide) + self.offset
        out = ops.expand(
            view, self.row_map, self.col_map,
            row_factor=self.row_factor, col_factor=self.col_factor,
            split=self.split if split is None else split,
            noise_std=self.noise_std, seed=seed, key=self.key,
            out_dtype=view.dtype if self.offset else out_dtype, backend=backend,
        )
        if self.offset:
            out = (out - self.offset).to(out_dtype)
        if self.transpose:
            out = out.t()
        return out.reshape(self.target_shape).contiguous()
