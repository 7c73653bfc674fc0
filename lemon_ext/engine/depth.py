"""Depth expansion: which source layer each target layer copies, and which copies are new.

A target layer list is a list of source indices of length L_T. The first occurrence of each source
index is the original layer (full function); later occurrences are new layers whose output is
exactly zero (LEMON_SPEC.md section 5), so any L_T >= L_S works and they may sit anywhere after
their source's first occurrence. A valid list names every source layer, and the originals appear
in source order.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import LemonError


def _copies_per_layer(num_source: int, num_new: int) -> list[int]:
    """Spread ``num_new`` copies evenly over the source layers (Bresenham-style)."""
    return [(l + 1) * num_new // num_source - l * num_new // num_source for l in range(num_source)]


def layer_sources(num_source: int, num_target: int, placement: str | Sequence[int]) -> list[int]:
    """Target layer -> source layer.

    Args:
        placement: "interleave" (each new layer right after its source: 0,0',1,1',...),
            "stack" (all originals, then the copies pass by pass: 0..L-1, 0..L-1), or an
            explicit list of source indices.
    """
    if not isinstance(placement, str):
        order = [int(x) for x in placement]
        validate_layer_list(order, num_source)
        if len(order) != num_target:
            raise LemonError(
                f"depth_placement lists {len(order)} layers but num_hidden_layers={num_target}"
            )
        return order
    copies = _copies_per_layer(num_source, num_target - num_source)
    if placement == "interleave":
        return [l for l in range(num_source) for _ in range(1 + copies[l])]
    if placement == "stack":
        extra = [l for p in range(max(copies, default=0)) for l in range(num_source) if copies[l] > p]
        return list(range(num_source)) + extra
    raise LemonError(f"depth_placement={placement!r}: use 'interleave', 'stack' or a list of source layer indices")


def validate_layer_list(order: Sequence[int], num_source: int) -> None:
    """Raise LemonError unless ``order`` is a valid target layer order (see module doc)."""
    for t, s in enumerate(order):
        if not 0 <= s < num_source:
            raise LemonError(f"depth_placement[{t}]={s} is not a source layer index (0..{num_source - 1})")
    first = [s for t, s in enumerate(order) if s not in order[:t]]
    if first != list(range(num_source)):
        missing = sorted(set(range(num_source)) - set(first))
        if missing:
            raise LemonError(f"depth_placement never uses source layer(s) {missing}")
        raise LemonError(
            f"depth_placement {list(order)} is not a valid layer order: the first occurrences must be "
            f"0, 1, ..., {num_source - 1} in order (got {first})"
        )


@dataclass(frozen=True)
class TargetLayer:
    index: int  # target layer index
    source: int  # source layer it copies
    new: bool  # a zero-output copy
    ln_attn: str  # Post-LN only: "source", "identity"
    ln_out: str | int  # Post-LN only: "source", "identity", or a source layer whose ln_out it carries


def target_layers(order: Sequence[int], post_ln: bool) -> list[TargetLayer]:
    """Describe each target layer, including the Post-LN LayerNorm chain.

    Post-LN (BERT): a new layer's branches are zero, so x -> LN(x + 0); exact up to eps only if
    the LayerNorm before it is an identity affine. For each run of new layers after a real layer
    p: p's output LN becomes identity, every new layer's LNs are identity, and the last layer of
    the run carries p's original output LN.
    """
    seen: set[int] = set()
    layers = []
    for t, s in enumerate(order):
        layers.append(TargetLayer(t, s, s in seen, "source", "source"))
        seen.add(s)
    if not post_ln:
        return layers
    out = list(layers)
    t = 0
    while t < len(layers):
        if layers[t].new:
            t += 1
            continue
        run_end = t + 1
        while run_end < len(layers) and layers[run_end].new:
            run_end += 1
        if run_end > t + 1:
            p = layers[t]
            out[t] = TargetLayer(p.index, p.source, False, "source", "identity")
            for u in range(t + 1, run_end):
                carry = p.source if u == run_end - 1 else "identity"
                out[u] = TargetLayer(u, layers[u].source, True, "identity", carry)
        t = run_end
    return out
