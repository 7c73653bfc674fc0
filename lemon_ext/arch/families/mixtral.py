"""Mixtral: the Mistral block (RMSNorm, stream V_zero, GQA, RoPE) with a sparse MoE FFN: a router
(E, D) picking top-k of E SwiGLU experts, each expert sized by ``intermediate_size``.

Two forms of the experts, both read and each written back as it came:
- on disk (mistralai/Mixtral-8x7B-v0.1 and every transformers 4 save): one tensor per expert under
  ``block_sparse_moe``: ``experts.{e}.w1`` (gate), ``w3`` (up), ``w2`` (down) and ``gate`` (the
  router); transformers 5 renames ``.block_sparse_moe.`` to ``.mlp.`` and fuses the experts on load
  (conversion_mapping.py "mixtral": MergeModulelist + Concatenate);
- in memory (transformers 5 ``MixtralExperts``): ``mlp.experts.gate_up_proj`` (E, 2F, D) = per
  expert [w1 | w3] and ``mlp.experts.down_proj`` (E, D, F), router ``mlp.gate.weight``.
The per-expert form is chosen where the checkpoint stores it (``stored:``), the fused one
otherwise (a model's state_dict, or a plan from the config alone).
"""
from __future__ import annotations

from ..schema import Architecture
from .common import DECODER_FIELDS, DECODER_SHAPES, ROPE_INV_FREQ, decoder_attention, decoder_layouts

#: the per-expert (on-disk) form of layer {i}'s experts, in table spelling
PER_EXPERT = "stored:layers.{i}.mlp.experts.{e}.w1.weight"

MIXTRAL = Architecture(
    family="mixtral",
    model_types=("mixtral",),
    norm="rmsnorm",
    post_ln=False,
    explicit_head_dim=True,
    fields={**DECODER_FIELDS, "num_experts": "num_local_experts", "expert_ffn": "intermediate_size"},
    embeddings=(("embed_tokens.weight", "embed"),),
    layer=(
        ("layers.{i}.input_layernorm.weight", "norm_weight"),
        *decoder_attention(qkv_bias=None, o_bias=None),
        ("layers.{i}.post_attention_layernorm.weight", "norm_weight"),
        ("layers.{i}.mlp.gate.weight", "router"),
        # transformers 5 in memory: the experts fused and stacked
        ("layers.{i}.mlp.experts.gate_up_proj", "experts_gate_up", "!" + PER_EXPERT),
        ("layers.{i}.mlp.experts.down_proj", "experts_down", "!" + PER_EXPERT),
        # on disk: one tensor per expert (w1 gate, w3 up, w2 down)
        ("layers.{i}.mlp.experts.{e}.w1.weight", "expert_up_weight", PER_EXPERT),
        ("layers.{i}.mlp.experts.{e}.w3.weight", "expert_up_weight", PER_EXPERT),
        ("layers.{i}.mlp.experts.{e}.w2.weight", "expert_down_weight", PER_EXPERT),
    ),
    final=(("norm.weight", "norm_weight"),),
    defaults={"tie_word_embeddings": False, "num_local_experts": 8},  # MixtralConfig's defaults
    shapes=DECODER_SHAPES,
    derived=ROPE_INV_FREQ,
    # transformers 5 conversion_mapping.py "mixtral": WeightRenaming(".block_sparse_moe.", ".mlp.")
    renames=((r"\.block_sparse_moe\.", ".mlp."),),
    layouts=decoder_layouts("Mixtral"),
)
