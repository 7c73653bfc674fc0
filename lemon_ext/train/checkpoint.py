"""Checkpoints for exact resume: model, optimizer, scheduler, per-rank RNG, data position, step.

Layout: ``<out_dir>/checkpoints/step-00000120/`` holding ``state.pt`` (rank 0: model, optimizer,
scheduler, step, epoch, step-in-epoch, config) and ``rng-rank<r>.pt`` (each rank: python,
numpy, torch CPU and CUDA generator states, so dropout continues the same stream). A checkpoint
is written into ``step-XXXXXXXX.tmp`` and renamed when complete, so a crash mid-save never leaves
a directory that ``latest_checkpoint`` would pick.

Model/optimizer states are full (unsharded) tensors on CPU: for FSDP2 they are gathered through
``torch.distributed.checkpoint.state_dict`` (tested with 2 CPU processes on gloo), otherwise taken
from the unwrapped module, so a checkpoint loads into any world size (the RNG files then no longer
match and are skipped with a warning). The optimizer state of an FSDP2 checkpoint is keyed by
parameter name, a DDP/one-process one by parameter index: resume in the mode that wrote it.
``state.pt`` also records the evaluations so far, so rerunning a finished run evaluates nothing.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import warnings

import numpy as np
import torch

from ..errors import LemonError
from .dist import Runtime, unwrap

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint"]

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _model_optim_state(model, optimizer, rt: Runtime):
    if rt.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict(), optimizer.state_dict()


def latest_checkpoint(out_dir: str) -> str | None:
    """The complete checkpoint directory with the highest step under ``out_dir``, or None."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    steps = [(int(m.group(1)), d) for d in os.listdir(root) if (m := _STEP_DIR.match(d))]
    return os.path.join(root, max(steps)[1]) if steps else None


def save_checkpoint(out_dir: str, *, step: int, epoch: int, step_in_epoch: int, model, optimizer, scheduler,
                    rt: Runtime, config: dict | None = None, keep: int = 2, evals: list | None = None) -> str:
    """Collective: every rank must call it. Returns the checkpoint directory.
    ``evals``: ``[(step, eval loss)]`` of the whole run so far (restored by ``load_checkpoint``)."""
    root = os.path.join(out_dir, "checkpoints")
    final = os.path.join(root, f"step-{step:08d}")
    tmp = final + ".tmp"
    model_sd, optim_sd = _model_optim_state(model, optimizer, rt)  # collective under FSDP
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    rt.barrier()
    torch.save(_rng_state(), os.path.join(tmp, f"rng-rank{rt.rank}.pt"))
    if rt.is_main:
        torch.save({"model": model_sd, "optimizer": optim_sd,
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "step": step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                    "world_size": rt.world_size, "config": config, "evals": list(evals or [])},
                   os.path.join(tmp, "state.pt"))
    rt.barrier()
    if rt.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted(d for d in os.listdir(root) if _STEP_DIR.match(d))
        for old in done[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    rt.barrier()
    return final


def load_checkpoint(path: str, *, model, optimizer, scheduler, rt: Runtime) -> dict:
    """Restore everything in place; returns ``{"step", "epoch", "step_in_epoch", "evals"}``.

    Raises LemonError naming the tensor when the checkpoint holds another model (other tensor
    names or shapes: a different model trained into the same ``out_dir``)."""
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
    _check_same_model(state["model"], unwrap(model), path)
    if rt.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    rng_file = os.path.join(path, f"rng-rank{rt.rank}.pt")
    if state["world_size"] == rt.world_size and os.path.exists(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        warnings.warn(f"checkpoint {path} was written by {state['world_size']} processes, resuming with "
                      f"{rt.world_size}: RNG streams (dropout) restart, so the run is not bit-identical")
    return {**{k: state[k] for k in ("step", "epoch", "step_in_epoch")}, "evals": list(state.get("evals", []))}


def _check_same_model(saved: dict, model, path: str) -> None:
    # DTensor.shape is the global shape, so FSDP2-sharded models compare like plain ones
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    hint = "another model was trained into this out_dir: use a new out_dir or resume=False"
    for name, shape in mine.items():
        if name not in saved:
            raise LemonError(f"checkpoint {path} has no tensor {name!r}: {hint}")
        if tuple(saved[name].shape) != shape:
            raise LemonError(f"checkpoint {path}: tensor {name!r} has shape {tuple(saved[name].shape)}, the model's is "
                             f"{shape}: {hint}")
    extra = sorted(set(saved) - set(mine))
    if extra:
        raise LemonError(f"checkpoint {path} has tensor {extra[0]!r} the model lacks: {hint}")
