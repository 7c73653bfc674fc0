"""Qwen3, Phi-3 and GPT-NeoX: tiny checkpoints in the on-disk form of named Hub checkpoints
(tests/test_family_qwen3.py, _phi3.py, _gpt_neox.py; their checks: tests/family_checks.py).

Each ``make_*`` writes a directory whose tensor names, stored buffers, dtypes, file layout and
config.json keys are those of the named checkpoint (sizes tiny, weights random and seeded) and
returns a :class:`hub_forms.HubForm` whose reference model is that directory loaded by the
transformers class in float64 (nothing missing, nothing unexpected but known derived buffers).
Sources of the names, repeated per form:

- Qwen/Qwen3-0.6B: config.json keys (head_dim 128 != 1024 / 16, tie_word_embeddings true,
  transformers 4.51.0, bfloat16); one model.safetensors of 1433.7 MB = 751.6M bf16 values, i.e.
  the 596M parameters plus a stored ``lm_head.weight`` (151936 x 1024) although the head is tied.
- microsoft/Phi-3-mini-4k-instruct: config.json (auto_map to its remote code, sliding_window
  2047, transformers 4.40.2, bfloat16, MHA 32/32) and tensor names ``model.layers.N.self_attn.
  qkv_proj.weight``, ``mlp.gate_up_proj.weight``, untied ``lm_head.weight``; two
  ``model-0000k-of-00002.safetensors`` shards with an index. No rotary buffer (the remote code's
  inv_freq was non-persistent).
- microsoft/Phi-4-mini-instruct (model_type phi3): GQA 24/8, ``partial_rotary_factor`` 0.75,
  LongRoPE factors (rotary_dim / 2 entries), tie_word_embeddings true and no lm_head stored (3.84B
  parameters in 7.67 GB of bf16 shards: the 614.6M-value embedding counted once).
- EleutherAI/pythia-*: config.json of transformers 4.24 (``rotary_pct``, ``rotary_emb_base``,
  ``use_parallel_residual``, no ``attention_bias``, torch_dtype float16), untied ``embed_out.weight``,
  and per layer the then-persistent buffers ``attention.bias`` (uint8 tril (1, 1, P, P), as a
  pythia model.safetensors header shows it), ``attention.masked_bias`` (``torch.tensor(-1e9)``)
  and ``attention.rotary_emb.inv_freq`` (``1 / base ** (arange(0, rotary_ndims, 2) / rotary_ndims)``):
  15 tensors per block, in GPTNeoXLayer registration order. The two floating buffers are stored
  float16 like the weights here (``Module.half()`` casts floating buffers); transformers ignores
  all three on load.
- GPTNeoXForCausalLM.save_pretrained of the installed transformers 5 (``embed_out.weight`` on
  disk, ``lm_head.weight`` in memory; ``rope_parameters`` in config.json).
"""
from __future__ import annotations

import os
import re
from collections import OrderedDict

import torch

from hub_forms import (FFN, HIDDEN, LAYERS, POSITIONS, VOCAB, HubForm, _Rand, causal_lm_form, decoder_tensors, grown,
                       stored_names, write_checkpoint)

#: Derived buffers of the forms below (GPT-NeoX before transformers 4.31).
_DERIVED = re.compile(r"(^|\.)layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$")


def is_derived(name: str) -> bool:
    """``name`` is a GPT-NeoX derived buffer (``layers.N.attention.bias`` / ``masked_bias`` /
    ``rotary_emb.inv_freq``), stored before transformers 4.31."""
    return bool(_DERIVED.search(name))


def _form(name, path, cls, sd, fmt, dtype, sizes, typo, source, aliases=None):
    return causal_lm_form(name=name, path=path, model_class=cls, sd=sd, fmt=fmt, storage_dtype=dtype, sizes=sizes,
                          typo=typo, source=source, aliases=aliases, derived=is_derived)


# -- Qwen3 ------------------------------------------------------------------------------------------

QWEN3_HEAD_DIM = 16  # != HIDDEN / 4 heads (= 8): the attention width differs from the hidden size


