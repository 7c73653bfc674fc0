"""Role data -> TensorSpec: the one place that turns a role (lemon_ext/arch/roles.py) and the
plan's sizes into a tensor's row and column maps, factors, split mode and rule text."""
from __future__ import annotations

import math

import torch

from ..arch import ROLES, Architecture
from ..errors import LemonError
from ..ops import FREE, ZERO
from . import axes
from .sizes import Sizes
from .spec import TensorSpec


#: Axis rules over the hidden axis besides "stream" (whose tail depends on the norm):
#: (source hidden, target hidden) -> map.
_STREAM_RULES = {"stream_in": axes.stream_input, "stream_circ": axes.circular, "stream_zero": axes.zero_tail}


class SpecBuilder:
    """Builds the TensorSpec of each tensor of one plan."""

    def __init__(self, arch: Architecture, src: Sizes, tgt: Sizes, mode: str, noise_std: float, tied_factor: float,
                 embed_factor: float = 1.0):
        """tied_factor: the gain factor of the norms feeding a tied head (1/k, and 1/embed_factor
        where the embedding is scaled); embed_factor: scale of embeddings the model multiplies by
        its embed_scale (factor_S / factor_T)."""
        self.arch, self.src, self.tgt = arch, src, tgt
        self.mode, self.noise_std = mode, noise_std
        self.tied_factor = tied_factor
        self.embed_factor = embed_factor
        self.eta = axes.eta(src.hidden, tgt.hidden)
        self.k = tgt.hidden // src.hidden
        # One tensor per distinct axis: the specs of every layer share their maps, so the ops'
        # per-map-pair digest (group layout, hints: ~0.35 ms a pair) runs once per pair, not once
        # per tensor (57 tensors of a 4 -> 6 layer Llama: 20 ms of a 111 ms expand_state_dict).
        self._axes: dict = {}
        if arch.new_layer_zero not in ("writers", "branch_norms") or (
                arch.new_layer_zero == "branch_norms" and not any(ROLES[e[1]].branch_norm for e in arch.layer)):
            raise LemonError(f"internal: table {arch.family!r}: new_layer_zero={arch.new_layer_zero!r} needs "
                             "'writers', or 'branch_norms' with branch_norm roles in the layer")

    # -- axes -------------------------------------------------------------------------------------
    def _units(self) -> dict[str, tuple[int, int, int]]:
        """Axis rules of replicated units: rule -> (source units, target units, entries per unit)."""
        s, t = self.src, self.tgt
        return {"q_heads": (s.heads, t.heads, s.head_dim), "kv_heads": (s.kv_heads, t.kv_heads, s.head_dim),
                "heads_qkv": (s.heads, t.heads, 3 * s.head_dim), "ffn": (s.ffn, t.ffn, 1),
                "expert_ffn": (s.expert_ffn, t.expert_ffn, 1), "shared_ffn": (s.shared_ffn, t.shared_ffn, 1)}

    def _source_length(self, rule: str) -> int:
        if rule == "stream" or rule in _STREAM_RULES:
            return self.src.hidden
        if rule not in self._units():
            raise LemonError(f"internal: axis rule {rule!r} cannot be a segment of a fused tensor")
        num_s, _, unit = self._units()[rule]
        return num_s * unit

    def axis(self, rule, source_length: int, paired: bool = False) -> torch.Tensor:
        """The target -> source index map of one axis (a tuple: fused segments, offsets added);
        the same tensor for the same arguments (every spec of the plan shares it: never modify it).

        paired: the axis of a new (zero-output) layer: replicated units (heads, neurons) come in
        adjacent identical pairs whatever the width, so the cancelling split of the layer's output
        columns (+e, -e) is non-zero on every unit and every weight of the new layer gets a
        gradient on the first step (with one replica per unit the output columns would be zero and
        the layer's units dead until the output weights move). An odd unit count leaves one unit
        unpaired.
        """
        key = (rule, source_length, paired and self._has_units(rule))  # pairing changes unit axes only
        if key not in self._axes:
            self._axes[key] = self._build_axis(rule, source_length, paired)
        return self._axes[key]

    def _has_units(self, rule) -> bool:
        """Whether ``rule`` (or a segment of it) replicates units (heads, neurons)."""
        if isinstance(rule, tuple):
            return any(self._has_units(r) for r in (rule[1:] if rule[0] == "experts" else rule))
        return rule in self._units()

    def _build_axis(self, rule, source_length: int, paired: bool) -> torch.Tensor:
        if isinstance(rule, tuple) and rule[0] == "experts":
            inner = rule[1:] if len(rule) > 2 else rule[1]
            per_expert = source_length // max(self.src.experts, 1)
            m = self.axis(inner, per_expert, paired)
            return torch.cat([torch.where(m >= 0, m + e * per_expert, m) for e in range(self.src.experts)])
        if isinstance(rule, tuple):
            parts, offset = [], 0
            for segment in rule:
                m = self.axis(segment, self._source_length(segment), paired)
                parts.append(torch.where(m >= 0, m + offset, m))  # sentinels stay sentinels
                offset += self._source_length(segment)
            if offset != source_length:
                raise LemonError(f"internal: fused segments {rule} cover {offset} of {source_length} entries")
            return torch.cat(parts)
        if rule == "keep":
            return axes.keep(source_length)
        units = self._units()
        if rule in units:  # whole units copied circularly (a neuron is a unit of one entry)
            return (axes.paired_units if paired else axes.heads)(*units[rule])
        h_s, h_t = self.src.hidden, self.tgt.hidden
        if rule == "stream":
            return axes.stream(h_s, h_t, self.arch.norm)
        if rule in _STREAM_RULES:
            return _STREAM_RULES[rule](h_s, h_t)
        raise LemonError(f"internal: unknown axis rule {rule!r}")

    # -- specs ------------------------------------------------------------------------------------
    def transposed(self, role: str) -> bool:
        return self.arch.conv1d and ROLES[role].stored_transposed

    def build(self, name, source, role_name, source_shape, *, new_output=False, final_norm=False,
              key_name="", fill=None) -> TensorSpec:
        """The spec of target ``name`` built from ``source`` (shape ``source_shape``) by its role.

        new_output: the tensor belongs to a new (zero-output) layer; final_norm: a norm feeding a
        tied head (scaled by 1/k); fill: a constant source (Post-LN identity norms).
        """
        if role_name not in ROLES:
            raise LemonError(f"internal: unknown role {role_name!r} for tensor {name!r}")
        role = ROLES[role_name]
        s, t = self.src, self.tgt
        transpose = self.transposed(role_name)
        view = role.view if role.view != "auto" else ("vector" if len(source_shape) == 1 else "rows")
        if role.integer_heads and (t.heads % s.heads or t.kv_heads % s.kv_heads):
            raise LemonError(
                f"tensor {name!r}: a q/k norm over the whole projection is exact only when every head is "
                f"replicated the same number of times (heads {s.heads}->{t.heads}, key/value heads "
                f"{s.kv_heads}->{t.kv_heads}); use integer multiples of the source's head counts")
        if view == "vector":
            n_rows, n_cols = 1, math.prod(source_shape)
        elif view == "stacked":
            n_rows, n_cols = source_shape[0] * source_shape[1], source_shape[2]
        elif view == "cols":
            n_rows, n_cols = math.prod(source_shape[:-1]), source_shape[-1]
        else:
            n_rows, n_cols = source_shape[0], math.prod(source_shape[1:])
            if transpose:
                n_rows, n_cols = n_cols, n_rows
        # New layers: zero output by cancelling writers over paired units, or by zero branch-norm
        # gains (then the layer is otherwise a plain copy of its source layer).
        cancel = self.arch.new_layer_zero == "writers"
        rows = self.axis("keep", 1) if view == "vector" else self.axis(role.rows, n_rows, new_output and cancel)
        cols = self.axis(role.cols, n_cols, new_output and cancel)
        zero_output = new_output and role.writes_stream and cancel
        zero_gain = new_output and role.branch_norm and not cancel
        split = "none"
        if role.split:
            split = ("cancel_equal" if self.mode == "equal" else "cancel") if zero_output else self.mode
        extra = self.tied_factor if final_norm else 1.0
        factor = (self.eta if role.gain else 1.0) * (extra if role.gain or role.shift else 1.0)
        if role.embed_scaled:
            factor *= self.embed_factor
        scales_qk = role.qk_norm_input and self.arch.qk_norm and self.eta != 1.0  # LEMON_SPEC section 10
        row_scale = self.eta if scales_qk else 1.0
        if view == "vector":
            factor, row_scale = factor * row_scale, 1.0
        col_factor = torch.full((cols.numel(),), factor, dtype=torch.float64) if factor != 1.0 else None
        row_factor = torch.full((rows.numel(),), row_scale, dtype=torch.float64) if row_scale != 1.0 else None
        offset = self.arch.norm_offset if role.gain and factor != 1.0 else 0.0
        k_desc = f"k={self.k}" + (f", r={t.hidden % s.hidden}" if t.hidden % s.hidden else "")
        rule = role.rule.format(
            k=k_desc, tail=", tail random" if t.hidden % s.hidden else "", split=split,
            stream_type="V_avg" if self.arch.norm == "layernorm" else "V_zero", eta=f"{self.eta:.6g}",
            tied=(f", x1/{self.k} (tied head)" if self.embed_factor == 1.0
                  else f", x{extra:.6g} = 1/({self.k} x {self.embed_factor:.6g}) (tied head, scaled embedding)")
            if extra != 1.0 else "",
            what=role.what.format(hs=s.heads, ht=t.heads, kvs=s.kv_heads, kvt=t.kv_heads, fs=s.ffn, ft=t.ffn,
                                  efs=s.expert_ffn, eft=t.expert_ffn),
        )
        if scales_qk:
            rule += f"; x eta={self.eta:.6g} (feeds a q/k norm whose eps is the config's, scaled by eta^2)"
        if zero_output and view == "vector":
            cols, rule = torch.full((cols.numel(),), ZERO, dtype=torch.int64), "zero (new layer output bias)"
        if zero_gain:
            # x * (offset + w) with offset + w = 0: the new layer adds exactly zero in any dtype
            cols, col_factor, offset = torch.full((cols.numel(),), ZERO, dtype=torch.int64), None, self.arch.norm_offset
            rule = f"zero gain (w = {0.0 - self.arch.norm_offset:g}): the new layer's branch adds exactly 0"
        target_shape = _target_shape(source_shape, view, transpose, rows.numel(), cols.numel())
        noise = self.noise_std if split != "none" or bool((cols == FREE).any()) else 0.0
        return TensorSpec(
            name=name, source=source, source_shape=tuple(source_shape), target_shape=target_shape,
            role=role_name, rule=rule, row_map=rows, col_map=cols, view=view, transpose=transpose,
            row_factor=row_factor, col_factor=col_factor, split=split, noise_std=noise,
            key_name=key_name or name, fill=fill, offset=offset,
        )


def _target_shape(source_shape, view, transpose, num_rows, num_cols) -> tuple[int, ...]:
    if view == "vector":
        return (num_cols,)
    if view == "stacked":
        return (source_shape[0], num_rows // source_shape[0], num_cols)
    if view == "cols":
        return tuple(source_shape[:-1]) + (num_cols,)
    if transpose:
        return (num_cols, num_rows)
    rest = tuple(source_shape[1:])
    if len(rest) > 1:
        if math.prod(rest) != num_cols:
            raise LemonError(f"internal: cannot reshape {num_cols} columns to {rest}")
        return (num_rows,) + rest
    return (num_rows, num_cols)
