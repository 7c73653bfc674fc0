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

The scheduler is a ``torch.optim.lr_scheduler.LambdaLR`` (``LemonSchedule``) whose position is the
number of ``optimizer.step()`` calls, not of its own ``.step()`` calls: pass it to the Hugging Face
Trainer as ``optimizers=(optimizer, scheduler)``, to ``accelerator.prepare`` (whose wrapper calls
``.step()`` once per process), or call ``scheduler.step()`` after each ``optimizer.step()`` in a
plain loop: the LR of optimizer step ``s`` is ``f(s) * peak`` in all three. Its ``state_dict`` holds
the step counter and the arguments, so checkpoints round-trip; ``carry_schedule`` moves a running
schedule to the optimizer of a grown model.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch.optim.lr_scheduler import LambdaLR

from .errors import LemonError

__all__ = ["lemon_schedule", "lemon_total_steps", "lemon_lr_factor", "carry_schedule", "LemonSchedule"]

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


class LemonSchedule(LambdaLR):
    """``LambdaLR`` whose position is the number of optimizer steps taken.

    A plain ``LambdaLR`` advances once per ``.step()`` call, so a wrapper that calls it more than
    once per optimizer step (accelerate's ``AcceleratedScheduler`` calls it ``num_processes``
    times) runs the schedule that many times too fast. This one counts ``optimizer.step()`` calls
    (a step post-hook on the optimizer) and ``.step()`` moves to that count: extra calls with no
    optimizer step in between change nothing, and the LR of optimizer step ``s`` is
    ``f(s) * peak`` whatever wraps the scheduler. An optimizer step skipped by a gradient scaler
    (inf/nan gradients) does not advance the schedule, as with accelerate's wrapper.

    ``load_state_dict`` re-applies the LR of the loaded position at once (a plain ``LambdaLR``
    rebuilt and loaded keeps the constructor's ``f(0)`` until its next step).
    """

    _NOT_STATE = ("optimizer", "lr_lambdas", "_hook", "_counting", "_optimizer_steps")

    def __init__(self, optimizer: torch.optim.Optimizer, factor: "_Factor", last_epoch: int = -1):
        # LambdaLR's constructor takes one step (last_epoch -> last_epoch + 1): that step is the
        # position itself, not a call to ignore, so counting starts after it.
        self._optimizer_steps = last_epoch + 1
        self._counting = False
        super().__init__(optimizer, factor, last_epoch=last_epoch)
        self._counting = True
        self._hook = optimizer.register_step_post_hook(_count_step(self))

    def step(self, epoch=None):
        if epoch is not None:
            raise LemonError("epoch: a LemonSchedule follows the optimizer's steps; call step() with no "
                             "argument (build it with last_epoch= to start at a position)")
        if not self._counting:  # LambdaLR.__init__'s initial step
            return super().step()
        if self._optimizer_steps == self.last_epoch:
            return  # no optimizer step since the last call (accelerate's repeated calls)
        self.last_epoch = self._optimizer_steps - 1  # LambdaLR.step adds the one
        return super().step()

    def _apply(self):
        """Set every group's LR to the one of the current position (outside ``step``)."""
        for group, base, fn in zip(self.optimizer.param_groups, self.base_lrs, self.lr_lambdas, strict=True):
            group["lr"] = base * fn(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        state = super().state_dict()
        for key in ("_hook", "_counting", "_optimizer_steps"):
            state.pop(key, None)  # the hook handle is not data; the step count is last_epoch
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in ("_hook", "_counting")})
        self._counting = True
        self._optimizer_steps = self.last_epoch
        self._apply()

    def __getstate__(self):
        # the hook lives on the optimizer, which pickles without its hooks: register it anew on load
        return {k: v for k, v in self.__dict__.items() if k != "_hook"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._hook = self.optimizer.register_step_post_hook(_count_step(self))


class _count_step:
    """Picklable optimizer step post-hook: one more optimizer step taken."""

    def __init__(self, schedule: LemonSchedule):
        self.schedule = schedule

    def __call__(self, optimizer, args, kwargs):
        self.schedule._optimizer_steps += 1


def lemon_schedule(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                   min_lr_ratio: float = 0.0, decay: str = "cosine", last_epoch: int = -1) -> LemonSchedule:
    """Linear warmup to the optimizer's LR, then cosine/linear decay to ``min_lr_ratio`` x peak.

    Contract: the LR during optimizer step ``s`` (0-based: the ``s``-th ``optimizer.step()``) is
    ``lemon_lr_factor(s) * peak`` for every group, where ``s`` counts the optimizer's steps, not
    calls to ``.step()``. So ``warmup_steps`` and ``total_steps`` are optimizer steps in every
    stack: plain loops (``opt.step(); sched.step()``), the HF Trainer, and accelerate's prepared
    scheduler on any number of processes (it calls ``.step()`` ``num_processes`` times per
    optimizer step; the extra calls change nothing). See ``LemonSchedule``.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (accelerate's ``AcceleratedOptimizer``: its
            ``.optimizer`` is used); each group's ``lr`` (or ``initial_lr`` when resuming with
            ``last_epoch >= 0``) is its peak LR.
        warmup_steps: optimizer steps of linear warmup (0 = start at the peak). Use the
            from-scratch recipe's warmup unchanged (LEMON_SPEC section 8).
        total_steps: optimizer steps, warmup included, at which the decay reaches its floor; for a
            LEMON run ``lemon_total_steps(scratch_total_steps, budget_ratio)``.
        min_lr_ratio: floor as a fraction of the peak, in [0, 1].
        decay: ``"cosine"`` (the paper's ViT/BERT runs) or ``"linear"``.
        last_epoch: ``LambdaLR``'s argument: the schedule starts at position ``last_epoch + 1``
            (-1 = fresh). To carry a running schedule to a new optimizer use ``carry_schedule``.

    Returns:
        ``LemonSchedule`` (a ``LambdaLR``): call ``.step()`` after every ``optimizer.step()``.

    Raises:
        LemonError: naming the bad argument (non-optimizer, negative or non-int steps,
            ``warmup_steps > total_steps``, ratio outside [0, 1], unknown decay).
    """
    optimizer = _plain_optimizer(optimizer, "optimizer")
    warmup_steps = _check_int("warmup_steps", warmup_steps, minimum=0)
    total_steps = _check_int("total_steps", total_steps, minimum=1)
    if warmup_steps > total_steps:
        raise LemonError(f"warmup_steps ({warmup_steps}) must be <= total_steps ({total_steps})")
    min_lr_ratio = _check_ratio("min_lr_ratio", min_lr_ratio, low=0.0, high=1.0, low_open=False)
    if decay not in _DECAYS:
        raise LemonError(f"decay must be one of {_DECAYS}, got {decay!r}")
    last_epoch = _check_int("last_epoch", last_epoch, minimum=-1)
    if last_epoch >= 0:
        for i, group in enumerate(optimizer.param_groups):
            if "initial_lr" not in group:
                raise LemonError(f"last_epoch={last_epoch}: optimizer param group {i} has no 'initial_lr' (the "
                                 "peak LR a running schedule records); use carry_schedule(old_schedule, optimizer)")
    return LemonSchedule(optimizer, _Factor(warmup_steps, total_steps, min_lr_ratio, decay), last_epoch=last_epoch)


def carry_schedule(scheduler, optimizer: torch.optim.Optimizer) -> LambdaLR:
    """The running ``scheduler`` moved onto ``optimizer`` (growth mid-run): same LR curve, same position.

    After ``expand_optimizer_state`` the grown model has a new optimizer; the old scheduler still
    drives the old one (keeping it freezes the new optimizer's LR), and a fresh
    ``lemon_schedule(new_opt, ...)`` restarts the warmup. This returns a scheduler over
    ``optimizer`` with the old one's schedule, position and per-group peak LRs, whose LR is
    already the one of the next optimizer step: no zero step, no jump back to the peak.

    Args:
        scheduler: a ``lemon_schedule`` (any ``LambdaLR``: a Hugging Face ``get_*_schedule_with_warmup``
            too), or accelerate's ``AcceleratedScheduler`` around one.
        optimizer: the new optimizer, with as many param groups as the old one in the same order
            (``expand_optimizer_state`` builds it so); accelerate's ``AcceleratedOptimizer`` is unwrapped.

    Returns:
        A ``LemonSchedule`` for a ``LemonSchedule`` (else a ``LambdaLR``), not wrapped: pass it to
        ``accelerator.prepare`` again if you use accelerate.
    """
    scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper
    if not isinstance(scheduler, LambdaLR):
        raise LemonError(f"scheduler must be a lemon_schedule (a LambdaLR), got {type(scheduler).__name__}")
    optimizer = _plain_optimizer(optimizer, "optimizer")
    if len(optimizer.param_groups) != len(scheduler.base_lrs):
        raise LemonError(f"optimizer has {len(optimizer.param_groups)} param groups, the scheduler drives "
                         f"{len(scheduler.base_lrs)}: build it with expand_optimizer_state (groups kept in order)")
    for group, peak in zip(optimizer.param_groups, scheduler.base_lrs):
        group["initial_lr"] = peak  # the peak of the curve being continued, whatever lr says now
    position = scheduler.last_epoch
    if isinstance(scheduler, LemonSchedule):
        factor = scheduler.lr_lambdas[0]
        new = LemonSchedule(optimizer, _Factor(factor.warmup_steps, factor.total_steps, factor.min_lr_ratio,
                                               factor.decay), last_epoch=position - 1)
    else:
        new = LambdaLR(optimizer, list(scheduler.lr_lambdas), last_epoch=position - 1)
    return new


def _plain_optimizer(optimizer, name: str) -> torch.optim.Optimizer:
    # accelerate's AcceleratedOptimizer subclasses Optimizer but steps the one it wraps: the LR
    # and the step hook belong on the inner one
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise LemonError(f"{name} must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


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