def make_qwen3_0_6b(root: str, seed: int = 20) -> HubForm:
    """Qwen/Qwen3-0.6B: model.safetensors, bfloat16, GQA (16 / 8 there, 4 / 2 here), explicit
    head_dim twice hidden / heads, q_norm / k_norm over head_dim, tied head stored as
    ``lm_head.weight`` with the embedding's values."""
    path = os.path.join(root, "qwen3_0_6b")
    h, hd, kv, heads = HIDDEN, QWEN3_HEAD_DIM, 2, 4
    sd = decoder_tensors(_Rand(seed), heads=heads, kv_heads=kv, head_dim=hd, qk_norm=True, dtype=torch.bfloat16)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()  # stored, equal values
    write_checkpoint(path, sd, "safetensors", {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": VOCAB - 2, "eos_token_id": VOCAB - 1, "head_dim": hd, "hidden_act": "silu",
        "hidden_size": h, "initializer_range": 0.02, "intermediate_size": FFN, "max_position_embeddings": POSITIONS,
        "max_window_layers": LAYERS, "model_type": "qwen3", "num_attention_heads": heads,
        "num_hidden_layers": LAYERS, "num_key_value_heads": kv, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": VOCAB})
    from transformers import Qwen3ForCausalLM

    return _form("qwen3_0_6b", path, Qwen3ForCausalLM, sd, "safetensors", torch.bfloat16, grown(),
                 ("model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.q_nrom.weight"),
                 "Qwen/Qwen3-0.6B (config.json; 1433.7 MB model.safetensors: tied lm_head stored)",
                 aliases={"lm_head.weight": "model.embed_tokens.weight"})


# -- Phi-3 ------------------------------------------------------------------------------------------

def _phi3_tensors(r: _Rand, *, heads: int, kv: int, h: int, lm_head: bool):
    hd = h // heads
    sd = OrderedDict()
    sd["model.embed_tokens.weight"] = r.w(VOCAB, h, std=0.5)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd[p + "self_attn.o_proj.weight"] = r.w(h, heads * hd, std=0.3)
        sd[p + "self_attn.qkv_proj.weight"] = r.w((heads + 2 * kv) * hd, h, std=0.3)
        sd[p + "mlp.gate_up_proj.weight"] = r.w(2 * FFN, h, std=0.3)
        sd[p + "mlp.down_proj.weight"] = r.w(h, FFN, std=0.3)
        sd[p + "input_layernorm.weight"] = r.gain(h)
        sd[p + "post_attention_layernorm.weight"] = r.gain(h)
    sd["model.norm.weight"] = r.gain(h)
    if lm_head:
        sd["lm_head.weight"] = r.w(VOCAB, h, std=0.3)
    return OrderedDict((k, v.to(torch.bfloat16)) for k, v in sd.items())


_PHI3_TYPO = ("model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.self_attn.qkv_prj.weight")


def make_phi3_mini_4k(root: str, seed: int = 21) -> HubForm:
    """microsoft/Phi-3-mini-4k-instruct: two safetensors shards + index, bfloat16, MHA, untied
    ``lm_head.weight``, fused ``qkv_proj`` / ``gate_up_proj``; config.json as on the Hub
    (auto_map to the repository's remote code, which ``Phi3ForCausalLM`` does not need)."""
    path = os.path.join(root, "phi3_mini_4k")
    heads = 4
    sd = _phi3_tensors(_Rand(seed), heads=heads, kv=heads, h=HIDDEN, lm_head=True)
    write_checkpoint(path, sd, "sharded", {
        "_name_or_path": "Phi-3-mini-4k-instruct", "architectures": ["Phi3ForCausalLM"], "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config",
                     "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"},
        "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": VOCAB - 2, "hidden_act": "silu", "hidden_size": HIDDEN,
        "initializer_range": 0.02, "intermediate_size": FFN, "max_position_embeddings": POSITIONS,
        "model_type": "phi3", "num_attention_heads": heads, "num_hidden_layers": LAYERS, "num_key_value_heads": heads,
        "original_max_position_embeddings": POSITIONS, "pad_token_id": VOCAB - 2, "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": POSITIONS // 2 - 1,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.40.2", "use_cache": True,
        "attention_bias": False, "vocab_size": VOCAB})
    from transformers import Phi3ForCausalLM

    return _form("phi3_mini_4k", path, Phi3ForCausalLM, sd, "sharded", torch.bfloat16, grown(), _PHI3_TYPO,
                 "microsoft/Phi-3-mini-4k-instruct (config.json, shard names, transformers 4.40.2)")


def make_phi4_mini(root: str, seed: int = 22) -> HubForm:
    """microsoft/Phi-4-mini-instruct (model_type phi3): GQA (24 / 8 there, 6 / 2 here),
    ``partial_rotary_factor`` 0.75, LongRoPE, tied head not stored; two bf16 shards + index."""
    path = os.path.join(root, "phi4_mini")
    heads, kv, h = 6, 2, 48
    rotary_half = int(h // heads * 0.75) // 2
    sd = _phi3_tensors(_Rand(seed), heads=heads, kv=kv, h=h, lm_head=False)
    write_checkpoint(path, sd, "sharded", {
        "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config",
                     "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM",
                     "AutoTokenizer": "Xenova/gpt-4o"},
        "bos_token_id": VOCAB - 1, "embd_pdrop": 0.0, "eos_token_id": VOCAB - 1, "full_attn_mod": 1,
        "hidden_act": "silu", "hidden_size": h, "initializer_range": 0.02, "intermediate_size": FFN,
        "interpolate_factor": 1, "lm_head_bias": False, "max_position_embeddings": 4 * POSITIONS, "mlp_bias": False,
        "model_type": "phi3", "num_attention_heads": heads, "num_hidden_layers": LAYERS, "num_key_value_heads": kv,
        "original_max_position_embeddings": POSITIONS, "pad_token_id": VOCAB - 1, "partial_rotary_factor": 0.75,
        "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": [1.0 + 0.5 * i for i in range(rotary_half)],
                         "short_factor": [1.0 + 0.1 * i for i in range(rotary_half)], "type": "longrope"},
        "rope_theta": 10000.0, "sliding_window": 4 * POSITIONS, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.45.0", "use_cache": True, "vocab_size": VOCAB})
    from transformers import Phi3ForCausalLM

    return _form("phi4_mini", path, Phi3ForCausalLM, sd, "sharded", torch.bfloat16, grown(hidden=h), _PHI3_TYPO,
                 "microsoft/Phi-4-mini-instruct (GQA, partial rotary 0.75, LongRoPE, tied)")


# -- GPT-NeoX / Pythia ------------------------------------------------------------------------------

_NEOX_TYPO = ("gpt_neox.layers.0.attention.query_key_value.weight",
              "gpt_neox.layers.0.attention.query_key_valeu.weight")


def make_pythia(root: str, seed: int = 23) -> HubForm:
    """EleutherAI/pythia-* (transformers 4.24 conversion): model.safetensors, float16, untied
    ``embed_out.weight``, parallel residual, rotary_pct 0.25, and per layer ``attention.bias``
    (uint8 mask), ``attention.masked_bias`` and ``attention.rotary_emb.inv_freq``."""
    path = os.path.join(root, "pythia")
    r, h, heads = _Rand(seed), HIDDEN, 4
    hd = h // heads
    rotary = int(hd * 0.25)
    f = 4 * h
    mask = torch.tril(torch.ones((POSITIONS, POSITIONS), dtype=torch.uint8)).view(1, 1, POSITIONS, POSITIONS)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary, 2).float() / rotary))
    sd = OrderedDict()
    sd["gpt_neox.embed_in.weight"] = r.w(VOCAB, h, std=0.5).half()
    for i in range(LAYERS):
        p = f"gpt_neox.layers.{i}."
        sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"] = r.gain(h).half(), r.w(h).half()
        sd[p + "post_attention_layernorm.weight"] = r.gain(h).half()
        sd[p + "post_attention_layernorm.bias"] = r.w(h).half()
        sd[p + "attention.bias"] = mask.clone()
        sd[p + "attention.masked_bias"] = torch.tensor(-1e9).half()
        sd[p + "attention.rotary_emb.inv_freq"] = inv_freq.half()
        sd[p + "attention.query_key_value.weight"] = r.w(3 * h, h, std=0.3).half()
        sd[p + "attention.query_key_value.bias"] = r.w(3 * h).half()
        sd[p + "attention.dense.weight"], sd[p + "attention.dense.bias"] = r.w(h, h, std=0.3).half(), r.w(h).half()
        sd[p + "mlp.dense_h_to_4h.weight"], sd[p + "mlp.dense_h_to_4h.bias"] = r.w(f, h, std=0.3).half(), r.w(f).half()
        sd[p + "mlp.dense_4h_to_h.weight"], sd[p + "mlp.dense_4h_to_h.bias"] = r.w(h, f, std=0.3).half(), r.w(h).half()
    sd["gpt_neox.final_layer_norm.weight"], sd["gpt_neox.final_layer_norm.bias"] = r.gain(h).half(), r.w(h).half()
    sd["embed_out.weight"] = r.w(VOCAB, h, std=0.3).half()
    write_checkpoint(path, sd, "safetensors", {
        "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
        "hidden_size": h, "initializer_range": 0.02, "intermediate_size": f, "layer_norm_eps": 1e-05,
        "max_position_embeddings": POSITIONS, "model_type": "gpt_neox", "num_attention_heads": heads,
        "num_hidden_layers": LAYERS, "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
        "torch_dtype": "float16", "transformers_version": "4.24.0", "use_cache": True, "use_parallel_residual": True,
        "vocab_size": VOCAB})
    from transformers import GPTNeoXForCausalLM

    return _form("pythia", path, GPTNeoXForCausalLM, sd, "safetensors", torch.float16, grown(ffn=f), _NEOX_TYPO,
                 "EleutherAI/pythia-* (transformers 4.24 conversion; 15 tensors per block)")


def make_neox_v5_saved(root: str, seed: int = 24) -> HubForm:
    """A GPTNeoXForCausalLM saved by the installed transformers 5: sequential residual, no
    attention biases, rotary 0.5, float32; ``embed_out.weight`` on disk."""
    import transformers as tf

    path = os.path.join(root, "neox_v5_saved")
    cfg = tf.GPTNeoXConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                           intermediate_size=FFN, vocab_size=VOCAB, max_position_embeddings=POSITIONS,
                           use_parallel_residual=False, attention_bias=False, rotary_pct=0.5)
    torch.manual_seed(seed)
    model = tf.GPTNeoXForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    names = stored_names(path)
    assert "embed_out.weight" in names and "lm_head.weight" not in names, names  # the premise
    return _form("neox_v5_saved", path, tf.GPTNeoXForCausalLM, names, "safetensors", torch.float32,
                 grown(factor=3, more_layers=2), _NEOX_TYPO,
                 f"GPTNeoXForCausalLM.save_pretrained (transformers {tf.__version__})")
