"""Plan output shards before any tensor exists: deterministic, independent of the number of ranks.

The plan is a pure function of (target tensor names, shapes, dtypes, max_shard_size), so every
torchrun rank computes the same plan and takes whole shards (shard i goes to rank i % world_size):
the bytes on disk are the same for 1 or N processes. Packing follows ``save_pretrained``: tensors
in target order, a new shard starts when the next tensor would pass the limit, a tensor larger
than the limit gets a shard of its own. Inside a shard, tensors are laid out in safetensors'
canonical order (see ``safetensors_format.file_order``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from .errors import CheckpointError
from .safetensors_format import dtype_size, file_order

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size) -> int:
    """'5GB' -> 5*10**9 (decimal like transformers), '500MiB' -> 500*2**20, int -> itself."""
    if isinstance(size, int):
        if size <= 0:
            raise CheckpointError(f"max shard size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?B|B)?\s*", str(size).upper())
    if not m:
        raise CheckpointError(f"cannot parse size '{size}' (examples: 5GB, 500MB, 2GiB, 1000000)")
    n = int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    if n <= 0:
        raise CheckpointError(f"max shard size must be positive, got '{size}'")
    return n


@dataclass
class Shard:
    """One output file: its name and its tensors (name, dtype, shape) in file order."""

    index: int
    filename: str
    tensors: list = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) * dtype_size(d) for _, d, s in self.tensors)


def plan_shards(tensors: list[tuple[str, torch.dtype, tuple]], max_shard_size) -> list[Shard]:
    """Pack (name, dtype, shape) in the given order into shards of at most ``max_shard_size``."""
    limit = parse_size(max_shard_size)
    groups: list[list] = [[]]
    cur = 0
    for t in tensors:
        nb = math.prod(t[2]) * dtype_size(t[1])
        if groups[-1] and cur + nb > limit:
            groups.append([])
            cur = 0
        groups[-1].append(t)
        cur += nb
    n = len(groups)
    shards = []
    for i, g in enumerate(groups):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        shards.append(Shard(i, fname, file_order(g)))
    return shards


def build_index(shards: list[Shard]) -> dict | None:
    """model.safetensors.index.json content (None for a single shard: no index is written)."""
    if len(shards) == 1:
        return None
    weight_map = {name: s.filename for s in shards for name, _, _ in s.tensors}
    return {"metadata": {"total_size": sum(s.nbytes for s in shards)},
            "weight_map": dict(sorted(weight_map.items()))}


def shards_for_rank(shards: list[Shard], rank: int, world_size: int) -> list[Shard]:
    """Whole shards for one rank: shard i -> rank i % world_size (any split gives the same bytes)."""
    return [s for s in shards if s.index % world_size == rank]
