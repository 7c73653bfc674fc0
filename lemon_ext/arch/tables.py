"""The family tables: tensor-name templates, the role of each tensor, and the config semantics.

Adding a family is adding a table here (and its tests); the vocabulary (roles, axis rules,
conditions, derived buffers, renames) is in ``schema.py`` and ``roles.py``. Tensors are mapped by
role, never by shape (two roles can share a shape). Post-LN depth: ``post_ln_positions`` tags the
norms after attention (``ln_attn``) and at the block output (``ln_out``).
"""
from __future__ import annotations

from .schema import Architecture, Layout

#: Renames transformers applies to every checkpoint it loads (its "legacy" conversion mapping).
LEGACY_RENAMES = ((r"LayerNorm\.gamma", "LayerNorm.weight"), (r"LayerNorm\.beta", "LayerNorm.bias"))

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
    shapes={"embed_tokens.weight": ("vocab_size", "hidden"), "lm_head.weight": ("vocab_size", "hidden")},
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

_BERT_POOLER = "layout=base|layout=sequence_classification"  # the classes built with a pooler

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
    final=(("pooler.dense.weight?", "pooler_weight", _BERT_POOLER),
           ("pooler.dense.bias?", "pooler_bias", _BERT_POOLER)),
    defaults={"tie_word_embeddings": True, "type_vocab_size": 2, "vocab_size": 30522,
              "max_position_embeddings": 512},  # BertConfig's defaults
    shapes={
        "embeddings.word_embeddings.weight": ("vocab_size", "hidden"),
        "embeddings.position_embeddings.weight": ("max_position_embeddings", "hidden"),
        "embeddings.token_type_embeddings.weight": ("type_vocab_size", "hidden"),
        "cls.predictions.decoder.weight": ("vocab_size", "hidden"),
        "cls.predictions.decoder.bias": ("vocab_size",),
        "cls.predictions.bias": ("vocab_size",),
        "cls.seq_relationship.weight": (2, "hidden"),
        "cls.seq_relationship.bias": (2,),
        "classifier.weight": ("num_labels", "hidden"),
        "classifier.bias": ("num_labels",),
    },
    derived={
        # BertEmbeddings' arange / zeros buffers: persistent in transformers < 4.31 (every
        # bert-base-* and sentence-transformers upload of that era has embeddings.position_ids).
        "embeddings.position_ids": "position index buffer (an arange, rebuilt)",
        "embeddings.token_type_ids": "token type buffer (zeros, rebuilt)",
    },
    renames=LEGACY_RENAMES,  # bert-base-uncased's pytorch_model.bin stores LayerNorm.gamma / .beta
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
            # BertForPreTraining's next-sentence head (bert-base-uncased stores it; transformers'
            # BertForMaskedLM ignores it on load).
            ("cls.seq_relationship.weight?", "pooled_head", "never"),
            ("cls.seq_relationship.bias?", "keep", "never"),
        ), tied=(("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),),
            final_norm=("cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias"),
            architectures=("BertForMaskedLM", "BertForPreTraining")),
        Layout("sequence_classification", "bert.", head=(("classifier.weight", "pooled_head"), ("classifier.bias", "keep")),
               architectures=("BertForSequenceClassification",)),
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
        ("embeddings.mask_token?", "embed", "never"),
        ("embeddings.position_embeddings", "embed"),
        ("embeddings.patch_embeddings.projection.weight", "embed_conv"),
        ("embeddings.patch_embeddings.projection.bias", "embed_bias"),
    ),
    layer=(
        ("layers.{i}.layernorm_before.weight", "norm_weight"),
        ("layers.{i}.layernorm_before.bias", "norm_bias"),
        ("layers.{i}.attention.q_proj.weight", "q_weight"),
        ("layers.{i}.attention.q_proj.bias?", "q_bias", "qkv_bias"),
        ("layers.{i}.attention.k_proj.weight", "kv_weight"),
        ("layers.{i}.attention.k_proj.bias?", "kv_bias", "qkv_bias"),
        ("layers.{i}.attention.v_proj.weight", "kv_weight"),
        ("layers.{i}.attention.v_proj.bias?", "kv_bias", "qkv_bias"),
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
        ("pooler.dense.weight?", "pooler_weight", "layout=base"),
        ("pooler.dense.bias?", "pooler_bias", "layout=base"),
    ),
    defaults={"qkv_bias": True, "num_channels": 3, "image_size": 224, "patch_size": 16},  # ViTConfig's defaults
    shapes={
        "embeddings.cls_token": (1, 1, "hidden"),
        "embeddings.mask_token": (1, 1, "hidden"),
        "embeddings.position_embeddings": (1, "(image_size // patch_size) ** 2 + 1", "hidden"),
        "embeddings.patch_embeddings.projection.weight": ("hidden", "num_channels", "patch_size", "patch_size"),
        "classifier.weight": ("num_labels", "hidden"),
        "classifier.bias": ("num_labels",),
    },
    hidden_followers=("pooler_output_size",),
    # The pre-v5 names every ViT checkpoint on the Hub has (and transformers 5's save_pretrained
    # still writes): transformers' conversion mapping for ViT, applied in this order.
    renames=(
        (r"encoder\.layer\.", "layers."),
        (r"attention\.query", "q_proj"),
        (r"attention\.key", "k_proj"),
        (r"attention\.value", "v_proj"),
        (r"attention\.output\.dense", "attention.o_proj"),
        (r"intermediate\.dense", "mlp.fc1"),
        (r"output\.dense", "mlp.fc2"),
    ) + LEGACY_RENAMES,
    layouts=(
        Layout("image_classification", "vit.", head=(("classifier.weight", "head"), ("classifier.bias", "keep")),
               architectures=("ViTForImageClassification",)),
        Layout("base", "", architectures=("ViTModel",)),
    ),
)

ARCHITECTURES = (LLAMA, GPT2, BERT, VIT)
