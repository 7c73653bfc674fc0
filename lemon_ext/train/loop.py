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
import math
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
from .data import StepBatches, check_dataset, collate_rows, eval_batches, steps_per_epoch, train_loader
from .export import check_exportable, export_pretrained
from .metrics import JsonlMetrics, TensorBoardLogger, resolve_tensorboard
from .optim import build_adamw

__all__ = ["train", "evaluate", "TrainResult", "compute_loss"]


@dataclass
class TrainResult:
    step: int  # optimizer steps done (== total_steps unless stopped early)
    losses: list = field(default_factory=list)  # [(step, mean train loss of that step)], steps run here
    evals: list = field(default_factory=list)  # [(step, eval loss)]
    checkpoint: str | None = None  # last checkpoint written
    seconds: float = 0.0
    export_dir: str | None = None  # the save_pretrained directory written (TrainConfig.export_dir)

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
    collate = collate_fn or collate_rows
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


class _Sinks:
    """Rank 0's record consumers: metrics.jsonl, TensorBoard, user callbacks (see metrics.py)."""

    def __init__(self, cfg: TrainConfig, rt, resume_step: int, callbacks, tb_dir):
        self.extra = cfg.extra
        self.sinks = []
        if rt.is_main:
            if cfg.out_dir:
                self.sinks.append(JsonlMetrics(cfg.out_dir, resume_step))
            if tb_dir:
                self.sinks.append(TensorBoardLogger(tb_dir))
            self.sinks.extend(callbacks)

    def __call__(self, record: dict):
        record = {**record, **self.extra}
        for sink in self.sinks:
            sink(dict(record))  # a copy each: a callback may keep or change it

    def close(self):
        for sink in self.sinks:
            getattr(sink, "close", lambda: None)()


def _tokens(batch):
    """Tokens in a micro-batch (a 0-d tensor, never synced here), or None when it has no token ids."""
    if isinstance(batch, dict):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            return mask.sum()
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor):
            return torch.tensor(ids.numel())
    return None


def train(model: nn.Module, train_data, eval_data=None, *, config: TrainConfig | None = None, collate_fn=None,
          optimizer: torch.optim.Optimizer | None = None, scheduler=None, callbacks=None, **overrides) -> TrainResult:
    """Train ``model`` for ``config.total_steps`` optimizer steps; resumes from ``out_dir`` if asked.

    Args:
        model: an HF model (batches carry ``labels``; causal-LM, masked-LM or sequence
            classification) or any ``nn.Module`` whose forward returns a scalar loss
            (see ``compute_loss``). Parameters stay fp32; bf16 autocast runs on GPU.
        train_data: a map-style dataset (a list, a torch ``Dataset``, a Hugging Face
            ``datasets.Dataset``); items are collated by ``collate_fn`` (default ``collate_rows``:
            dicts of tensors, numbers or equal-length lists), e.g. ``{"input_ids": [T], "labels": [T]}``.
        eval_data: a map-style dataset evaluated every ``eval_every`` steps and at the end.
        config: ``TrainConfig``; keyword ``overrides`` replace its fields.
        optimizer: default ``build_adamw`` (no weight decay on norms, biases, embeddings).
            Pass your own to carry state, e.g. grown with ``expand_optimizer_state``; it must
            be built on the model's parameters (not possible for FSDP2, which shards them here:
            let ``train`` build it).
        scheduler: default ``lemon_schedule(optimizer, warmup_steps, total_steps, ...)``; any
            object with ``step()`` and ``state_dict()`` (``carry_schedule`` after growth).
        callbacks: callables ``fn(record: dict)`` called on rank 0 with every training record
            (``step``, ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ...) and evaluation
            record (``eval_loss``); see ``lemon_ext.train.metrics``.

    Under torchrun (``WORLD_SIZE > 1``) the loop runs data-parallel (DDP, or FSDP2 with
    ``parallel="fsdp"``, on CUDA or CPU); every rank calls ``train`` with the same arguments.
    With ``export_dir`` the trained model is written there with ``save_pretrained`` (gathered
    from the shards under FSDP2) before the process group is torn down.

    Returns:
        TrainResult with per-step train losses (global mean), eval losses, last checkpoint. A
        rerun of a finished run trains and evaluates nothing and returns the recorded final eval.
    """
    cfg = (config or TrainConfig()).replace(**overrides).check()
    if not isinstance(model, nn.Module):
        raise LemonError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_dataset("train_data", train_data)
    if eval_data is not None:
        check_dataset("eval_data", eval_data)
    callbacks = list(callbacks or [])
    for cb in callbacks:
        if not callable(cb):
            raise LemonError(f"callbacks must be callables fn(record: dict), got {type(cb).__name__}")
    if cfg.export_dir:
        check_exportable(model)
    tb_dir = resolve_tensorboard(cfg.tensorboard, cfg.out_dir)
    t0 = time.time()
    rt = dist_util.setup(cfg.device, cfg.parallel)
    try:
        return _run(model, train_data, eval_data, cfg, rt, collate_fn or collate_rows, optimizer, scheduler,
                    callbacks, tb_dir, t0)
    finally:
        if rt.owns_group:
            torch.distributed.destroy_process_group()


