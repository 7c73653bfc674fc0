"""GPT-NeoX / Pythia (model_type gpt_neox): Pre-LN LayerNorm with biases (stream V_avg).

``query_key_value`` is interleaved per head, [h0: q k v | h1: q k v | ...] (role
``qkv_interleaved_*``: whole heads of 3 * head_dim replicated). The parallel residual
(``use_parallel_residual``: x + attn(ln1(x)) + mlp(ln2(x))) and the sequential one both keep the
stream V_avg: every branch writes V_avg rows and a sum of V_avg vectors is V_avg. Partial rotary
(``rotary_pct`` / ``partial_rotary_factor``) acts inside each head: unchanged at fixed head_dim.

Spellings: the untied head is ``embed_out.weight`` on disk (EleutherAI/pythia-* and what
transformers 5 writes) and ``lm_head.weight`` in transformers 5's memory (its conversion mapping
renames ``^embed_out.`` -> ``lm_head.`` for GPTNeoXForCausalLM and reverts it on save): the table
uses ``lm_head`` and reads both; the output keeps the source's spelling. Pythia files written by
transformers < 4.31 carry per-layer derived buffers (``attention.bias`` causal mask,
``attention.masked_bias``, ``attention.rotary_emb.inv_freq``): dropped and listed.
"""
from __future__ import annotations

from ..schema import Architecture, Layout
from .common import LEGACY_RENAMES

GPT_NEOX = Architecture(
    family="gpt_neox",
    model_types=("gpt_neox",),
    norm="layernorm",
    post_ln=False,
    fields=dict(
        hidden_size="hidden_size", intermediate_size="intermediate_size",
        num_attention_heads="num_attention_heads", num_hidden_layers="num_hidden_layers", eps="layer_norm_eps",
    ),
    embeddings=(("embed_in.weight", "embed"),),
    layer=(
        ("layers.{i}.input_layernorm.weight", "norm_weight"),
        ("layers.{i}.input_layernorm.bias", "norm_bias"),
        ("layers.{i}.post_attention_layernorm.weight", "norm_weight"),
        ("layers.{i}.post_attention_layernorm.bias", "norm_bias"),
        ("layers.{i}.attention.query_key_value.weight", "qkv_interleaved_weight"),
        ("layers.{i}.attention.query_key_value.bias?", "qkv_interleaved_bias", "attention_bias"),
        ("layers.{i}.attention.dense.weight", "o_weight"),
        ("layers.{i}.attention.dense.bias?", "o_bias", "attention_bias"),
        ("layers.{i}.mlp.dense_h_to_4h.weight", "up_weight"),
        ("layers.{i}.mlp.dense_h_to_4h.bias", "up_bias"),
        ("layers.{i}.mlp.dense_4h_to_h.weight", "down_weight"),
        ("layers.{i}.mlp.dense_4h_to_h.bias", "down_bias"),
    ),
    final=(("final_layer_norm.weight", "norm_weight"), ("final_layer_norm.bias", "norm_bias")),
    # GPTNeoXConfig's defaults (Pythia's config.json has no attention_bias: biases present)
    defaults={"tie_word_embeddings": False, "attention_bias": True, "use_parallel_residual": True},
    shapes={"embed_in.weight": ("vocab_size", "hidden"), "lm_head.weight": ("vocab_size", "hidden")},
    derived={
        # GPTNeoXAttention's persistent buffers before transformers 4.31 (Pythia uploads):
        # transformers lists the first two in _keys_to_ignore_on_load_unexpected.
        "layers.{i}.attention.bias": "causal mask buffer (rebuilt from max_position_embeddings)",
        "layers.{i}.attention.masked_bias": "attention masking constant buffer",
        "layers.{i}.attention.rotary_emb.inv_freq": "RoPE inverse frequencies (rebuilt from rotary_pct, rope theta)",
    },
    # transformers 5 conversion_mapping "GPTNeoXForCausalLM": ^embed_out. -> lm_head.
    renames=((r"^embed_out\.", "lm_head."),) + LEGACY_RENAMES,
    layouts=(
        Layout("causal_lm", "gpt_neox.", head=(("lm_head.weight", "head"),),
               tied=(("lm_head.weight", "gpt_neox.embed_in.weight"),),
               final_norm=("gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias"),
               architectures=("GPTNeoXForCausalLM",)),
        Layout("base", "", architectures=("GPTNeoXModel",)),
    ),
)
