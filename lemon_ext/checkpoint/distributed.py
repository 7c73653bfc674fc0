"""torchrun support: rank/world from the environment, a gloo group for barriers and small gathers.

Each rank writes whole shards (``shards.shards_for_rank``); the group only carries status and each
shard's report fields (digest and its algorithm, size) to rank 0, so gloo serves GPU runs too (no
NCCL needed for a few bytes).
A rank that fails still joins the gather with its error, so no rank waits forever.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import CheckpointError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj) -> list:
        """all_gather_object over the group (or [obj] in a single process)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def sync(self, error: Exception | str | None, payload=None) -> list:
        """Gather (error, payload) from every rank; raise the first error anywhere on all ranks
        (a rank's own error keeps its type, e.g. VerificationError; others get it as one line)."""
        if self.world_size == 1:
            got = [(error, payload)]
        else:
            got = self.gather((None if error is None else str(error), payload))
        for rank, (err, _) in enumerate(got):
            if err is not None:
                if rank == self.rank and isinstance(error, Exception):
                    raise error
                if rank == self.rank:
                    raise CheckpointError(str(err))
                raise CheckpointError(f"rank {rank} failed: {err}")
        return [p for _, p in got]

    def close(self) -> None:
        if self.initialized_here:
            import torch.distributed as dist
            dist.destroy_process_group()
            self.initialized_here = False


def init_from_env() -> Dist:
    """Join the torchrun group if WORLD_SIZE > 1 (gloo; timeouts as torch's default, 30 min)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    here = False
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world)
        here = True
    return Dist(rank, world, local, here)


def rank_device(device, d: Dist):
    """'auto' under torchrun: cuda:LOCAL_RANK when GPUs exist, else CPU."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return f"cuda:{d.local_rank % torch.cuda.device_count()}"
        return "cpu"
    return device
