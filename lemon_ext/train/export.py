"""Write the trained model as a Hugging Face directory (``from_pretrained``-loadable), gathered
from FSDP2 shards when the model is sharded.

Collective under DDP/FSDP (every rank calls it: the FSDP2 gather is an all-gather); rank 0
writes. ``train`` calls it with ``TrainConfig.export_dir`` before it tears the process group
down, which is the only point where an FSDP2 model's shards can still be gathered.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import LemonError
from .dist import Runtime, unwrap

__all__ = ["export_pretrained", "full_model_state_dict"]


def full_model_state_dict(model: nn.Module, rt: Runtime) -> dict[str, torch.Tensor]:
    """Unsharded model tensors on CPU (on rank 0; other ranks get an empty dict under FSDP2)."""
    if rt.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def check_exportable(model: nn.Module) -> None:
    """Before training: an export target needs ``save_pretrained`` (a transformers model)."""
    if not hasattr(unwrap(model), "save_pretrained"):
        raise LemonError(f"export_dir needs a transformers model (with save_pretrained), got "
                         f"{type(unwrap(model)).__name__}: save its state_dict yourself or drop export_dir")


def export_pretrained(model: nn.Module, directory: str, rt: Runtime | None = None) -> str:
    """``save_pretrained(directory)`` of the full (gathered) model; returns ``directory``.

    The weights are written in the model's own parameter dtype as safetensors with its config
    (and generation config), so ``AutoModel*.from_pretrained(directory)`` loads them.
    """
    rt = rt or Runtime()
    check_exportable(model)
    state = full_model_state_dict(model, rt)  # collective under FSDP
    if rt.is_main:
        os.makedirs(directory, exist_ok=True)
        unwrap(model).save_pretrained(directory, state_dict=state)
    rt.barrier()
    return directory
