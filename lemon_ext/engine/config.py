"""Config handling: read any config as a dict, and write the target config with every dependent
field rewritten (sizes, eps scaled by eta^2, per-layer lists), returned as the input's type."""
from __future__ import annotations

import copy
from collections.abc import Sequence

from ..arch import Architecture, condition_holds, evaluate
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


def default_layer_list(arch: Architecture, cfg: dict, list_field: str, num_layers: int) -> list:
    """The per-layer list a config without ``list_field`` implies (``arch.layer_list_defaults``)."""
    merged = {**arch.defaults, **cfg}
    rule = arch.layer_list_defaults[list_field]
    values = []
    for i in range(num_layers):
        value = next((v for v, when in rule if condition_holds(when, merged, arch.layouts[0], i)), None)
        if value is None:
            raise LemonError(f"internal: no default {list_field!r} entry for layer {i}")
        values.append(value)
    return values


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
    for list_field, rule in arch.layer_list_defaults.items():
        if cfg.get(list_field) is None and list(order) != list(range(src.layers)):
            # the config class would rebuild the list from its rule over the target's layer count,
            # which a new layer order breaks: write the source's implied list, remapped
            implied = default_layer_list(arch, cfg, list_field, src.layers)
            out[list_field] = [implied[s] for s in order]
    for count_field in arch.layer_thresholds:
        if cfg.get(count_field) is not None:
            # Qwen2's max_window_layers: layers below it differ from those above; keep each
            # layer's own kind by counting the target layers whose source is below it.
            out[count_field] = sum(1 for s in order if s < cfg[count_field])
    for index_field in arch.layer_index_lists:
        if cfg.get(index_field):
            # Qwen3-MoE's mlp_only_layers: a target layer is listed when its source layer is.
            out[index_field] = [t for t, s in enumerate(order) if s in set(cfg[index_field])]
    for step_field, list_field in arch.layer_steps.items():
        step = int(cfg.get(step_field) or 1)
        if step != 1 and list(order) != list(range(src.layers)):
            # every step-th layer is selected unless listed: a new layer order breaks the pattern,
            # so list each target layer whose source is not selected, and select all the others
            listed = set(cfg.get(list_field) or ())
            other = {s for s in range(src.layers) if s in listed or (s + 1) % step}
            out[list_field] = [t for t, s in enumerate(order) if s in other]
            out[step_field] = 1
    for follower in arch.hidden_followers:
        if cfg.get(follower) == src.hidden:
            out[follower] = tgt.hidden
    if isinstance(cfg_s, dict):
        return out
    out.pop("transformers_version", None)
    # The constructor, not from_dict: from_dict logs the whole config on every call.
    try:
        return type(cfg_s)(**out)
    except Exception as exc:  # transformers' own validators (huggingface_hub strict dataclasses)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[-1] if lines else type(exc).__name__
        raise LemonError(f"{type(cfg_s).__name__} refuses the target config (hidden_size={tgt.hidden}, "
                         f"num_attention_heads={tgt.heads}, num_key_value_heads={tgt.kv_heads}, "
                         f"num_hidden_layers={tgt.layers}): {detail}") from None
