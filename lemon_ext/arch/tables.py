"""Declarative architecture tables: tensor-name templates and the role of each tensor.

Adding an architecture is adding a table. Tensors are mapped by role, never by shape (two roles can
share a shape). ``{i}`` in a layer template is the layer index. A name ending in ``?`` is
optional (present in some checkpoints, e.g. biases switched off by a config flag).

Roles (rules in ../shared/LEMON_SPEC.md sections 2-6; axis rules in lemon_ext/engine/axes.py):
    embed            (N, D)   rows kept, hidden columns take the stream type (V_avg / V_zero)
    embed_conv       (D, ...) patch conv: out channels take the stream type
    embed_bias       (D,)     stream type
    norm_weight      (D,)     eta * V_circ(gamma)
    norm_bias        (D,)     V_zero(beta)
    q_weight/q_bias  rows replicate query heads, columns fan-in split of the stream
    kv_weight/kv_bias rows replicate key/value heads
    qkv_weight/qkv_bias  fused [q|k|v] rows, segment by segment (GPT-2 c_attn)
    o_weight/o_bias  rows write the stream, columns split per replicated head (zero in new layers)
    up_weight/up_bias rows replicate FFN neurons (gate and up), columns fan-in split
    down_weight/down_bias rows write the stream, columns split per neuron group (zero in new layers)
    head/head_bias   (N, D) untied LM head / classifier: columns fan-in split; bias kept
    pooler_weight/pooler_bias rows replicate hidden units (pooler output is V_circ), columns split
    writer_weight/writer_bias rows write a stream that feeds a LayerNorm (BERT MLM transform)
    keep             copied unchanged
Layer-norm positions for the Post-LN depth rule: ``ln_attn`` (after attention), ``ln_out``
(block output) are the ``norm_*`` roles tagged in ``post_ln_positions``.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Layout:
    """One model class's tensor naming: a prefix for the backbone plus head tensors."""

    name: str  # e.g. "causal_lm"
    prefix: str  # backbone prefix, e.g. "model."
    head: tuple[tuple[str, str], ...] = ()  # (name, role) outside the backbone
    tied: tuple[tuple[str, str], ...] = ()  # (tied name, name it copies) when tie flag is set
    final_norm: tuple[str, ...] = ()  # norms feeding a tied head (scaled by 1/k)
    architectures: tuple[str, ...] = ()  # config.architectures values that select this layout


@dataclass(frozen=True)
class Architecture:
    """Tensor table and config field names of one model family."""

    family: str
    model_types: tuple[str, ...]
    norm: str  # "layernorm" (stream V_avg) or "rmsnorm" (stream V_zero)
    post_ln: bool  # Post-LN blocks (BERT): depth by the LayerNorm-chain rule
    fields: dict[str, str]  # generic name -> config field
    embeddings: tuple[tuple[str, str], ...]
    layer: tuple[tuple[str, str], ...]
    final: tuple[tuple[str, str], ...]
    layouts: tuple[Layout, ...]
    conv1d: bool = False  # weights stored (in, out) (GPT-2 Conv1D)
    post_ln_positions: dict[str, str] = field(default_factory=dict)  # template -> ln_attn/ln_out
    explicit_head_dim: bool = False  # config may fix head_dim independently of hidden_size
    tie_field: str = "tie_word_embeddings"


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
        ("layers.{i}.self_attn.q_proj.bias?", "q_bias"),
        ("layers.{i}.self_attn.k_proj.weight", "kv_weight"),
        ("layers.{i}.self_attn.k_proj.bias?", "kv_bias"),
        ("layers.{i}.self_attn.v_proj.weight", "kv_weight"),
        ("layers.{i}.self_attn.v_proj.bias?", "kv_bias"),
        ("layers.{i}.self_attn.o_proj.weight", "o_weight"),
        ("layers.{i}.self_attn.o_proj.bias?", "o_bias"),
        ("layers.{i}.post_attention_layernorm.weight", "norm_weight"),
        ("layers.{i}.mlp.gate_proj.weight", "up_weight"),
        ("layers.{i}.mlp.gate_proj.bias?", "up_bias"),
        ("layers.{i}.mlp.up_proj.weight", "up_weight"),
        ("layers.{i}.mlp.up_proj.bias?", "up_bias"),
        ("layers.{i}.mlp.down_proj.weight", "down_weight"),
        ("layers.{i}.mlp.down_proj.bias?", "down_bias"),
    ),
    final=(("norm.weight", "norm_weight"),),
    layouts=(
        Layout("causal_lm", "model.", head=(("lm_head.weight", "head"),),
               tied=(("lm_head.weight", "model.embed_tokens.weight"),), final_norm=("model.norm.weight",),
               architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")),
        Layout("base", "", architectures=("LlamaModel", "MistralModel", "Qwen2Model")),
    ),
)

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