def _run(model, train_data, eval_data, cfg: TrainConfig, rt, collate_fn, optimizer, scheduler, callbacks, tb_dir, t0):
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
    else:
        # FSDP2 replaces the parameters when it shards: an optimizer built before would step
        # tensors the model no longer uses, and the run would silently not train
        mine = {id(p) for p in net.parameters()}
        if any(id(p) not in mine for g in optimizer.param_groups for p in g["params"]):
            raise LemonError("optimizer: its parameters are not the model's (parallel='fsdp' replaces them when it "
                             "shards): let train build the optimizer, or build it over this model's parameters")
    if scheduler is None:
        scheduler = lemon_schedule(optimizer, warmup_steps=cfg.warmup_steps, total_steps=cfg.total_steps,
                                   min_lr_ratio=cfg.min_lr_ratio, decay=cfg.decay)

    global_batch = cfg.batch_size * cfg.grad_accum_steps * rt.world_size
    per_epoch = steps_per_epoch(len(train_data), global_batch)
    step = 0
    ckpt = None
    history = []  # evaluations recorded by earlier calls (from the checkpoint)
    if cfg.resume:
        ckpt = cfg.resume if isinstance(cfg.resume, str) else (cfg.out_dir and latest_checkpoint(cfg.out_dir))
        if ckpt:
            pos = load_checkpoint(ckpt, model=net, optimizer=optimizer, scheduler=scheduler, rt=rt)
            step, history = pos["step"], pos["evals"]
            if (pos["epoch"], pos["step_in_epoch"]) != divmod(step, per_epoch):
                raise LemonError(f"checkpoint {ckpt} was taken with another dataset size or global batch "
                                 f"(epoch/step {pos['epoch']}/{pos['step_in_epoch']} vs {divmod(step, per_epoch)})")
    result = TrainResult(step=step, checkpoint=ckpt or None)
    emit = _Sinks(cfg, rt, step, callbacks, tb_dir)
    try:
        _loop(net, train_data, eval_data, cfg, rt, collate_fn, optimizer, scheduler, bf16, per_epoch, step,
              history, result, emit, t0)
    finally:
        emit.close()
    if cfg.export_dir:
        result.export_dir = export_pretrained(net, str(cfg.export_dir), rt)
    result.seconds = time.time() - t0
    return result


