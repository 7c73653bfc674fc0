"""Phi-3 (and Phi-4-mini, model_type phi3): the Llama block with fused projections.

``qkv_proj`` rows are [q heads | k heads | v heads] (unequal segments under GQA: H_q * hd,
H_kv * hd, H_kv * hd), ``gate_up_proj`` rows are [gate | up]; each segment grows like its own
unfused tensor (roles ``qkv_weight`` and ``gate_up_weight``). RMSNorm (stream V_zero), no biases,
no q/k norms. RoPE acts per head (``partial_rotary_factor``, LongRoPE factors: per head_dim,
unchanged because head_dim is kept). head_dim is hidden / heads (Phi3Config has no head_dim).
On-disk names are those of microsoft/Phi-3-mini-4k-instruct (transformers 4.40 save_pretrained).
"""
from __future__ import annotations

from ..schema import Architecture
from .common import DECODER_SHAPES, LEGACY_RENAMES, decoder_layouts

PHI3 = Architecture(
    family="phi3",
    model_types=("phi3",),
    norm="rmsnorm",
    post_ln=False,
    fields=dict(
        hidden_size="hidden_size", intermediate_size="intermediate_size",
        num_attention_heads="num_attention_heads", num_key_value_heads="num_key_value_heads",
        num_hidden_layers="num_hidden_layers", eps="rms_norm_eps",
    ),
    embeddings=(("embed_tokens.weight", "embed"),),
    layer=(
        ("layers.{i}.input_layernorm.weight", "norm_weight"),
        ("layers.{i}.self_attn.qkv_proj.weight", "qkv_weight"),
        ("layers.{i}.self_attn.o_proj.weight", "o_weight"),
        ("layers.{i}.post_attention_layernorm.weight", "norm_weight"),
        ("layers.{i}.mlp.gate_up_proj.weight", "gate_up_weight"),
        ("layers.{i}.mlp.down_proj.weight", "down_weight"),
    ),
    final=(("norm.weight", "norm_weight"),),
    defaults={"tie_word_embeddings": False},  # Phi3Config's (Phi-4-mini sets it true)
    shapes=DECODER_SHAPES,
    renames=LEGACY_RENAMES,
    layouts=decoder_layouts("Phi3"),
)
