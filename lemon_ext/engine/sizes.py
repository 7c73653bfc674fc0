"""Source and target sizes of an expansion, read from a config and checked against the spec."""
from __future__ import annotations

import numbers
from dataclasses import dataclass

from ..arch import Architecture, evaluate
from ..errors import LemonError


@dataclass(frozen=True)
class Sizes:
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    experts: int = 0  # MoE: routed experts per layer (the count never changes)
    expert_ffn: int = 0  # MoE: one routed expert's FFN width
    shared_ffn: int = 0  # MoE: the shared expert's FFN width (Qwen2-MoE)

    @property
    def attn(self) -> int:
        """Query projection width (heads * head_dim)."""
        return self.heads * self.head_dim

    @property
    def kv_attn(self) -> int:
        return self.kv_heads * self.head_dim


def _field(cfg: dict, arch: Architecture, generic: str, required: bool = True):
    name = arch.fields.get(generic)
    if name is None:
        return None
    value = cfg.get(name)
    if value is None and required:
        raise LemonError(f"config field {name!r} ({generic}) is missing")
    return value


def source_sizes(arch: Architecture, cfg: dict) -> Sizes:
    hidden = int(_field(cfg, arch, "hidden_size"))
    heads = int(_field(cfg, arch, "num_attention_heads"))
    ffn = _field(cfg, arch, "intermediate_size", required=arch.ffn_default is None)
    ffn = int(ffn) if ffn is not None else evaluate(arch.ffn_default, {**cfg, "hidden": hidden})
    kv = _field(cfg, arch, "num_key_value_heads", required=False)
    kv = int(kv) if kv is not None else heads
    head_dim = _field(cfg, arch, "head_dim", required=False) if arch.explicit_head_dim else None
    if head_dim is None:
        if hidden % heads:
            raise LemonError(f"config: hidden size {hidden} is not divisible by {heads} attention heads")
        head_dim = hidden // heads
    layers = int(_field(cfg, arch, "num_hidden_layers"))
    if heads % kv:
        raise LemonError(f"config: {heads} attention heads are not a multiple of {kv} key/value heads")
    moe = [int(_field(cfg, arch, g, required=False) or 0) for g in ("num_experts", "expert_ffn", "shared_ffn")]
    return Sizes(hidden, ffn, heads, kv, int(head_dim), layers, *moe)


def size_argument(name: str, value):
    """A target size as given by the caller: None or an int. "64", 64.0 and True are refused
    (int() would accept them silently, and True would mean a size of 1)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise LemonError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _not_smaller(name: str, source: int, target: int) -> None:
    if target < source:
        raise LemonError(f"{name}={target} is smaller than the source's {source}: lemon_ext only grows models")


def target_sizes(
    arch: Architecture,
    src: Sizes,
    *,
    hidden_size: int | None,
    intermediate_size: int | None,
    num_attention_heads: int | None,
    num_key_value_heads: int | None,
    num_hidden_layers: int,
    moe_intermediate_size: int | None = None,
    shared_expert_intermediate_size: int | None = None,
) -> Sizes:
    """Target sizes: given values checked, missing ones kept (heads: head_dim kept)."""
    hidden_size, intermediate_size, num_attention_heads, num_key_value_heads = (
        size_argument(name, value) for name, value in (
            ("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
            ("num_attention_heads", num_attention_heads), ("num_key_value_heads", num_key_value_heads)))
    hidden = src.hidden if hidden_size is None else hidden_size
    ffn = src.ffn if intermediate_size is None else intermediate_size
    _not_smaller("hidden_size", src.hidden, hidden)
    _not_smaller("intermediate_size", src.ffn, ffn)
    _not_smaller("num_hidden_layers", src.layers, num_hidden_layers)
    standard = src.attn == src.hidden  # attention width tied to hidden size
    if num_attention_heads is None:
        if standard:
            if hidden % src.head_dim:
                raise LemonError(
                    f"hidden_size={hidden} is not a multiple of head_dim {src.head_dim}; "
                    "pass num_attention_heads (head_dim itself cannot change)"
                )
            heads = hidden // src.head_dim
        else:
            heads = src.heads * hidden // src.hidden if (src.heads * hidden) % src.hidden == 0 else src.heads
    else:
        heads = int(num_attention_heads)
        if standard and not arch.explicit_head_dim and heads * src.head_dim != hidden:
            raise LemonError(
                f"num_attention_heads={heads} with hidden_size={hidden} changes head_dim from "
                f"{src.head_dim} to {hidden / heads:g}; LEMON keeps head_dim (and so 1/sqrt(d_k) and RoPE)"
            )
    _not_smaller("num_attention_heads", src.heads, heads)
    if num_key_value_heads is not None:
        kv = int(num_key_value_heads)
    elif src.kv_heads == src.heads:
        kv = heads
    elif src.kv_heads == 1:
        kv = 1
    else:
        group = src.heads // src.kv_heads
        if heads % group:
            raise LemonError(
                f"num_attention_heads={heads} is not a multiple of the source's group size {group}; "
                "pass num_key_value_heads"
            )
        kv = heads // group
    _not_smaller("num_key_value_heads", src.kv_heads, kv)
    if arch.fields.get("num_key_value_heads") is None and kv != heads:
        raise LemonError(f"model family {arch.family!r} has no grouped-query attention (num_key_value_heads={kv})")
    expert_ffn = _moe_width(arch, "expert_ffn", src.expert_ffn, moe_intermediate_size, "moe_intermediate_size", ffn)
    shared_ffn = _moe_width(arch, "shared_ffn", src.shared_ffn, shared_expert_intermediate_size,
                            "shared_expert_intermediate_size", ffn)
    target = Sizes(hidden, ffn, heads, kv, src.head_dim, num_hidden_layers, src.experts, expert_ffn, shared_ffn)
    check_gqa(src, target)
    return target


def _moe_width(arch: Architecture, generic: str, source: int, given: int | None, keyword: str, ffn: int) -> int:
    """An expert FFN width: the keyword if given; else the dense FFN's target when the family
    keeps both in one config field (Mixtral's intermediate_size); else the source's."""
    field = arch.fields.get(generic)
    given = size_argument(keyword, given)
    if given is not None:
        if field is None:
            raise LemonError(f"{keyword}={given}: model family {arch.family!r} has no such size")
        if field == arch.fields.get("intermediate_size") and int(given) != ffn:
            raise LemonError(f"{keyword}={given}: the experts of model family {arch.family!r} are sized by "
                             f"{field} ({ffn}); pass intermediate_size")
        target = int(given)
    elif field is not None and field == arch.fields.get("intermediate_size"):
        target = ffn
    else:
        target = source
    _not_smaller(keyword, source, target)
    return target


def check_gqa(src: Sizes, tgt: Sizes) -> None:
    """Every target query head must read the key/value head its source query head reads."""
    if tgt.heads % tgt.kv_heads:
        raise LemonError(f"num_attention_heads={tgt.heads} is not a multiple of num_key_value_heads={tgt.kv_heads}")
    group_s = src.heads // src.kv_heads
    group_t = tgt.heads // tgt.kv_heads
    for j in range(tgt.heads):
        via_target = (j // group_t) % src.kv_heads
        via_source = (j % src.heads) // group_s
        if via_target != via_source:
            raise LemonError(
                f"impossible GQA mapping: target query head {j} would read source key/value head "
                f"{via_target}, but its source query head {j % src.heads} reads {via_source} "
                f"(heads {src.heads}->{tgt.heads}, key/value heads {src.kv_heads}->{tgt.kv_heads}); "
                "keep the group size or use a single key/value head"
            )
