"""Tiny checkpoints in the on-disk form of the Hub's mixture-of-experts checkpoints (Mixtral,
Qwen3-MoE, Qwen2-MoE), in the style of tests/hub_forms.py (whose helpers they reuse).

On disk the experts are one tensor each; transformers 5 renames and fuses them on load
(conversion_mapping.py, installed copy: "mixtral" renames ``.block_sparse_moe.`` to ``.mlp.`` and
merges ``experts.*.w1`` / ``w3`` into ``experts.gate_up_proj`` and ``experts.*.w2`` into
``experts.down_proj``; "qwen2_moe", which qwen3_moe maps to, merges ``mlp.experts.*.gate_proj`` /
``up_proj`` / ``down_proj`` the same way). Sources of the names and config.json keys:

- mistralai/Mixtral-8x7B-v0.1: config.json (``num_local_experts`` 8, ``num_experts_per_tok`` 2,
  ``router_aux_loss_coef`` 0.02, ``torch_dtype`` bfloat16, ``transformers_version``
  4.36.0.dev0), model-000NN-of-00019.safetensors + model.safetensors.index.json, tensors
  ``model.layers.N.block_sparse_moe.gate.weight`` and
  ``model.layers.N.block_sparse_moe.experts.E.w1/w2/w3.weight`` (transformers 4.36
  ``MixtralSparseMoeBlock``: ``self.gate``, ``self.experts`` of ``MixtralBlockSparseTop2MLP`` with
  ``w1``, ``w2``, ``w3``), no rotary buffers (non-persistent since 4.31).
- Qwen/Qwen3-30B-A3B: config.json (``num_experts`` 128, ``num_experts_per_tok`` 8,
  ``moe_intermediate_size`` 768, ``head_dim`` 128 with hidden 2048 and 32 heads, ``mlp_only_layers``
  [], ``decoder_sparse_step`` 1, ``norm_topk_prob`` true, bfloat16, 4.51.0),
  model-000NN-of-00016.safetensors + index; tensors ``mlp.gate.weight``,
  ``mlp.experts.E.gate_proj/up_proj/down_proj.weight``, ``self_attn.q_norm/k_norm.weight``
  (transformers 4.51 ``Qwen3MoeSparseMoeBlock``: ``self.gate``, ``self.experts`` a ModuleList of
  ``Qwen3MoeMLP``).
- Qwen/Qwen1.5-MoE-A2.7B (model_type qwen2_moe): config.json (``num_experts`` 60,
  ``num_experts_per_tok`` 4, ``moe_intermediate_size`` 1408, ``shared_expert_intermediate_size``
  5632 = ``intermediate_size``, ``decoder_sparse_step`` 1, no ``qkv_bias`` (always on then) and no
  ``mlp_only_layers``, bfloat16, 4.39.0.dev0), sharded safetensors + index; tensors with q/k/v
  biases, ``mlp.shared_expert.gate_proj/up_proj/down_proj.weight``,
  ``mlp.shared_expert_gate.weight`` (1, hidden).
"""
from __future__ import annotations

import os

import torch

import hub_forms
from hub_forms import (HEADS, HIDDEN, KV_HEADS, LAYERS, POSITIONS, VOCAB, HubForm, _Rand, causal_lm_form,
                       decoder_tensors, grown, swiglu_tensors, write_checkpoint)

EXPERTS, TOP_K = 4, 2
EXPERT_FFN = 12  # moe_intermediate_size (Qwen) / intermediate_size (Mixtral: 24 below)


def load_reference(model_class, path: str, dtype=torch.float64):
    """from_pretrained in ``dtype`` (float64) with the eager experts (grouped_mm has no float64);
    transformers must load the directory with nothing missing, unexpected or mismatched."""
    return hub_forms.load_reference(model_class, path, dtype=dtype, tolerate=None, experts_implementation="eager")


def _moe_checkpoint(path: str, seed: int, config: dict, mlp, *, head_dim: int = HIDDEN // HEADS,
                    kv_heads: int = KV_HEADS, biases: bool = False, qk_norm: bool = False):
    """Write a bf16 MoE checkpoint in three safetensors shards + index: Llama-like layers (weights
    N(0, 0.1), untied lm_head) whose MLP is ``mlp(r, sd, layer_prefix)``; returns its state dict."""
    sd = decoder_tensors(_Rand(seed), heads=HEADS, kv_heads=kv_heads, head_dim=head_dim, biases=biases,
                         qk_norm=qk_norm, mlp=mlp, lm_head=True, std=0.1, embed_std=0.1, dtype=torch.bfloat16)
    write_checkpoint(path, sd, "sharded", config, n_shards=3)
    return sd


def _qwen_experts(r: _Rand, sd, p: str) -> None:
    """A Qwen-MoE sparse block on disk: the router ``mlp.gate`` and one SwiGLU per expert."""
    sd[p + "mlp.gate.weight"] = r.w(EXPERTS, HIDDEN, std=0.5)
    for e in range(EXPERTS):
        swiglu_tensors(r, sd, f"{p}mlp.experts.{e}.", hidden=HIDDEN, ffn=EXPERT_FFN, std=0.1)


def _causal(name, path, model_class, sd, typo, source, sizes):
    return causal_lm_form(name=name, path=path, model_class=model_class, sd=sd, fmt="sharded",
                          storage_dtype=torch.bfloat16, sizes=sizes, typo=typo, source=source, load=load_reference)


