"""Config handling: read any config as a dict, and write the target config with every dependent
field rewritten (sizes, eps scaled by eta^2, per-layer lists), returned as the input's type."""
from __future__ import annotations

import copy
from collections.abc import Sequence

from ..arch import Architecture, evaluate
from ..errors import LemonError
from . import axes
from .sizes import Sizes


def config_to_dict(cfg) -> dict:
    """A transformers PretrainedConfig or a config.json dict, as a plain dict (never modified)."""
    if isinstance(cfg, dict):
        return copy.deepcopy(cfg)
    to_dict = getattr(cfg, "to_dict", None)
    if to_dict is None:
        raise LemonError(f"config must be a transformers config or a dict, got {type(cfg).__name__}")
    return to_dict()


def _remap_layer_list(values, order: Sequence[int], field: str):
    if values is None:
        return None
    values = list(values)
    if len(values) != max(order) + 1 and len(values) < max(order) + 1:
        raise LemonError(f"config field {field!r} has {len(values)} entries, fewer than the source layers")
    return [values[s] for s in order]


def rewrite_config(cfg_s, cfg: dict, arch: Architecture, src: Sizes, tgt: Sizes, order: Sequence[int]):
    """Target config of the same type as ``cfg_s`` (dict in, dict out)."""
    out = copy.deepcopy(cfg)
    f = arch.fields
    eta = axes.eta(src.hidden, tgt.hidden)
    out[f["hidden_size"]] = tgt.hidden
    out[f["num_attention_heads"]] = tgt.heads
    out[f["num_hidden_layers"]] = tgt.layers
    if "num_key_value_heads" in f:
        out[f["num_key_value_heads"]] = tgt.kv_heads
    if arch.explicit_head_dim:
        out[f["head_dim"]] = tgt.head_dim
    ffn_field = f["intermediate_size"]
    keeps_default = (arch.ffn_default is not None and cfg.get(ffn_field) is None
                     and tgt.ffn == evaluate(arch.ffn_default, {**cfg, "hidden": tgt.hidden}))
    if not keeps_default:  # GPT-2's n_inner stays null when 4 * n_embd still holds
        out[ffn_field] = tgt.ffn
    for generic, width in (("expert_ffn", tgt.expert_ffn), ("shared_ffn", tgt.shared_ffn)):
        if f.get(generic) and f[generic] != ffn_field:
            out[f[generic]] = width
    eps_field = f["eps"]
    if eps_field in out and eta != 1.0:
        out[eps_field] = float(cfg[eps_field]) * eta * eta
    for list_field in arch.layer_lists:
        if out.get(list_field) is not None:
            out[list_field] = _remap_layer_list(cfg[list_field], order, list_field)
    for count_field in arch.layer_thresholds:
        if cfg.get(count_field) is not None:
            # Qwen2's max_window_layers: layers below it differ from those above; keep each
            # layer's own kind by counting the target layers whose source is below it.
            out[count_field] = sum(1 for s in order if s < cfg[count_field])
    for index_field in arch.layer_index_lists:
        if cfg.get(index_field):
            # Qwen3-MoE's mlp_only_layers: a target layer is listed when its source layer is.
            out[index_field] = [t for t, s in enumerate(order) if s in set(cfg[index_field])]
    for follower in arch.hidden_followers:
        if cfg.get(follower) == src.hidden:
            out[follower] = tgt.hidden
    if isinstance(cfg_s, dict):
        return out
    out.pop("transformers_version", None)
    # The constructor, not from_dict: from_dict logs the whole config on every call.
    return type(cfg_s)(**out)