def _loop(net, train_data, eval_data, cfg, rt, collate_fn, optimizer, scheduler, bf16, per_epoch, step, history,
          result, emit, t0):
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    paused = 0.0  # seconds spent in evaluation/checkpoints since the last training record

    def run_eval():
        nonlocal paused
        t = time.time()
        loss = evaluate(net, eval_data, batch_size=eval_bs, collate_fn=collate_fn, rt=rt, bf16=bf16,
                        max_batches=cfg.eval_batches)
        result.evals.append((step, loss))
        emit({"step": step, "eval_loss": loss, "time": time.time() - t0})
        paused += time.time() - t
        return loss

    def checkpoint():
        nonlocal paused
        t = time.time()
        if cfg.out_dir:
            result.checkpoint = save_checkpoint(
                cfg.out_dir, step=step, epoch=step // per_epoch, step_in_epoch=step % per_epoch, model=net,
                optimizer=optimizer, scheduler=scheduler, rt=rt, keep=cfg.keep_checkpoints,
                config={k: v for k, v in dataclasses.asdict(cfg).items() if k != "extra"},
                evals=history + result.evals)
        paused += time.time() - t

    if eval_data is not None and cfg.eval_at_start and step == 0:
        run_eval()
    end = min(cfg.total_steps, cfg.stop_after) if cfg.stop_after is not None else cfg.total_steps
    bar = None
    if cfg.progress and rt.is_main and step < end:
        from tqdm.auto import tqdm

        bar = tqdm(total=end, initial=step, desc="train", dynamic_ncols=True)
    pending = []  # per-step loss tensors not yet synced/logged (one .item() per log, not per step)
    counts = torch.zeros(2, dtype=torch.float64, device=rt.device)  # tokens, examples since the last record
    has_tokens = False
    tokens_total = 0.0
    last_record = time.time()
    is_ddp = rt.parallel == "ddp"
    params = [p for p in net.parameters() if p.requires_grad]
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
                # Accumulation: gradients are reduced across processes only on the last
                # micro-batch of the step (DDP: no_sync; FSDP2: set_requires_gradient_sync).
                sync = contextlib.nullcontext() if (last or not is_ddp) else net.no_sync()
                if rt.parallel == "fsdp" and cfg.grad_accum_steps > 1:
                    net.set_requires_gradient_sync(last)
                with sync:
                    with _autocast(rt, bf16):
                        loss = compute_loss(net, batch) / cfg.grad_accum_steps
                    loss.backward()
                step_loss += loss.detach().float()
                tokens = _tokens(batch)
                if tokens is not None:
                    has_tokens = True
                    counts[0] += tokens.to(counts.device, torch.float64)
                counts[1] += _batch_size(batch)
            will_log = (step + 1) % cfg.log_every == 0 or step + 1 == end
            grad_norm = None
            if cfg.max_grad_norm:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            elif will_log:  # the norm is logged even without clipping (computed only when logged)
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            pending.append(step_loss)
            if bar is not None:
                bar.update(1)
            if will_log:
                synced = dist_util.all_reduce_sum(torch.cat([torch.stack(pending).double(), counts]), rt)
                values = (synced[:-2] / rt.world_size).tolist()
                n_tokens, n_examples = synced[-2].item(), synced[-1].item()
                seconds = max(time.time() - last_record - paused, 1e-9)
                first = step - len(values) + 1
                result.losses.extend(zip(range(first, step + 1), values))
                tokens_total += n_tokens
                gn = float(dist_util.full_value(grad_norm)) if grad_norm is not None else None
                emit({"step": step, "loss": values[-1], "loss_mean": sum(values) / len(values), "lr": lr,
                      "grad_norm": gn, "tokens": tokens_total if has_tokens else None,
                      "tokens_per_s": n_tokens / seconds if has_tokens else None,
                      "examples_per_s": n_examples / seconds, "epoch": epoch, "time": time.time() - t0})
                if bar is not None:
                    bar.set_postfix(loss=f"{values[-1]:.4f}", lr=f"{lr:.2e}")
                if not math.isfinite(values[-1]):
                    raise FloatingPointError(f"loss is {values[-1]} at step {step}: lower lr or check the data")
                pending, paused, last_record = [], 0.0, time.time()
                counts.zero_()
            if eval_data is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.total_steps:
                run_eval()
            if cfg.save_every and step % cfg.save_every == 0 and step < end:
                checkpoint()
            if step >= end:
                break
    if bar is not None:
        bar.close()
    recorded_final = bool(history) and history[-1][0] == step and not result.evals
    if eval_data is not None and step == cfg.total_steps:
        if recorded_final:
            result.evals.append(tuple(history[-1]))  # a finished run rerun: its final eval, not a new one
        elif not result.evals or result.evals[-1][0] != step:
            run_eval()
    if step > 0 and (result.checkpoint is None or not result.checkpoint.endswith(f"step-{step:08d}")):
        checkpoint()
    result.step = step
