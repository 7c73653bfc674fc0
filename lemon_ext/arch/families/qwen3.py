"""Qwen3: the Llama block plus RMSNorms over head_dim on q and k (q_norm / k_norm) and an explicit
head_dim that may differ from hidden / heads."""
from __future__ import annotations

from ..schema import Architecture, Layout
from .common import LEGACY_RENAMES

QWEN3 = Architecture(
    family="qwen3",
    model_types=("qwen3",),
    norm="rmsnorm",
    post_ln=False,
    explicit_head_dim=True,
    qk_norm="head_dim",
    fields=dict(
        hidden_size="hidden_size", intermediate_size="intermediate_size",
        num_attention_heads="num_attention_heads", num_key_value_heads="num_key_value_heads",
        num_hidden_layers="num_hidden_layers", eps="rms_norm_eps", head_dim="head_dim",
    ),
    embeddings=(("embed_tokens.weight", "embed"),),
    layer=(
        ("layers.{i}.input_layernorm.weight", "norm_weight"),
        ("layers.{i}.self_attn.q_proj.weight", "q_weight"),
        ("layers.{i}.self_attn.q_proj.bias?", "q_bias", "attention_bias"),
        ("layers.{i}.self_attn.k_proj.weight", "k_weight"),
        ("layers.{i}.self_attn.k_proj.bias?", "k_bias", "attention_bias"),
        ("layers.{i}.self_attn.v_proj.weight", "kv_weight"),
        ("layers.{i}.self_attn.v_proj.bias?", "kv_bias", "attention_bias"),
        ("layers.{i}.self_attn.q_norm.weight", "qk_norm_head"),
        ("layers.{i}.self_attn.k_norm.weight", "qk_norm_head"),
        ("layers.{i}.self_attn.o_proj.weight", "o_weight"),
        ("layers.{i}.self_attn.o_proj.bias?", "o_bias", "attention_bias"),
        ("layers.{i}.post_attention_layernorm.weight", "norm_weight"),
        ("layers.{i}.mlp.gate_proj.weight", "up_weight"),
        ("layers.{i}.mlp.up_proj.weight", "up_weight"),
        ("layers.{i}.mlp.down_proj.weight", "down_weight"),
    ),
    final=(("norm.weight", "norm_weight"),),
    defaults={"tie_word_embeddings": False},  # Qwen3Config's default (Qwen3-0.6B sets it true)
    shapes={"embed_tokens.weight": ("vocab_size", "hidden"), "lm_head.weight": ("vocab_size", "hidden")},
    layer_thresholds=("max_window_layers",),
    renames=LEGACY_RENAMES,
    layouts=(
        Layout("causal_lm", "model.", head=(("lm_head.weight", "head"),),
               tied=(("lm_head.weight", "model.embed_tokens.weight"),), final_norm=("model.norm.weight",),
               architectures=("Qwen3ForCausalLM",)),
        Layout("base", "", architectures=("Qwen3Model",)),
    ),
)
