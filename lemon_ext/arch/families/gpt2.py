"""GPT-2: Pre-LN LayerNorm (stream V_avg), Conv1D weights stored (in, out), fused c_attn."""
from __future__ import annotations

from ..schema import Architecture, Layout
from .common import LEGACY_RENAMES

GPT2 = Architecture(
    family="gpt2",
    model_types=("gpt2",),
    norm="layernorm",
    post_ln=False,
    conv1d=True,
    fields=dict(
        hidden_size="n_embd", intermediate_size="n_inner", num_attention_heads="n_head",
        num_hidden_layers="n_layer", eps="layer_norm_epsilon",
    ),
    defaults={"tie_word_embeddings": True, "n_inner": None, "n_positions": 1024, "vocab_size": 50257},  # GPT2Config's
    ffn_default="4 * hidden",  # n_inner null: 4 * n_embd
    shapes={"wte.weight": ("vocab_size", "hidden"), "wpe.weight": ("n_positions", "hidden"),
            "lm_head.weight": ("vocab_size", "hidden")},
    refusals={"scale_attn_by_inverse_layer_idx": (
        "depth", "makes attention depend on the layer index: depth growth would change the function")},
    derived={
        # GPT2Attention's causal mask and masking constant: persistent buffers in the original
        # openai-community/gpt2 files (transformers lists them in _keys_to_ignore_on_load_unexpected).
        "h.{i}.attn.bias": "causal mask buffer (rebuilt from n_positions)",
        "h.{i}.attn.masked_bias": "attention masking constant buffer",
    },
    renames=LEGACY_RENAMES,
    embeddings=(("wte.weight", "embed"), ("wpe.weight", "embed")),
    layer=(
        ("h.{i}.ln_1.weight", "norm_weight"),
        ("h.{i}.ln_1.bias", "norm_bias"),
        ("h.{i}.attn.c_attn.weight", "qkv_weight"),
        ("h.{i}.attn.c_attn.bias", "qkv_bias"),
        ("h.{i}.attn.c_proj.weight", "o_weight"),
        ("h.{i}.attn.c_proj.bias", "o_bias"),
        ("h.{i}.ln_2.weight", "norm_weight"),
        ("h.{i}.ln_2.bias", "norm_bias"),
        ("h.{i}.mlp.c_fc.weight", "up_weight"),
        ("h.{i}.mlp.c_fc.bias", "up_bias"),
        ("h.{i}.mlp.c_proj.weight", "down_weight"),
        ("h.{i}.mlp.c_proj.bias", "down_bias"),
    ),
    final=(("ln_f.weight", "norm_weight"), ("ln_f.bias", "norm_bias")),
    layouts=(
        Layout("causal_lm", "transformer.", head=(("lm_head.weight", "head"),),
               tied=(("lm_head.weight", "transformer.wte.weight"),),
               final_norm=("transformer.ln_f.weight", "transformer.ln_f.bias"),
               architectures=("GPT2LMHeadModel",)),
        Layout("base", "", architectures=("GPT2Model",)),
    ),
)
