"""Qwen2-MoE and Qwen3-MoE: the Qwen2 / Qwen3 block with a sparse MoE FFN in most layers.

A layer is sparse (router ``mlp.gate`` (E, D) picking top-k of E SwiGLU experts sized by
``moe_intermediate_size``) unless it is listed in ``mlp_only_layers`` or its index misses
``decoder_sparse_step`` ((i + 1) % step != 0) or the model has no experts; the other layers have
the dense Qwen MLP sized by ``intermediate_size`` (transformers' ``Qwen3MoeDecoderLayer``). With a
new layer order the config is rewritten as an explicit ``mlp_only_layers`` with step 1
(``layer_steps``). Qwen2-MoE adds a shared expert (``shared_expert_intermediate_size``) with a
sigmoid gate ``mlp.shared_expert_gate`` (1, D) read like a router; Qwen3-MoE normalises q and k
per head (``q_norm`` / ``k_norm`` over head_dim).

Two forms of the routed experts, both read and each written back as it came: on disk (Hub
checkpoints, transformers 4 saves) one tensor per expert ``mlp.experts.{e}.gate_proj / up_proj /
down_proj``; in memory (transformers 5 ``Qwen3MoeExperts``) ``mlp.experts.gate_up_proj`` (E, 2F, D)
and ``mlp.experts.down_proj`` (E, D, F) (conversion_mapping.py "qwen2_moe", which qwen3_moe uses).
"""
from __future__ import annotations

from ..schema import Architecture
from .common import DECODER_FIELDS, DECODER_SHAPES, LEGACY_RENAMES, decoder_attention, decoder_layouts

#: a sparse (MoE) layer; dense otherwise (transformers' Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer)
_SPARSE = "num_experts & !layer_in:mlp_only_layers & layer_step:decoder_sparse_step"
_DENSE = "!num_experts | layer_in:mlp_only_layers | !layer_step:decoder_sparse_step"
#: the per-expert (on-disk) form of layer {i}'s experts
_PER_EXPERT = "stored:layers.{i}.mlp.experts.{e}.gate_proj.weight"


def _moe_layer(attention: tuple, *, shared: bool) -> tuple:
    ffn = (
        ("layers.{i}.post_attention_layernorm.weight", "norm_weight"),
        # dense layers
        ("layers.{i}.mlp.gate_proj.weight", "up_weight", _DENSE),
        ("layers.{i}.mlp.up_proj.weight", "up_weight", _DENSE),
        ("layers.{i}.mlp.down_proj.weight", "down_weight", _DENSE),
        # sparse layers: router, experts in memory (fused, stacked) or on disk (one per expert)
        ("layers.{i}.mlp.gate.weight", "router", _SPARSE),
        ("layers.{i}.mlp.experts.gate_up_proj", "experts_gate_up", f"{_SPARSE} & !{_PER_EXPERT}"),
        ("layers.{i}.mlp.experts.down_proj", "experts_down", f"{_SPARSE} & !{_PER_EXPERT}"),
        ("layers.{i}.mlp.experts.{e}.gate_proj.weight", "expert_up_weight", f"{_SPARSE} & {_PER_EXPERT}"),
        ("layers.{i}.mlp.experts.{e}.up_proj.weight", "expert_up_weight", f"{_SPARSE} & {_PER_EXPERT}"),
        ("layers.{i}.mlp.experts.{e}.down_proj.weight", "expert_down_weight", f"{_SPARSE} & {_PER_EXPERT}"),
    )
    if shared:
        ffn += (
            ("layers.{i}.mlp.shared_expert.gate_proj.weight", "shared_up_weight", _SPARSE),
            ("layers.{i}.mlp.shared_expert.up_proj.weight", "shared_up_weight", _SPARSE),
            ("layers.{i}.mlp.shared_expert.down_proj.weight", "shared_down_weight", _SPARSE),
            ("layers.{i}.mlp.shared_expert_gate.weight", "shared_gate", _SPARSE),
        )
    return (("layers.{i}.input_layernorm.weight", "norm_weight"),) + attention + ffn


#: the config classes' defaults for fields Hub config.json files omit
_MOE_DEFAULTS = {"tie_word_embeddings": False, "decoder_sparse_step": 1, "mlp_only_layers": []}


QWEN2_MOE = Architecture(
    family="qwen2_moe",
    model_types=("qwen2_moe",),
    norm="rmsnorm",
    post_ln=False,
    explicit_head_dim=True,
    fields={**DECODER_FIELDS, "num_experts": "num_experts", "expert_ffn": "moe_intermediate_size",
            "shared_ffn": "shared_expert_intermediate_size"},
    embeddings=(("embed_tokens.weight", "embed"),),
    layer=_moe_layer(decoder_attention(qkv_bias="qkv_bias", o_bias=None), shared=True),
    final=(("norm.weight", "norm_weight"),),
    defaults={**_MOE_DEFAULTS, "qkv_bias": True, "num_experts": 60, "max_window_layers": 28,
              "use_sliding_window": False},
    shapes=DECODER_SHAPES,
    # Qwen2MoeConfig.__post_init__ when config.json has no layer_types (Qwen1.5-MoE uploads)
    layer_list_defaults={"layer_types": (
        ("sliding_attention", "use_sliding_window & !layer_step:2 & layer_below:max_window_layers"),
        ("full_attention", None))},
    layer_thresholds=("max_window_layers",),
    layer_index_lists=("mlp_only_layers",),
    layer_steps={"decoder_sparse_step": "mlp_only_layers"},
    renames=LEGACY_RENAMES,
    layouts=decoder_layouts("Qwen2Moe"),
)

QWEN3_MOE = Architecture(
    family="qwen3_moe",
    model_types=("qwen3_moe",),
    norm="rmsnorm",
    post_ln=False,
    explicit_head_dim=True,
    qk_norm="head_dim",
    fields={**DECODER_FIELDS, "num_experts": "num_experts", "expert_ffn": "moe_intermediate_size"},
    # Qwen3MoeConfig.attribute_map: config.json says num_experts, to_dict() num_local_experts
    aliases={"num_local_experts": "num_experts"},
    embeddings=(("embed_tokens.weight", "embed"),),
    layer=_moe_layer(decoder_attention(qk_norm="head_dim"), shared=False),
    final=(("norm.weight", "norm_weight"),),
    defaults={**_MOE_DEFAULTS, "attention_bias": False, "num_experts": 128},
    shapes=DECODER_SHAPES,
    layer_thresholds=("max_window_layers",),
    layer_index_lists=("mlp_only_layers",),
    layer_steps={"decoder_sparse_step": "mlp_only_layers"},
    renames=LEGACY_RENAMES,
    layouts=decoder_layouts("Qwen3Moe"),
)
