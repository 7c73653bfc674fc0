"""ViT: Pre-LN LayerNorm (stream V_avg), patch conv, CLS token, classifier."""
from __future__ import annotations

from ..schema import Architecture, Layout
from .common import LEGACY_RENAMES

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
