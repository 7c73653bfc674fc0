"""Llama, Mistral and Qwen2: RMSNorm (stream V_zero), SwiGLU, RoPE, GQA."""
from __future__ import annotations

from ..schema import Architecture, Layout
from .common import LEGACY_RENAMES

#: Qwen2 always has q/k/v biases; Llama and Mistral when attention_bias is set.
_QKV_BIAS = "attention_bias|model_type=qwen2"

LLAMA = Architecture(
    family="llama",
    model_types=("llama", "mistral", "qwen2"),
    norm="rmsnorm",
    post_ln=False,
    explicit_head_dim=True,
    fields=dict(
        hidden_size="hidden_size", intermediate_size="intermediate_size",
        num_attention_heads="num_attention_heads", num_key_value_heads="num_key_value_heads",
        num_hidden_layers="num_hidden_layers", eps="rms_norm_eps", head_dim="head_dim",
    ),
    embeddings=(("embed_tokens.weight", "embed"),),
    layer=(
        ("layers.{i}.input_layernorm.weight", "norm_weight"),
        ("layers.{i}.self_attn.q_proj.weight", "q_weight"),
        ("layers.{i}.self_attn.q_proj.bias?", "q_bias", _QKV_BIAS),
        ("layers.{i}.self_attn.k_proj.weight", "kv_weight"),
        ("layers.{i}.self_attn.k_proj.bias?", "kv_bias", _QKV_BIAS),
        ("layers.{i}.self_attn.v_proj.weight", "kv_weight"),
        ("layers.{i}.self_attn.v_proj.bias?", "kv_bias", _QKV_BIAS),
        ("layers.{i}.self_attn.o_proj.weight", "o_weight"),
        ("layers.{i}.self_attn.o_proj.bias?", "o_bias", "attention_bias"),
        ("layers.{i}.post_attention_layernorm.weight", "norm_weight"),
        ("layers.{i}.mlp.gate_proj.weight", "up_weight"),
        ("layers.{i}.mlp.gate_proj.bias?", "up_bias", "mlp_bias"),
        ("layers.{i}.mlp.up_proj.weight", "up_weight"),
        ("layers.{i}.mlp.up_proj.bias?", "up_bias", "mlp_bias"),
        ("layers.{i}.mlp.down_proj.weight", "down_weight"),
        ("layers.{i}.mlp.down_proj.bias?", "down_bias", "mlp_bias"),
    ),
    final=(("norm.weight", "norm_weight"),),
    defaults={"tie_word_embeddings": False},  # the Llama, Mistral and Qwen2 config classes agree
    shapes={"embed_tokens.weight": ("vocab_size", "hidden"), "lm_head.weight": ("vocab_size", "hidden"),
            "score.weight": ("num_labels", "hidden")},
    layer_thresholds=("max_window_layers",),  # Qwen2: layers >= max_window_layers use sliding windows
    derived={
        # RoPE frequencies: persistent buffers in transformers < 4.31 (Llama 2, Mistral 7B v0.1,
        # TinyLlama uploads), one per layer, and a model-level one in some later saves.
        "layers.{i}.self_attn.rotary_emb.inv_freq": "RoPE inverse frequencies (rebuilt from rope_theta)",
        "rotary_emb.inv_freq": "RoPE inverse frequencies (rebuilt from rope_theta)",
    },
    renames=LEGACY_RENAMES,
    layouts=(
        Layout("causal_lm", "model.", head=(("lm_head.weight", "head"),),
               tied=(("lm_head.weight", "model.embed_tokens.weight"),), final_norm=("model.norm.weight",),
               architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")),
        Layout("sequence_classification", "model.", head=(("score.weight", "head"),),
               architectures=("LlamaForSequenceClassification", "MistralForSequenceClassification",
                              "Qwen2ForSequenceClassification")),
        Layout("base", "", architectures=("LlamaModel", "MistralModel", "Qwen2Model")),
    ),
)
