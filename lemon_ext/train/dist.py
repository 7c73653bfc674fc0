"""Process group setup and model wrapping: nothing, DDP, or FSDP2 (``fully_shard``).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; ``setup`` joins the group (NCCL on CUDA, gloo on CPU,
which is what CI runs with 2 processes) unless the caller already initialised one.

FSDP2 path (``parallel="fsdp"``): every module class named in the HF model's ``_no_split_modules``
(the transformer block) is sharded with ``torch.distributed.fsdp.fully_shard``, then the root; bf16
params / fp32 gradient reduction when bf16 is on. It runs on CUDA (NCCL) and on CPU (gloo): CI
runs it with 2 CPU processes (tests/test_train_fsdp.py: losses equal DDP's, exact resume, export).
In one process it still shards (over a 1-process group this module creates), so a script behaves
the same with and without torchrun.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import LemonError

__all__ = ["Runtime", "setup", "wrap", "unwrap", "full_value", "all_reduce_sum"]


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
    """Join (or create) the process group and resolve the device and parallel mode.

    Arguments are checked before any group is created, and a group created here is destroyed
    again if the rest of the setup fails, so an error never leaves a half-initialised process.
    """
    if parallel not in ("auto", "none", "ddp", "fsdp"):
        raise LemonError(f"parallel must be 'auto', 'none', 'ddp' or 'fsdp', got {parallel!r}")
    joined = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if joined else int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and (device == "auto" or str(device).startswith("cuda"))
    owns = False
    if not joined and (world > 1 or parallel == "fsdp"):
        backend = "nccl" if use_cuda else "gloo"
        if world > 1:
            dist.init_process_group(backend=backend)  # torchrun's env:// rendezvous
        else:
            # FSDP in one process: a private 1-process group (no port, no env variables needed)
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        owns = True
    try:
        return _runtime(device, parallel, world, owns)
    except BaseException:
        if owns:
            dist.destroy_process_group()
        raise


def _runtime(device: str, parallel: str, world: int, owns: bool) -> Runtime:
    grouped = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if grouped else 0
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device == "auto":
        dev = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise LemonError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if parallel == "auto":
        parallel = "ddp" if world > 1 else "none"
    if parallel == "ddp" and world == 1:
        parallel = "none"  # one process: DDP would only add overhead (FSDP still shards, see above)
    return Runtime(rank, world, local_rank, dev, parallel, owns)


def wrap(model: nn.Module, rt: Runtime, *, bf16: bool) -> nn.Module:
    """Move to the device and wrap for the resolved parallel mode. Call before building the
    optimizer (FSDP2 replaces parameters with sharded DTensors)."""
    model.to(rt.device)
    if rt.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [rt.device.index] if rt.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if rt.parallel == "fsdp":
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
    """The module under DDP (FSDP2 shards in place: the module itself)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (FSDP2's grad norm, sharded parameters), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def all_reduce_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.world_size > 1:
        # gloo/NCCL both reduce float64 on the device the tensor lives on
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
