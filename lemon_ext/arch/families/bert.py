"""BERT: Post-LN LayerNorm (stream V_avg), token types, MLM / pre-training / classifier heads."""
from __future__ import annotations

from ..schema import Architecture, Layout
from .common import LEGACY_RENAMES

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
