"""Llama, Mistral and Qwen2: RMSNorm (stream V_zero), SwiGLU, RoPE, GQA."""
from __future__ import annotations

from ..schema import Architecture, Layout
from .common import DECODER_FIELDS, LEGACY_RENAMES, ROPE_INV_FREQ, decoder_attention, swiglu

#: Qwen2 always has q/k/v biases; Llama and Mistral when attention_bias is set.
_QKV_BIAS = "attention_bias|model_type=qwen2"

LLAMA = Architecture(
    family="llama",
    model_types=("llama", "mistral", "qwen2"),
    norm="rmsnorm",
    post_ln=False,
    explicit_head_dim=True,
    fields=DECODER_FIELDS,
    embeddings=(("embed_tokens.weight", "embed"),),
    layer=(
        ("layers.{i}.input_layernorm.weight", "norm_weight"),
        *decoder_attention(qkv_bias=_QKV_BIAS),
        ("layers.{i}.post_attention_layernorm.weight", "norm_weight"),
        *swiglu(bias="mlp_bias"),
    ),
    final=(("norm.weight", "norm_weight"),),
    defaults={"tie_word_embeddings": False},  # the Llama, Mistral and Qwen2 config classes agree
    shapes={"embed_tokens.weight": ("vocab_size", "hidden"), "lm_head.weight": ("vocab_size", "hidden"),
            "score.weight": ("num_labels", "hidden")},
    layer_thresholds=("max_window_layers",),  # Qwen2: layers >= max_window_layers use sliding windows
    derived=ROPE_INV_FREQ,
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