BERT = Architecture(
    family="bert",
    model_types=("bert",),
    norm="layernorm",
    post_ln=True,
    fields=dict(
        hidden_size="hidden_size", intermediate_size="intermediate_size",
        num_attention_heads="num_attention_heads", num_hidden_layers="num_hidden_layers",
        eps="layer_norm_eps",
    ),
    embeddings=(
        ("embeddings.word_embeddings.weight", "embed"),
        ("embeddings.position_embeddings.weight", "embed"),
        ("embeddings.token_type_embeddings.weight?", "embed"),
        ("embeddings.LayerNorm.weight", "norm_weight"),
        ("embeddings.LayerNorm.bias", "norm_bias"),
    ),
    layer=(
        ("encoder.layer.{i}.attention.self.query.weight", "q_weight"),
        ("encoder.layer.{i}.attention.self.query.bias", "q_bias"),
        ("encoder.layer.{i}.attention.self.key.weight", "kv_weight"),
        ("encoder.layer.{i}.attention.self.key.bias", "kv_bias"),
        ("encoder.layer.{i}.attention.self.value.weight", "kv_weight"),
        ("encoder.layer.{i}.attention.self.value.bias", "kv_bias"),
        ("encoder.layer.{i}.attention.output.dense.weight", "o_weight"),
        ("encoder.layer.{i}.attention.output.dense.bias", "o_bias"),
        ("encoder.layer.{i}.attention.output.LayerNorm.weight", "norm_weight"),
        ("encoder.layer.{i}.attention.output.LayerNorm.bias", "norm_bias"),
        ("encoder.layer.{i}.intermediate.dense.weight", "up_weight"),
        ("encoder.layer.{i}.intermediate.dense.bias", "up_bias"),
        ("encoder.layer.{i}.output.dense.weight", "down_weight"),
        ("encoder.layer.{i}.output.dense.bias", "down_bias"),
        ("encoder.layer.{i}.output.LayerNorm.weight", "norm_weight"),
        ("encoder.layer.{i}.output.LayerNorm.bias", "norm_bias"),
    ),
    final=(("pooler.dense.weight?", "pooler_weight"), ("pooler.dense.bias?", "pooler_bias")),
    post_ln_positions={
        "encoder.layer.{i}.attention.output.LayerNorm.weight": "ln_attn",
        "encoder.layer.{i}.attention.output.LayerNorm.bias": "ln_attn",
        "encoder.layer.{i}.output.LayerNorm.weight": "ln_out",
        "encoder.layer.{i}.output.LayerNorm.bias": "ln_out",
    },
    layouts=(
        Layout("masked_lm", "bert.", head=(
            ("cls.predictions.transform.dense.weight", "writer_weight"),
            ("cls.predictions.transform.dense.bias", "writer_bias"),
            ("cls.predictions.transform.LayerNorm.weight", "norm_weight"),
            ("cls.predictions.transform.LayerNorm.bias", "norm_bias"),
            ("cls.predictions.decoder.weight", "head"),
            ("cls.predictions.decoder.bias?", "keep"),
            ("cls.predictions.bias", "keep"),
        ), tied=(("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),),
            final_norm=("cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias"),
            architectures=("BertForMaskedLM",)),
        Layout("base", "", architectures=("BertModel",)),
    ),
)

VIT = Architecture(
    family="vit",
    model_types=("vit",),
    norm="layernorm",
    post_ln=False,
    fields=dict(
        hidden_size="hidden_size", intermediate_size="intermediate_size",
        num_attention_heads="num_attention_heads", num_hidden_layers="num_hidden_layers",
        eps="layer_norm_eps",
    ),
    embeddings=(
        ("embeddings.cls_token", "embed"),
        ("embeddings.mask_token?", "embed"),
        ("embeddings.position_embeddings", "embed"),
        ("embeddings.patch_embeddings.projection.weight", "embed_conv"),
        ("embeddings.patch_embeddings.projection.bias", "embed_bias"),
    ),
    layer=(
        ("layers.{i}.layernorm_before.weight", "norm_weight"),
        ("layers.{i}.layernorm_before.bias", "norm_bias"),
        ("layers.{i}.attention.q_proj.weight", "q_weight"),
        ("layers.{i}.attention.q_proj.bias?", "q_bias"),
        ("layers.{i}.attention.k_proj.weight", "kv_weight"),
        ("layers.{i}.attention.k_proj.bias?", "kv_bias"),
        ("layers.{i}.attention.v_proj.weight", "kv_weight"),
        ("layers.{i}.attention.v_proj.bias?", "kv_bias"),
        ("layers.{i}.attention.o_proj.weight", "o_weight"),
        ("layers.{i}.attention.o_proj.bias", "o_bias"),
        ("layers.{i}.layernorm_after.weight", "norm_weight"),
        ("layers.{i}.layernorm_after.bias", "norm_bias"),
        ("layers.{i}.mlp.fc1.weight", "up_weight"),
        ("layers.{i}.mlp.fc1.bias", "up_bias"),
        ("layers.{i}.mlp.fc2.weight", "down_weight"),
        ("layers.{i}.mlp.fc2.bias", "down_bias"),
    ),
    final=(
        ("layernorm.weight", "norm_weight"),
        ("layernorm.bias", "norm_bias"),
        ("pooler.dense.weight?", "pooler_weight"),
        ("pooler.dense.bias?", "pooler_bias"),
    ),
    layouts=(
        Layout("image_classification", "vit.", head=(("classifier.weight", "head"), ("classifier.bias", "keep")),
               architectures=("ViTForImageClassification",)),
        Layout("base", "", architectures=("ViTModel",)),
    ),
)

ARCHITECTURES = (LLAMA, GPT2, BERT, VIT)