def make_mixtral_8x7b(root: str, seed: int = 21) -> HubForm:
    """mistralai/Mixtral-8x7B-v0.1: bfloat16, sharded safetensors, ``block_sparse_moe`` per-expert
    names (see the module doc)."""
    path = os.path.join(root, "mixtral_8x7b")
    ffn = 24

    def moe(r: _Rand, sd, p: str) -> None:
        sd[p + "block_sparse_moe.gate.weight"] = r.w(EXPERTS, HIDDEN, std=0.5)
        for e in range(EXPERTS):
            q = f"{p}block_sparse_moe.experts.{e}."
            sd[q + "w1.weight"], sd[q + "w2.weight"], sd[q + "w3.weight"] = \
                r.w(ffn, HIDDEN), r.w(HIDDEN, ffn), r.w(ffn, HIDDEN)

    sd = _moe_checkpoint(path, seed, mlp=moe, config={
        "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": ffn,
        "max_position_embeddings": POSITIONS, "model_type": "mixtral", "num_attention_heads": HEADS,
        "num_experts_per_tok": TOP_K, "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS,
        "num_local_experts": EXPERTS, "output_router_logits": False, "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0",
        "use_cache": True, "vocab_size": VOCAB})
    from transformers import MixtralForCausalLM

    return _causal("mixtral_8x7b", path, MixtralForCausalLM, sd,
                   ("model.layers.0.block_sparse_moe.experts.1.w3.weight",
                    "model.layers.0.block_sparse_moe.experts.1.w4.weight"),
                   "mistralai/Mixtral-8x7B-v0.1 (config.json, index, transformers 4.36 MixtralSparseMoeBlock)",
                   grown(ffn=ffn))


def make_qwen3_30b_a3b(root: str, seed: int = 22) -> HubForm:
    """Qwen/Qwen3-30B-A3B: bfloat16, sharded safetensors, per-expert ``mlp.experts.E.*`` names,
    head_dim fixed in the config (heads * head_dim != hidden), q/k norms (see the module doc)."""
    path = os.path.join(root, "qwen3_30b_a3b")
    head_dim, ffn = 16, 48
    sd = _moe_checkpoint(path, seed, mlp=_qwen_experts, head_dim=head_dim, qk_norm=True, config={
        "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643 % VOCAB, "decoder_sparse_step": 1, "eos_token_id": 151645 % VOCAB, "head_dim": head_dim,
        "hidden_act": "silu", "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": ffn,
        "max_position_embeddings": POSITIONS, "max_window_layers": LAYERS, "mlp_only_layers": [],
        "model_type": "qwen3_moe", "moe_intermediate_size": EXPERT_FFN, "norm_topk_prob": True,
        "num_attention_heads": HEADS, "num_experts": EXPERTS, "num_experts_per_tok": TOP_K,
        "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS, "output_router_logits": False,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": VOCAB})
    from transformers import Qwen3MoeForCausalLM

    return _causal("qwen3_30b_a3b", path, Qwen3MoeForCausalLM, sd,
                   ("model.layers.1.mlp.experts.2.up_proj.weight", "model.layers.1.mlp.experts.2.upproj.weight"),
                   "Qwen/Qwen3-30B-A3B (config.json, index, transformers 4.51 Qwen3MoeSparseMoeBlock)",
                   dict(hidden_size=2 * HIDDEN, moe_intermediate_size=2 * EXPERT_FFN, num_hidden_layers=LAYERS + 1))


def make_qwen15_moe_a27b(root: str, seed: int = 23) -> HubForm:
    """Qwen/Qwen1.5-MoE-A2.7B (qwen2_moe): bfloat16, sharded safetensors, q/k/v biases, shared
    expert and its gate (see the module doc)."""
    path = os.path.join(root, "qwen15_moe_a27b")
    shared = 48

    def moe(r: _Rand, sd, p: str) -> None:  # the routed experts, then the shared expert and its gate
        _qwen_experts(r, sd, p)
        swiglu_tensors(r, sd, p + "mlp.shared_expert.", hidden=HIDDEN, ffn=shared, std=0.1)
        sd[p + "mlp.shared_expert_gate.weight"] = r.w(1, HIDDEN, std=0.5)

    sd = _moe_checkpoint(path, seed, mlp=moe, kv_heads=HEADS, biases=True, config={
        "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643 % VOCAB,
        "eos_token_id": 151643 % VOCAB, "hidden_act": "silu", "hidden_size": HIDDEN, "initializer_range": 0.02,
        "intermediate_size": shared, "max_position_embeddings": POSITIONS, "max_window_layers": LAYERS,
        "model_type": "qwen2_moe", "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
        "num_key_value_heads": HEADS, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": POSITIONS,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.39.0.dev0",
        "use_cache": True, "use_sliding_window": False, "vocab_size": VOCAB, "decoder_sparse_step": 1,
        "moe_intermediate_size": EXPERT_FFN, "shared_expert_intermediate_size": shared,
        "num_experts_per_tok": TOP_K, "num_experts": EXPERTS, "norm_topk_prob": False,
        "output_router_logits": False, "router_aux_loss_coef": 0.001})
    from transformers import Qwen2MoeForCausalLM

    return _causal("qwen15_moe_a27b", path, Qwen2MoeForCausalLM, sd,
                   ("model.layers.0.mlp.shared_expert_gate.weight", "model.layers.0.mlp.shared_expert_gat.weight"),
                   "Qwen/Qwen1.5-MoE-A2.7B (config.json, index)",
                   dict(hidden_size=2 * HIDDEN, moe_intermediate_size=2 * EXPERT_FFN,
                        shared_expert_intermediate_size=2 * shared, num_hidden_layers=LAYERS + 1))


FORMS = {"mixtral_8x7b": make_mixtral_8x7b, "qwen3_30b_a3b": make_qwen3_30b_a3b,
         "qwen15_moe_a27b": make_qwen15_moe_a27b}
