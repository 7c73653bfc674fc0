"""``train``: the compact training loop (causal-LM, masked-LM, classification, any loss module).

One optimizer step = ``grad_accum_steps`` micro-batches per process; each micro-batch loss is the
model's own mean loss divided by ``grad_accum_steps`` (and averaged over processes by DDP), so the
step's gradient is the mean over the global batch when micro-batches carry equal numbers of
loss terms (fixed-length LM blocks, classification); with padded LM batches it is the mean of
per-micro-batch means, as in the HF Trainer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import LemonError
from ..schedule import lemon_schedule
from . import dist as dist_util
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import StepBatches, eval_batches, steps_per_epoch, train_loader
from .optim import build_adamw

__all__ = ["train", "evaluate", "TrainResult", "compute_loss"]


@dataclass
class TrainResult:
    step: int  # optimizer steps done (== total_steps unless stopped early)
    losses: list = field(default_factory=list)  # [(step, mean train loss of that step)], steps run here
    evals: list = field(default_factory=list)  # [(step, eval loss)]
    checkpoint: str | None = None  # last checkpoint written
    seconds: float = 0.0

    @property
    def final_eval_loss(self):
        return self.evals[-1][1] if self.evals else None


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def compute_loss(model: nn.Module, batch) -> torch.Tensor:
    """Scalar loss of ``model`` on ``batch``: dicts are keyword arguments (HF models with ``labels``),
    tuples/lists positional, a tensor the only argument. The output may be an HF ``ModelOutput``
    or dict with ``loss``, a tuple whose first item is the loss, or the loss tensor itself."""
    if isinstance(batch, dict):
        out = model(**batch)
    elif isinstance(batch, (list, tuple)):
        out = model(*batch)
    else:
        out = model(batch)
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    if loss is None and isinstance(out, (tuple, list)):
        loss = out[0]
    if loss is None and isinstance(out, torch.Tensor):
        loss = out
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise LemonError("the model returned no scalar loss: pass labels in the batch (HF models) or "
                         "return the loss (a 0-d tensor, or .loss / ['loss'] / first tuple item)")
    return loss


def _batch_size(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _batch_size(next(iter(batch.values())))
    return _batch_size(batch[0])


def _autocast(rt, bf16: bool):
    if bf16 and rt.parallel != "fsdp":  # FSDP2 casts parameters itself (MixedPrecisionPolicy)
        return torch.autocast(device_type=rt.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, dataset, *, batch_size: int, collate_fn=None, rt=None, bf16: bool = False,
             max_batches: int | None = None) -> float:
    """Example-weighted mean loss over ``dataset`` (sharded over processes, all-reduced)."""
    rt = rt or dist_util.Runtime(device=next(model.parameters()).device)
    collate = collate_fn or torch.utils.data.default_collate
    was_training = model.training
    model.eval()
    # DDP's forward broadcasts buffers (a collective): evaluate the bare module; FSDP needs the
    # wrapped one (its forward all-gathers) and eval_batches keeps ranks in lockstep for it.
    net = model if rt.parallel == "fsdp" else dist_util.unwrap(model)
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)
    for idx, weight in eval_batches(dataset, batch_size=batch_size, world_size=rt.world_size, rank=rt.rank,
                                    max_batches=max_batches):
        batch = _to_device(collate([dataset[i] for i in idx]), rt.device)
        with _autocast(rt, bf16):
            loss = compute_loss(net, batch)
        total[0] += loss.double() * weight
        total[1] += weight
    dist_util.all_reduce_sum(total, rt)
    model.train(was_training)
    return (total[0] / total[1]).item()


class _Metrics:
    """metrics.jsonl on rank 0. On resume, lines past the resumed step (logged after the last
    checkpoint by the interrupted run) are dropped so the file reads as one uninterrupted run."""

    def __init__(self, out_dir, rt, resume_step: int, extra: dict):
        self.path = os.path.join(out_dir, "metrics.jsonl") if out_dir and rt.is_main else None
        self.extra = extra
        if self.path:
            os.makedirs(out_dir, exist_ok=True)
        if self.path and os.path.exists(self.path):
            keep = []
            with open(self.path) as f:
                for line in f:
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step:
                        keep.append(line)
            with open(self.path, "w") as f:
                f.writelines(keep if resume_step > 0 else [])

    def write(self, record: dict):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({**record, **self.extra}) + "\n")


def train(model: nn.Module, train_data, eval_data=None, *, config: TrainConfig | None = None, collate_fn=None,
          optimizer: torch.optim.Optimizer | None = None, scheduler=None, **overrides) -> TrainResult:
    """Train ``model`` for ``config.total_steps`` optimizer steps; resumes from ``out_dir`` if asked.

    Args:
        model: an HF model (batches carry ``labels``; causal-LM, masked-LM or sequence
            classification) or any ``nn.Module`` whose forward returns a scalar loss
            (see ``compute_loss``). Parameters stay fp32; bf16 autocast runs on GPU.
        train_data: a map-style dataset; items are collated by ``collate_fn``
            (``default_collate``), e.g. ``{"input_ids": LongTensor[T], "labels": LongTensor[T]}``.
        eval_data: a map-style dataset evaluated every ``eval_every`` steps and at the end.
        config: ``TrainConfig``; keyword ``overrides`` replace its fields.
        optimizer: default ``build_adamw`` (no weight decay on norms, biases, embeddings).
            Pass your own to carry state, e.g. grown with ``expand_optimizer_state``; it must
            be built on the (wrapped, for FSDP) model's parameters.
        scheduler: default ``lemon_schedule(optimizer, warmup_steps, total_steps, ...)``; any
            object with ``step()`` and ``state_dict()``.

    Under torchrun (``WORLD_SIZE > 1``) the loop runs data-parallel (DDP, or FSDP2 with
    ``parallel="fsdp"`` on GPU); every rank calls ``train`` with the same arguments.

    Returns:
        TrainResult with per-step train losses (global mean), eval losses, last checkpoint.
    """
    cfg = (config or TrainConfig()).replace(**overrides).check()
    if not isinstance(model, nn.Module):
        raise LemonError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not hasattr(train_data, "__getitem__") or not hasattr(train_data, "__len__"):
        raise LemonError("train_data must be a map-style dataset (__getitem__ and __len__)")
    t0 = time.time()
    rt = dist_util.setup(cfg.device, cfg.parallel)
    try:
        return _run(model, train_data, eval_data, cfg, rt, collate_fn, optimizer, scheduler, t0)
    finally:
        if rt.owns_group:
            torch.distributed.destroy_process_group()


def _run(model, train_data, eval_data, cfg: TrainConfig, rt, collate_fn, optimizer, scheduler, t0):
    if cfg.precision == "bf16" and rt.device.type != "cuda":
        raise LemonError("precision='bf16' is for GPUs; on CPU use 'fp32' (bf16 autocast there is slow)")
    bf16 = rt.device.type == "cuda" and (cfg.precision == "bf16" or (
        cfg.precision == "auto" and torch.cuda.is_bf16_supported()))
    # Per-rank seed for dropout etc.; the data order has its own generator (data.py).
    random.seed(cfg.seed + rt.rank)
    np.random.seed((cfg.seed + rt.rank) % 2**32)
    torch.manual_seed(cfg.seed + rt.rank)

    model.train()
    net = dist_util.wrap(model, rt, bf16=bf16)
    if optimizer is None:
        optimizer = build_adamw(net, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps)
    if scheduler is None:
        scheduler = lemon_schedule(optimizer, warmup_steps=cfg.warmup_steps, total_steps=cfg.total_steps,
                                   min_lr_ratio=cfg.min_lr_ratio, decay=cfg.decay)

    global_batch = cfg.batch_size * cfg.grad_accum_steps * rt.world_size
    per_epoch = steps_per_epoch(len(train_data), global_batch)
    step = 0
    ckpt = None
    if cfg.resume:
        ckpt = cfg.resume if isinstance(cfg.resume, str) else (cfg.out_dir and latest_checkpoint(cfg.out_dir))
        if ckpt:
            pos = load_checkpoint(ckpt, model=net, optimizer=optimizer, scheduler=scheduler, rt=rt)
            step = pos["step"]
            if (pos["epoch"], pos["step_in_epoch"]) != divmod(step, per_epoch):
                raise LemonError(f"checkpoint {ckpt} was taken with another dataset size or global batch "
                                 f"(epoch/step {pos['epoch']}/{pos['step_in_epoch']} vs {divmod(step, per_epoch)})")
    result = TrainResult(step=step, checkpoint=ckpt or None)
    metrics = _Metrics(cfg.out_dir, rt, step, cfg.extra)
    eval_bs = cfg.eval_batch_size or cfg.batch_size

    def run_eval():
        loss = evaluate(net, eval_data, batch_size=eval_bs, collate_fn=collate_fn, rt=rt, bf16=bf16,
                        max_batches=cfg.eval_batches)
        result.evals.append((step, loss))
        metrics.write({"step": step, "eval_loss": loss, "time": time.time() - t0})
        return loss

    def checkpoint():
        if cfg.out_dir:
            result.checkpoint = save_checkpoint(
                cfg.out_dir, step=step, epoch=step // per_epoch, step_in_epoch=step % per_epoch, model=net,
                optimizer=optimizer, scheduler=scheduler, rt=rt, keep=cfg.keep_checkpoints,
                config={k: v for k, v in dataclasses.asdict(cfg).items() if k != "extra"})

    if eval_data is not None and cfg.eval_at_start and step == 0:
        run_eval()
    end = min(cfg.total_steps, cfg.stop_after) if cfg.stop_after is not None else cfg.total_steps
    bar = None
    if cfg.progress and rt.is_main and step < end:
        from tqdm.auto import tqdm

        bar = tqdm(total=end, initial=step, desc="train", dynamic_ncols=True)
    pending = []  # per-step loss tensors not yet synced/logged (one .item() per log, not per step)
    grad_norm = torch.zeros(())
    is_ddp = rt.parallel == "ddp"
    while step < end:
        epoch, start = divmod(step, per_epoch)
        sampler = StepBatches(len(train_data), batch_size=cfg.batch_size, grad_accum_steps=cfg.grad_accum_steps,
                              world_size=rt.world_size, rank=rt.rank, seed=cfg.seed, epoch=epoch,
                              start_step=start, shuffle=cfg.shuffle)
        micro = iter(train_loader(train_data, sampler, collate_fn=collate_fn, num_workers=cfg.num_workers,
                                  pin_memory=rt.device.type == "cuda"))
        for _ in range(start, per_epoch):
            step_loss = torch.zeros((), device=rt.device)
            for m in range(cfg.grad_accum_steps):
                batch = _to_device(next(micro), rt.device)
                last = m == cfg.grad_accum_steps - 1
                # DDP: all-reduce gradients only on the last micro-batch of the step;
                # FSDP2: same through set_requires_gradient_sync (untested here: no GPU)
                sync = contextlib.nullcontext() if (last or not is_ddp) else net.no_sync()
                if rt.parallel == "fsdp" and cfg.grad_accum_steps > 1:  # pragma: no cover
                    net.set_requires_gradient_sync(last)
                with sync:
                    with _autocast(rt, bf16):
                        loss = compute_loss(net, batch) / cfg.grad_accum_steps
                    loss.backward()
                step_loss += loss.detach().float()
            if cfg.max_grad_norm:
                grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            pending.append(step_loss)
            if bar is not None:
                bar.update(1)
            if step % cfg.log_every == 0 or step == end:
                losses = dist_util.all_reduce_sum(torch.stack(pending).double(), rt) / rt.world_size
                values = losses.tolist()
                first = step - len(values) + 1
                result.losses.extend(zip(range(first, step + 1), values))
                pending = []
                gn = float(grad_norm) if cfg.max_grad_norm else None
                metrics.write({"step": step, "loss": values[-1], "loss_mean": sum(values) / len(values),
                               "lr": lr, "grad_norm": gn, "epoch": epoch, "time": time.time() - t0})
                if bar is not None:
                    bar.set_postfix(loss=f"{values[-1]:.4f}", lr=f"{lr:.2e}")
                if not math.isfinite(values[-1]):
                    raise FloatingPointError(f"loss is {values[-1]} at step {step}: lower lr or check the data")
            if eval_data is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.total_steps:
                run_eval()
            if cfg.save_every and step % cfg.save_every == 0 and step < end:
                checkpoint()
            if step >= end:
                break
    if bar is not None:
        bar.close()
    if eval_data is not None and step == cfg.total_steps and (not result.evals or result.evals[-1][0] != step):
        run_eval()
    if step > 0 and (result.checkpoint is None or not result.checkpoint.endswith(f"step-{step:08d}")):
        checkpoint()
    result.step = step
    result.seconds = time.time() - t0
    return result
