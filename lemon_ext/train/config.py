"""TrainConfig: every knob of ``lemon_ext.train.train`` in one checked dataclass."""
from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass, field

from ..errors import LemonError

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Settings of one training run. Batch sizes are per process; the global batch is
    ``batch_size * grad_accum_steps * world_size`` examples per optimizer step.

    Schedule fields feed ``lemon_schedule`` (used unless a scheduler is passed to ``train``):
    a LEMON run keeps the from-scratch ``lr`` and ``warmup_steps`` and shortens ``total_steps``
    (see docs/training.md).
    """

    out_dir: str | None = None  # checkpoints/ and metrics.jsonl; None = neither
    batch_size: int = 8
    grad_accum_steps: int = 1
    total_steps: int = 1000  # optimizer steps to run, warmup included (also the schedule's end)
    lr: float = 3e-4
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    decay: str = "cosine"
    weight_decay: float = 0.1  # applied to matrices only: never to norms, biases, embeddings
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # None or 0 = no clipping
    eval_every: int = 0  # optimizer steps between evaluations; 0 = only at the end
    eval_at_start: bool = False  # evaluate before the first step (the expanded model's loss)
    eval_batches: int | None = None  # cap on evaluation micro-batches per process
    eval_batch_size: int | None = None  # defaults to batch_size
    log_every: int = 10  # optimizer steps between metrics.jsonl lines
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end / stop
    keep_checkpoints: int = 2
    resume: bool | str = True  # True: latest checkpoint in out_dir if any; str: a checkpoint dir
    stop_after: int | None = None  # stop (with a checkpoint) after this step: preemption drills
    seed: int = 0  # data order (per epoch) and per-rank dropout RNG
    shuffle: bool = True
    device: str = "auto"  # "auto": cuda:LOCAL_RANK when CUDA is available, else cpu
    precision: str = "auto"  # "auto" (bf16 autocast on a bf16-capable GPU), "bf16", "fp32"
    parallel: str = "auto"  # "auto" (DDP when WORLD_SIZE > 1), "none", "ddp", "fsdp"
    num_workers: int = 0
    progress: bool = True  # tqdm bar on rank 0
    tensorboard: bool | str = "auto"  # "auto": out_dir/tensorboard if tensorboard is installed; a str: log dir
    export_dir: str | None = None  # at the end: save_pretrained directory of the (gathered) model
    extra: dict = field(default_factory=dict)  # copied into every metrics line (run name, ...)

    def replace(self, **overrides) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(self)}
        for key in overrides:
            if key not in names:
                raise LemonError(f"unknown training option {key!r}; TrainConfig fields: {sorted(names)}")
        return dataclasses.replace(self, **overrides)

    def check(self) -> "TrainConfig":
        """Raise LemonError naming the first bad field; return self."""
        def pos_int(name, minimum=1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
                raise LemonError(f"{name} must be an int >= {minimum}, got {v!r}")

        for name in ("batch_size", "grad_accum_steps", "total_steps", "keep_checkpoints"):
            pos_int(name)
        for name in ("warmup_steps", "eval_every", "log_every", "save_every", "num_workers"):
            pos_int(name, 0)
        if self.eval_batch_size is not None:
            pos_int("eval_batch_size")
        if self.eval_batches is not None:
            pos_int("eval_batches")
        if self.stop_after is not None:
            pos_int("stop_after")
        if not (isinstance(self.lr, numbers.Real) and self.lr > 0):
            raise LemonError(f"lr must be > 0, got {self.lr!r}")
        if not (isinstance(self.weight_decay, numbers.Real) and self.weight_decay >= 0):
            raise LemonError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm >= 0:
            raise LemonError(f"max_grad_norm must be >= 0 or None, got {self.max_grad_norm!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise LemonError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if self.parallel not in ("auto", "none", "ddp", "fsdp"):
            raise LemonError(f"parallel must be 'auto', 'none', 'ddp' or 'fsdp', got {self.parallel!r}")
        if not isinstance(self.tensorboard, (bool, str)):
            raise LemonError(f"tensorboard must be 'auto', True, False or a log directory, got {self.tensorboard!r}")
        if self.export_dir is not None and not isinstance(self.export_dir, (str, os.PathLike)):
            raise LemonError(f"export_dir must be a directory path or None, got {self.export_dir!r}")
        if self.out_dir is not None and not isinstance(self.out_dir, (str, os.PathLike)):
            raise LemonError(f"out_dir must be a directory path or None, got {self.out_dir!r}")
        if not isinstance(self.extra, dict):
            raise LemonError(f"extra must be a dict, got {type(self.extra).__name__}")
        return self
