"""The LEMON learning-rate schedule (LEMON_SPEC section 8) and its step budget.

After a lossless expansion LEMON trains the target with the *same* optimizer, peak LR and warmup
as a from-scratch run of the target, and compresses only the decay into a shorter budget
(ViT 300 -> 130 epochs, BERT 220k -> 132k-147k steps in the paper). A smaller peak LR was worse.

Closed form of the LR factor f(s) at optimizer step s (the LR is ``f(s) * base_lr`` of each
parameter group; ``W = warmup_steps``, ``T = total_steps``, ``m = min_lr_ratio``)::

    s <  W:        f = s / W                                 (linear warmup from 0)
    W <= s <= T:   p = (s - W) / (T - W)                     (p = 1 when T == W)
                   cosine: f = m + (1 - m) * (1 + cos(pi * p)) / 2
                   linear: f = m + (1 - m) * (1 - p)
    s >  T:        f = m                                     (flat)

With ``m = 0`` and cosine this equals ``transformers.get_cosine_schedule_with_warmup`` step for step
(tested), so a LEMON run and a from-scratch Trainer run differ only in ``total_steps``.

The scheduler is a plain ``torch.optim.lr_scheduler.LambdaLR``: pass it to the Hugging Face Trainer
as ``optimizers=(optimizer, scheduler)``, to ``accelerator.prepare``, or call ``scheduler.step()``
after each ``optimizer.step()`` in a plain loop. Its ``state_dict`` holds only the step counter
(the lambda is rebuilt from the same arguments), so checkpoints round-trip.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch.optim.lr_scheduler import LambdaLR

from .errors import LemonError

__all__ = ["lemon_schedule", "lemon_total_steps", "lemon_lr_factor"]

_DECAYS = ("cosine", "linear")


def _check_int(name: str, value, *, minimum: int) -> int:
    # bool is an int subclass: reject it, True steps is always a mistake
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise LemonError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise LemonError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_ratio(name: str, value, *, low: float, high: float, low_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise LemonError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    bad_low = value <= low if low_open else value < low
    if not math.isfinite(value) or bad_low or value > high:
        bracket = "(" if low_open else "["
        raise LemonError(f"{name} must be in {bracket}{low}, {high}], got {value}")
    return value


def lemon_lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0,
                    decay: str = "cosine") -> float:
    """The multiplier of the peak LR at optimizer step ``step`` (closed form in the module doc).

    Arguments are assumed valid (``lemon_schedule`` checks them); this is the function the
    scheduler's lambda calls, exposed so tests and plots use the same formula.
    """
    if step < warmup_steps:
        return step / warmup_steps
    if step >= total_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    if decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


class _Factor:
    """Picklable LR lambda (a closure is not: ``torch.save(scheduler)`` and spawn-based workers need it)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float, decay: str):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        self.decay = decay

    def __call__(self, step: int) -> float:
        return lemon_lr_factor(step, warmup_steps=self.warmup_steps, total_steps=self.total_steps,
                               min_lr_ratio=self.min_lr_ratio, decay=self.decay)


def lemon_schedule(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                   min_lr_ratio: float = 0.0, decay: str = "cosine", last_epoch: int = -1) -> LambdaLR:
    """Linear warmup to the optimizer's LR, then cosine/linear decay to ``min_lr_ratio`` x peak.

    Args:
        optimizer: any ``torch.optim.Optimizer``; each group's ``lr`` (or ``initial_lr`` when
            resuming with ``last_epoch >= 0``) is its peak LR.
        warmup_steps: optimizer steps of linear warmup (0 = start at the peak). Use the
            from-scratch recipe's warmup unchanged (LEMON_SPEC section 8).
        total_steps: optimizer steps, warmup included, at which the decay reaches its floor; for a
            LEMON run ``lemon_total_steps(scratch_total_steps, budget_ratio)``.
        min_lr_ratio: floor as a fraction of the peak, in [0, 1].
        decay: ``"cosine"`` (the paper's ViT/BERT runs) or ``"linear"``.
        last_epoch: passed to ``LambdaLR`` (the index of the last step taken; -1 = fresh).

    Returns:
        ``LambdaLR``: call ``.step()`` once after every ``optimizer.step()``.

    Raises:
        LemonError: naming the bad argument (non-optimizer, negative or non-int steps,
            ``warmup_steps > total_steps``, ratio outside [0, 1], unknown decay).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise LemonError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    warmup_steps = _check_int("warmup_steps", warmup_steps, minimum=0)
    total_steps = _check_int("total_steps", total_steps, minimum=1)
    if warmup_steps > total_steps:
        raise LemonError(f"warmup_steps ({warmup_steps}) must be <= total_steps ({total_steps})")
    min_lr_ratio = _check_ratio("min_lr_ratio", min_lr_ratio, low=0.0, high=1.0, low_open=False)
    if decay not in _DECAYS:
        raise LemonError(f"decay must be one of {_DECAYS}, got {decay!r}")
    last_epoch = _check_int("last_epoch", last_epoch, minimum=-1)
    return LambdaLR(optimizer, _Factor(warmup_steps, total_steps, min_lr_ratio, decay), last_epoch=last_epoch)


def lemon_total_steps(scratch_total_steps: int, budget_ratio: float) -> int:
    """Steps of a LEMON run given the from-scratch recipe's steps and the budget ratio.

    ``ceil(scratch_total_steps * budget_ratio)`` (rounded up so a budget is never cut below the
    asked fraction), at least 1. The paper's ratios: ViT 130/300 = 0.43, BERT 132k-147k/220k =
    0.60-0.67; docs/training.md explains how to pick one.

    Raises:
        LemonError: ``scratch_total_steps`` not a positive int, ``budget_ratio`` not in (0, 1].
    """
    scratch_total_steps = _check_int("scratch_total_steps", scratch_total_steps, minimum=1)
    # > 1 would train longer than from scratch: never what LEMON is for, so it is refused
    budget_ratio = _check_ratio("budget_ratio", budget_ratio, low=0.0, high=1.0, low_open=True)
    # round(x, 9) first so 0.3 * 10 = 3.0000000000000004 gives 3, not 4
    return max(1, math.ceil(round(scratch_total_steps * budget_ratio, 9)))
