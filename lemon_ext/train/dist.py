"""Process group setup and model wrapping: nothing, DDP, or FSDP2 (``fully_shard``).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; ``setup`` joins the group (NCCL on CUDA, gloo on CPU,
which is what CI runs with 2 processes) unless the caller already initialised one.

FSDP2 path: every module class named in the HF model's ``_no_split_modules`` (the transformer
block) is sharded, then the root, with bf16 params / fp32 gradient reduction. It is written
against torch 2.6+ ``torch.distributed.fsdp.fully_shard`` and the ``torch.distributed.checkpoint``
full-state-dict API, but it has NOT been run in this project's CI (CPU only, no GPU): treat it
as untested.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import LemonError

__all__ = ["Runtime", "setup", "wrap", "unwrap", "all_reduce_sum"]


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    parallel: str = "none"  # resolved: "none", "ddp" or "fsdp"
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()


def setup(device: str = "auto", parallel: str = "auto") -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    owns = False
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    elif world > 1:
        backend = "nccl" if torch.cuda.is_available() and device in ("auto", "cuda") else "gloo"
        dist.init_process_group(backend=backend)
        owns = True
    rank = dist.get_rank() if world > 1 else 0
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device == "auto":
        dev = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if parallel == "auto":
        parallel = "ddp" if world > 1 else "none"
    if parallel in ("ddp", "fsdp") and world == 1 and not (dist.is_available() and dist.is_initialized()):
        parallel = "none"  # one process: wrapping would only add overhead
    if parallel == "fsdp" and dev.type != "cuda":
        raise LemonError("parallel='fsdp' needs CUDA devices; use parallel='ddp' on CPU")
    return Runtime(rank, world, local_rank, dev, parallel, owns)


def wrap(model: nn.Module, rt: Runtime, *, bf16: bool) -> nn.Module:
    """Move to the device and wrap for the resolved parallel mode. Call before building the
    optimizer (FSDP2 replaces parameters with sharded DTensors)."""
    model.to(rt.device)
    if rt.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [rt.device.index] if rt.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if rt.parallel == "fsdp":  # pragma: no cover - needs GPUs
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        block_names = set(getattr(model, "_no_split_modules", None) or [])
        blocks = [m for m in model.modules() if type(m).__name__ in block_names]
        if not blocks:
            raise LemonError("parallel='fsdp': the model names no _no_split_modules (transformer "
                             "block classes) to shard; wrap it yourself and pass parallel='none'")
        for block in blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    return model


def unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model


def all_reduce_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.world_size > 1:
        # gloo/NCCL both reduce float64 on the device the tensor lives on
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
