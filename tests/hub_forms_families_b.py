"""Tiny checkpoints in the on-disk form of allenai/OLMo-2-0425-1B, google/gemma-2-2b and
google/gemma-3-1b-pt (tests/test_family_olmo2.py, tests/test_family_gemma.py; their checks:
tests/family_checks.py).

Each ``make_*`` writes a directory whose tensor names, dtypes, file layout and config.json keys
are those of the named Hub checkpoint (sizes tiny, weights random and seeded) and returns a
:class:`hub_forms.HubForm` whose reference model is that directory loaded by transformers in
float64 with no missing and no unexpected keys (checked on load).

What the Hub checkpoints hold (the names are the transformers classes' own; none is invented):

- allenai/OLMo-2-0425-1B: one ``model.safetensors`` (float32, 1.48B parameters = 5.9 GB),
  ``Olmo2ForCausalLM`` names with an untied ``lm_head.weight``, no pre-norms, per layer
  ``self_attn.{q,k,v,o}_proj``, ``self_attn.q_norm`` / ``k_norm`` (over the whole projection),
  ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``, ``post_feedforward_layernorm``.
  config.json fields as mirrored in a Megatron-Bridge OLMo 2 bridge test ("Mirror of
  allenai/OLMo-2-0425-1B/config.json": hidden 2048, 16 layers, 16 heads = 16 kv heads,
  intermediate 8192, rms_norm_eps 1e-6, rope_theta 500000, tie_word_embeddings false,
  torch_dtype bfloat16 although the weights are float32, no head_dim) plus the token ids of the
  OLMo 2 configs (eos 100257, pad 100277: here the last two token ids).
- google/gemma-2-2b: three float32 shards ``model-0000k-of-00003.safetensors`` + index (2.6B
  parameters = 10.5 GB), ``Gemma2ForCausalLM`` names, tied head not stored, four norms per layer.
  config.json (as a Gemma 2 loader quotes it with ``_name_or_path: google/gemma-2-2b``): no
  ``layer_types`` (written by transformers 4.44, before the field existed), ``cache_implementation: hybrid``,
  ``sliding_window`` 4096, ``query_pre_attn_scalar`` 256 = head_dim, soft-capping 50 / 30,
  head_dim 256 with 8 heads and hidden 2304 (attention width 2048 != hidden), torch_dtype float32.
- google/gemma-3-1b-pt: one bfloat16 ``model.safetensors`` (2.0 GB), ``Gemma3ForCausalLM``
  names (per layer also ``self_attn.q_norm`` / ``k_norm`` over head_dim), tied head not stored.
  config.json: the gemma-3-1b config as quoted by several repositories (4 heads, 1 kv head,
  head_dim 256, hidden 1152, ``sliding_window_pattern`` 6 and no ``layer_types``,
  ``rope_local_base_freq`` 10000, ``rope_theta`` 1e6, ``rope_scaling`` null, soft-capping null,
  torch_dtype bfloat16); the -pt upload's eos_token_id is the single id 1 (the -it one lists 1
  and 106) and its transformers_version 4.50.0.dev0.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from hub_forms import HIDDEN, POSITIONS, VOCAB, HubForm, _Rand, causal_lm_form, decoder_tensors, grown, write_checkpoint


@dataclass
class FamilyForm(HubForm):
    """A HubForm whose tolerance is given (bf16 storage with a rounding the plan reports)."""

    tol: float = 1e-6

    @property
    def tolerance(self) -> float:
        return self.tol


def _family_form(name, path, model_class, sd, fmt, dtype, layers, ffn, typo, source, tol=1e-6) -> FamilyForm:
    """The FamilyForm of a directory written below: grown to 2x hidden and FFN, one layer more."""
    return causal_lm_form(name=name, path=path, model_class=model_class, sd=sd, fmt=fmt, storage_dtype=dtype,
                          sizes=grown(ffn=ffn, layers=layers), typo=typo, source=source, form_class=FamilyForm,
                          tol=tol)


# -- OLMo 2 -----------------------------------------------------------------------------------------

OLMO2_LAYERS, OLMO2_HEADS = 2, 4


def make_olmo2_0425_1b(root: str, seed: int = 20) -> FamilyForm:
    path = os.path.join(root, "olmo2_0425_1b")
    h, f = HIDDEN, 2 * HIDDEN
    sd = decoder_tensors(_Rand(seed), layers=OLMO2_LAYERS, heads=OLMO2_HEADS, kv_heads=OLMO2_HEADS,
                         head_dim=h // OLMO2_HEADS, qk_norm=True, qk_norm_over="projection",
                         norms=("post_attention_layernorm", "post_feedforward_layernorm"), lm_head=True)
    write_checkpoint(path, sd, "safetensors", {
        "architectures": ["Olmo2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "eos_token_id": VOCAB - 2, "hidden_act": "silu", "hidden_size": h, "initializer_range": 0.02,
        "intermediate_size": f, "max_position_embeddings": POSITIONS, "model_type": "olmo2",
        "num_attention_heads": OLMO2_HEADS, "num_hidden_layers": OLMO2_LAYERS, "num_key_value_heads": OLMO2_HEADS,
        "pad_token_id": VOCAB - 1, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 500000,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.3",
        "use_cache": True, "vocab_size": VOCAB})
    from transformers import Olmo2ForCausalLM

    return _family_form("olmo2_0425_1b", path, Olmo2ForCausalLM, sd, "safetensors", torch.float32, OLMO2_LAYERS, f,
                        ("model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.q_nrom.weight"),
                        "allenai/OLMo-2-0425-1B model.safetensors (float32, untied lm_head)")


# -- Gemma 2 / Gemma 3 ------------------------------------------------------------------------------

def _gemma_tensors(r: _Rand, *, layers: int, heads: int, kv_heads: int, head_dim: int, ffn: int,
                   qk_norm: bool, dtype):
    """Gemma*ForCausalLM state-dict order; norm weights are the w of x * (1 + w) (near 0)."""
    return decoder_tensors(r, layers=layers, ffn=ffn, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                           qk_norm=qk_norm, norms=("input_layernorm", "post_attention_layernorm",
                                                   "pre_feedforward_layernorm", "post_feedforward_layernorm"),
                           norm_weight=lambda n: r.w(n, std=0.2), dtype=dtype)


GEMMA2_LAYERS, GEMMA2_HEADS, GEMMA2_KV, GEMMA2_HEAD_DIM = 2, 4, 2, 16


def make_gemma2_2b(root: str, seed: int = 21) -> FamilyForm:
    path = os.path.join(root, "gemma2_2b")
    ffn = 4 * HIDDEN
    sd = _gemma_tensors(_Rand(seed), layers=GEMMA2_LAYERS, heads=GEMMA2_HEADS, kv_heads=GEMMA2_KV,
                        head_dim=GEMMA2_HEAD_DIM, ffn=ffn, qk_norm=False, dtype=torch.float32)
    write_checkpoint(path, sd, "sharded", n_shards=3, config={
        "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
        "final_logit_softcapping": 30.0, "head_dim": GEMMA2_HEAD_DIM, "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": HIDDEN, "initializer_range": 0.02,
        "intermediate_size": ffn, "max_position_embeddings": POSITIONS, "model_type": "gemma2",
        "num_attention_heads": GEMMA2_HEADS, "num_hidden_layers": GEMMA2_LAYERS, "num_key_value_heads": GEMMA2_KV,
        "pad_token_id": 0, "query_pre_attn_scalar": GEMMA2_HEAD_DIM, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
        "sliding_window": 4, "torch_dtype": "float32", "transformers_version": "4.44.2", "use_cache": True,
        "vocab_size": VOCAB})
    from transformers import Gemma2ForCausalLM

    return _family_form(
        "gemma2_2b", path, Gemma2ForCausalLM, sd, "sharded", torch.float32, GEMMA2_LAYERS, ffn,
        ("model.layers.0.pre_feedforward_layernorm.weight", "model.layers.0.pre_feedforward_layernrom.weight"),
        "google/gemma-2-2b (3 float32 shards, tied head not stored, config.json without layer_types)")


GEMMA3_LAYERS, GEMMA3_HEADS, GEMMA3_KV, GEMMA3_HEAD_DIM = 6, 4, 1, 16
#: bf16 storage at 2x width: the embedding columns times f_S / f_T ~ 0.707 and the tied final
#: norm's (1 + w) / (2 x 0.707) are rounded once to bf16 (the plan notes say so): ~2^-8 relative
GEMMA3_BF16_TOLERANCE = 2e-2


def make_gemma3_1b_pt(root: str, seed: int = 22) -> FamilyForm:
    path = os.path.join(root, "gemma3_1b_pt")
    ffn = 6 * HIDDEN  # 6912 = 6 x 1152
    sd = _gemma_tensors(_Rand(seed), layers=GEMMA3_LAYERS, heads=GEMMA3_HEADS, kv_heads=GEMMA3_KV,
                        head_dim=GEMMA3_HEAD_DIM, ffn=ffn, qk_norm=True, dtype=torch.bfloat16)
    write_checkpoint(path, sd, "safetensors", {
        "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
        "final_logit_softcapping": None, "head_dim": GEMMA3_HEAD_DIM, "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": ffn,
        "max_position_embeddings": POSITIONS, "model_type": "gemma3_text", "num_attention_heads": GEMMA3_HEADS,
        "num_hidden_layers": GEMMA3_LAYERS, "num_key_value_heads": GEMMA3_KV, "pad_token_id": 0,
        "query_pre_attn_scalar": GEMMA3_HEAD_DIM, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 4, "sliding_window_pattern": 6,
        "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": VOCAB})
    from transformers import Gemma3ForCausalLM

    return _family_form(
        "gemma3_1b_pt", path, Gemma3ForCausalLM, sd, "safetensors", torch.bfloat16, GEMMA3_LAYERS, ffn,
        ("model.layers.0.self_attn.k_norm.weight", "model.layers.0.self_attn.k_nrom.weight"),
        "google/gemma-3-1b-pt model.safetensors (bfloat16, tied head not stored, sliding_window_pattern 6)",
        tol=GEMMA3_BF16_TOLERANCE)
