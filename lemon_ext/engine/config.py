"""Config handling: read any config as a dict, and write the target config with every dependent
field rewritten (sizes, eps scaled by eta^2, per-layer lists), returned as the input's type."""
from __future__ import annotations

import copy
from collections.abc import Sequence

from ..arch.tables import Architecture
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
    if arch.family == "gpt2" and cfg.get("n_inner") is None and tgt.ffn == 4 * tgt.hidden:
        out["n_inner"] = None
    else:
        out[f["intermediate_size"]] = tgt.ffn
    eps_field = f["eps"]
    if eps_field in out and eta != 1.0:
        out[eps_field] = float(cfg[eps_field]) * eta * eta
    if out.get("layer_types") is not None:
        out["layer_types"] = _remap_layer_list(cfg["layer_types"], order, "layer_types")
    if cfg.get("max_window_layers") is not None:
        # Qwen2: layers >= max_window_layers use sliding windows; keep each layer's own kind.
        out["max_window_layers"] = sum(1 for s in order if s < cfg["max_window_layers"])
    if arch.family == "vit" and cfg.get("pooler_output_size") == src.hidden:
        out["pooler_output_size"] = tgt.hidden
    if isinstance(cfg_s, dict):
        return out
    out.pop("transformers_version", None)
    # The constructor, not from_dict: from_dict logs the whole config on every call.
    return type(cfg_s)(**out)
