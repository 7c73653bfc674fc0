"""Index maps for one tensor axis: which source index (or sentinel) feeds each target index.

Every map is an int64 tensor of the target length with entries >= 0 (source index) or the
sentinels of ``lemon_ext.ops``: ZERO, MEAN (the average of the source axis), FREE (random init).
Notation of LEMON_SPEC.md: source width n_s, target n_t, k = n_t // n_s, r = n_t % n_s.
"""
from __future__ import annotations

import math

import torch

from ..ops import FREE, MEAN, ZERO


def circular(n_s: int, n_t: int) -> torch.Tensor:
    """V_circ: j -> j mod n_s (replicated neurons, norm gains)."""
    return torch.arange(n_t, dtype=torch.int64) % n_s


def keep(n: int) -> torch.Tensor:
    """Identity: an axis that does not grow (vocabulary, positions, labels, image channels)."""
    return torch.arange(n, dtype=torch.int64)


def _with_tail(n_s: int, n_t: int, tail: int) -> torch.Tensor:
    m = circular(n_s, n_t)
    m[(n_t // n_s) * n_s:] = tail
    return m


def stream(n_s: int, n_t: int, norm: str) -> torch.Tensor:
    """Residual-stream type: V_avg (tail = MEAN) for LayerNorm models, V_zero for RMSNorm."""
    return _with_tail(n_s, n_t, MEAN if norm == "layernorm" else ZERO)


def zero_tail(n_s: int, n_t: int) -> torch.Tensor:
    """V_zero: k copies then zeros (LayerNorm beta)."""
    return _with_tail(n_s, n_t, ZERO)


def stream_input(n_s: int, n_t: int) -> torch.Tensor:
    """Columns reading a normalised stream (V_zero): k copies split, tail columns FREE."""
    return _with_tail(n_s, n_t, FREE)


def heads(num_s: int, num_t: int, head_dim: int) -> torch.Tensor:
    """Whole heads replicated circularly: target head h reads source head h mod num_s."""
    head = torch.arange(num_t, dtype=torch.int64) % num_s
    return (head.unsqueeze(1) * head_dim + torch.arange(head_dim)).reshape(-1)


def paired_units(num_s: int, num_t: int, unit: int) -> torch.Tensor:
    """New layers' units (heads of ``unit`` entries, neurons of 1): target units 2p and 2p+1 both
    read source unit 2p mod num_s, so every unit has an identical partner (whatever num_t), and
    more pairs reuse the source units circularly."""
    source_unit = (torch.arange(num_t, dtype=torch.int64) // 2 * 2) % num_s
    return (source_unit.unsqueeze(1) * unit + torch.arange(unit)).reshape(-1)


def eta(n_s: int, n_t: int) -> float:
    """sqrt(k * n_s / n_t): the norm-gain factor for indivisible widths (1 when n_s | n_t)."""
    return math.sqrt((n_t // n_s) * n_s / n_t)
