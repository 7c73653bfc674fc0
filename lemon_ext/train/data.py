"""Deterministic, resumable, rank-sharded batching over a map-style dataset.

The order is a pure function of (seed, epoch): epoch ``e`` uses ``randperm(len(dataset))`` from a
generator seeded with ``seed * 1_000_003 + e``. Optimizer step ``i`` of an epoch consumes the
global slice ``perm[i*G : (i+1)*G]`` with ``G = batch_size * grad_accum_steps * world_size``;
micro-batch ``m`` of rank ``r`` takes ``perm[i*G + (m*W + r)*B : ... + B]``. Hence

- resuming at step ``s`` needs only ``s`` (no replay of skipped batches), and
- 2 processes x micro-batch B see exactly the examples 1 process x micro-batch 2B sees
  (the DDP-equivalence test relies on it).

The last ``len(dataset) mod G`` examples of each epoch's permutation are dropped (every step
has the same global batch, which keeps the loss normalisation identical across steps).

``collate_rows`` is the default collate: rows as a Hugging Face ``datasets.Dataset`` returns them
(dicts of Python lists and numbers) become tensors, and a column no tensor can hold is named.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from ..errors import LemonError

__all__ = ["StepBatches", "steps_per_epoch", "train_loader", "eval_batches", "collate_rows", "check_dataset"]


def check_dataset(name: str, data) -> None:
    """Map-style (``__getitem__`` + ``__len__``), non-empty: else one line naming the argument."""
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise LemonError(f"{name} must be a map-style dataset (__getitem__ and __len__), got {type(data).__name__}"
                         " (an iterable dataset: materialise it, e.g. list(...) or datasets' .take(n))")
    if len(data) == 0:
        raise LemonError(f"{name} is empty")


def collate_rows(rows: list):
    """Stack a list of examples into a batch. Dict rows are collated column by column: tensors
    and numpy arrays are stacked, Python numbers and (nested) lists of numbers become tensors
    (raw ``datasets.Dataset`` rows); other rows go to ``torch.utils.data.default_collate``.

    Raises LemonError naming the column for strings (drop the column or pass ``collate_fn``) and
    for rows of different lengths (pad them, e.g. with a ``DataCollatorWithPadding`` as ``collate_fn``).
    """
    if not rows or not isinstance(rows[0], Mapping):
        return default_collate(rows)
    return {key: _column(key, [row[key] for row in rows]) for key in rows[0]}


def _column(key, values: list):
    first = values[0]
    if isinstance(first, str) or (isinstance(first, (list, tuple)) and first and isinstance(first[0], str)):
        raise LemonError(f"column {key!r} holds strings: drop it (datasets: .remove_columns([{key!r}])) or pass "
                         "collate_fn")
    if isinstance(first, (torch.Tensor, numbers.Number)) or type(first).__module__ == "numpy":
        tensors = [torch.as_tensor(v) for v in values]
    elif isinstance(first, (list, tuple)):
        try:
            tensors = [torch.tensor(v) for v in values]
        except (TypeError, ValueError) as exc:
            raise LemonError(f"column {key!r}: rows are not (nested) lists of numbers ({exc})") from None
    else:
        return default_collate(values)
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise LemonError(f"column {key!r} has rows of different shapes {sorted(shapes)[:2]}: pad them to one length "
                         "or pass a padding collate_fn (e.g. transformers.DataCollatorWithPadding)")
    return torch.stack(tensors)


def steps_per_epoch(n_examples: int, global_batch: int) -> int:
    steps = n_examples // global_batch
    if steps == 0:
        raise LemonError(
            f"train_data has {n_examples} examples, fewer than one global batch ({global_batch} = "
            "batch_size x grad_accum_steps x world_size): lower batch_size")
    return steps


class StepBatches:
    """Batch sampler for one epoch from optimizer step ``start_step``: yields this rank's
    micro-batches (lists of ``batch_size`` indices), ``grad_accum_steps`` per optimizer step."""

    def __init__(self, n_examples: int, *, batch_size: int, grad_accum_steps: int, world_size: int,
                 rank: int, seed: int, epoch: int, start_step: int = 0, shuffle: bool = True):
        self.n, self.b, self.a, self.w, self.r = n_examples, batch_size, grad_accum_steps, world_size, rank
        self.global_batch = batch_size * grad_accum_steps * world_size
        self.steps = steps_per_epoch(n_examples, self.global_batch)
        self.seed, self.epoch, self.start_step, self.shuffle = seed, epoch, start_step, shuffle

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.a

    def __iter__(self):
        perm = self.order().tolist()
        for step in range(self.start_step, self.steps):
            base = step * self.global_batch
            for m in range(self.a):
                lo = base + (m * self.w + self.r) * self.b
                yield perm[lo:lo + self.b]


def train_loader(dataset: Dataset, sampler: StepBatches, *, collate_fn=None, num_workers: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    # A private generator: DataLoader draws its worker base seed from the *global* RNG otherwise,
    # which would shift the dropout stream each time a loader is created (breaking exact resume).
    gen = torch.Generator().manual_seed(sampler.seed * 1_000_003 + sampler.epoch + 7)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
                      pin_memory=pin_memory, generator=gen)


def eval_batches(dataset: Dataset, *, batch_size: int, world_size: int, rank: int,
                 max_batches: int | None = None) -> list[tuple[list[int], float]]:
    """This rank's evaluation batches as ``(indices, weight)``; every rank gets the same number of
    batches (ranks short of one repeat their first batch with weight 0) so that collective-running
    forwards (FSDP all-gathers) stay in lockstep. Weights are example counts."""
    n = len(dataset)
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    if max_batches is not None:
        batches = batches[:max_batches * world_size]
    mine = batches[rank::world_size]
    per_rank = -(-len(batches) // world_size)
    out = [(idx, float(len(idx))) for idx in mine]
    while len(out) < per_rank:
        out.append((batches[0], 0.0))
    return out
