"""Qwen3, Phi-3 and GPT-NeoX: tiny checkpoints in the on-disk form of named Hub checkpoints, and
the checks every family test runs (tests/test_family_qwen3.py, _phi3.py, _gpt_neox.py).

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

import math
import os
import re
from collections import OrderedDict

import torch

from hub_forms import (HIDDEN, LAYERS, POSITIONS, VOCAB, HubForm, _Rand, _token_inputs, _write_json, read_tensors,
                       write_tensors)

FFN = 2 * HIDDEN

#: Derived buffers of the forms below (GPT-NeoX before transformers 4.31).
_DERIVED = re.compile(r"(^|\.)layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$")


def is_derived(name: str) -> bool:
    return bool(_DERIVED.search(name))


def relative_error(reference: torch.Tensor, value: torch.Tensor) -> float:
    return ((reference - value).abs().max() / reference.abs().max()).item()


def load_reference(model_class, path: str):
    """``from_pretrained`` in float64; transformers must find every weight and nothing unknown
    (derived buffers it is told to ignore excepted)."""
    model, info = model_class.from_pretrained(path, dtype=torch.float64, output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items()
                if v and not (k == "unexpected_keys" and all(is_derived(n) for n in v))}
    if problems:
        raise AssertionError(f"{path}: transformers does not load this fixture cleanly: {problems}")
    return model.eval(), info


def _form(name, path, cls, model, info, sd, fmt, dtype, sizes, typo, source, aliases=None):
    return HubForm(name=name, path=path, model_class=cls, model=model, storage_dtype=dtype, fmt=fmt,
                   derived=[k for k in sd if is_derived(k)], aliases=aliases or {}, sizes=sizes,
                   outputs=("logits",), make_inputs=_token_inputs(VOCAB), typo=typo, source=source, load_info=info)


# -- Qwen3 ------------------------------------------------------------------------------------------

QWEN3_HEAD_DIM = 16  # != HIDDEN / 4 heads (= 8): the attention width differs from the hidden size


def make_qwen3_0_6b(root: str, seed: int = 20) -> HubForm:
    """Qwen/Qwen3-0.6B: model.safetensors, bfloat16, GQA (16 / 8 there, 4 / 2 here), explicit
    head_dim twice hidden / heads, q_norm / k_norm over head_dim, tied head stored as
    ``lm_head.weight`` with the embedding's values."""
    path = os.path.join(root, "qwen3_0_6b")
    r, h, hd, kv, heads = _Rand(seed), HIDDEN, QWEN3_HEAD_DIM, 2, 4
    sd = OrderedDict()
    sd["model.embed_tokens.weight"] = r.w(VOCAB, h, std=0.5)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = r.w(heads * hd, h, std=0.3)
        sd[p + "self_attn.k_proj.weight"] = r.w(kv * hd, h, std=0.3)
        sd[p + "self_attn.v_proj.weight"] = r.w(kv * hd, h, std=0.3)
        sd[p + "self_attn.o_proj.weight"] = r.w(h, heads * hd, std=0.3)
        sd[p + "self_attn.q_norm.weight"] = r.gain(hd)
        sd[p + "self_attn.k_norm.weight"] = r.gain(hd)
        sd[p + "mlp.gate_proj.weight"] = r.w(FFN, h, std=0.3)
        sd[p + "mlp.up_proj.weight"] = r.w(FFN, h, std=0.3)
        sd[p + "mlp.down_proj.weight"] = r.w(h, FFN, std=0.3)
        sd[p + "input_layernorm.weight"] = r.gain(h)
        sd[p + "post_attention_layernorm.weight"] = r.gain(h)
    sd["model.norm.weight"] = r.gain(h)
    sd = OrderedDict((k, v.to(torch.bfloat16)) for k, v in sd.items())
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()  # stored, equal values
    write_tensors(path, sd, "safetensors")
    _write_json(os.path.join(path, "config.json"), {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": VOCAB - 2, "eos_token_id": VOCAB - 1, "head_dim": hd, "hidden_act": "silu",
        "hidden_size": h, "initializer_range": 0.02, "intermediate_size": FFN, "max_position_embeddings": POSITIONS,
        "max_window_layers": LAYERS, "model_type": "qwen3", "num_attention_heads": heads,
        "num_hidden_layers": LAYERS, "num_key_value_heads": kv, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": VOCAB})
    from transformers import Qwen3ForCausalLM

    model, info = load_reference(Qwen3ForCausalLM, path)
    return _form("qwen3_0_6b", path, Qwen3ForCausalLM, model, info, sd, "safetensors", torch.bfloat16,
                 dict(hidden_size=2 * h, intermediate_size=2 * FFN, num_hidden_layers=LAYERS + 1),
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
    write_tensors(path, sd, "sharded")
    _write_json(os.path.join(path, "config.json"), {
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

    model, info = load_reference(Phi3ForCausalLM, path)
    return _form("phi3_mini_4k", path, Phi3ForCausalLM, model, info, sd, "sharded", torch.bfloat16,
                 dict(hidden_size=2 * HIDDEN, intermediate_size=2 * FFN, num_hidden_layers=LAYERS + 1), _PHI3_TYPO,
                 "microsoft/Phi-3-mini-4k-instruct (config.json, shard names, transformers 4.40.2)")


def make_phi4_mini(root: str, seed: int = 22) -> HubForm:
    """microsoft/Phi-4-mini-instruct (model_type phi3): GQA (24 / 8 there, 6 / 2 here),
    ``partial_rotary_factor`` 0.75, LongRoPE, tied head not stored; two bf16 shards + index."""
    path = os.path.join(root, "phi4_mini")
    heads, kv, h = 6, 2, 48
    rotary_half = int(h // heads * 0.75) // 2
    sd = _phi3_tensors(_Rand(seed), heads=heads, kv=kv, h=h, lm_head=False)
    write_tensors(path, sd, "sharded")
    _write_json(os.path.join(path, "config.json"), {
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

    model, info = load_reference(Phi3ForCausalLM, path)
    return _form("phi4_mini", path, Phi3ForCausalLM, model, info, sd, "sharded", torch.bfloat16,
                 dict(hidden_size=2 * h, intermediate_size=2 * FFN, num_hidden_layers=LAYERS + 1), _PHI3_TYPO,
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
    write_tensors(path, sd, "safetensors")
    _write_json(os.path.join(path, "config.json"), {
        "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
        "hidden_size": h, "initializer_range": 0.02, "intermediate_size": f, "layer_norm_eps": 1e-05,
        "max_position_embeddings": POSITIONS, "model_type": "gpt_neox", "num_attention_heads": heads,
        "num_hidden_layers": LAYERS, "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
        "torch_dtype": "float16", "transformers_version": "4.24.0", "use_cache": True, "use_parallel_residual": True,
        "vocab_size": VOCAB})
    from transformers import GPTNeoXForCausalLM

    model, info = load_reference(GPTNeoXForCausalLM, path)
    return _form("pythia", path, GPTNeoXForCausalLM, model, info, sd, "safetensors", torch.float16,
                 dict(hidden_size=2 * h, intermediate_size=2 * f, num_hidden_layers=LAYERS + 1), _NEOX_TYPO,
                 "EleutherAI/pythia-* (transformers 4.24 conversion; 15 tensors per block)")


def make_neox_v5_saved(root: str, seed: int = 24) -> HubForm:
    """A GPTNeoXForCausalLM saved by the installed transformers 5: sequential residual, no
    attention biases, rotary 0.5, float32; ``embed_out.weight`` on disk."""
    import transformers as tf
    from safetensors import safe_open

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
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "embed_out.weight" in names and "lm_head.weight" not in names, names  # the premise
    ref, info = load_reference(tf.GPTNeoXForCausalLM, path)
    return _form("neox_v5_saved", path, tf.GPTNeoXForCausalLM, ref, info, {n: None for n in names}, "safetensors",
                 torch.float32, dict(hidden_size=3 * HIDDEN, intermediate_size=3 * FFN, num_hidden_layers=LAYERS + 2),
                 _NEOX_TYPO, f"GPTNeoXForCausalLM.save_pretrained (transformers {tf.__version__})")


# -- checks shared by the family tests -------------------------------------------------------------

def build(model_class, config, dtype=torch.float64, seed=0, scale=0.05):
    """A random transformers model with every parameter perturbed (norms off 1 / 0)."""
    torch.manual_seed(seed)
    model = model_class(config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def tokens(vocab: int, seed=1, batch=2, length=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def lossless_error(source, target, vocab: int) -> float:
    x = tokens(vocab)
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # left padding in the second row
    with torch.no_grad():
        return max(relative_error(source(x).logits, target(x).logits),
                   relative_error(source(x, attention_mask=mask).logits, target(x, attention_mask=mask).logits))


def group_sums(spec, split_tensor, unsplit_tensor):
    """Sums of the stored parts of every split group (fp32, fp64 for fp64 tensors), and the stored
    unsplit values (as tests/test_engine_storage.py): (R_T, C_S) each, over the split columns."""
    t = split_tensor.reshape(-1, split_tensor.shape[-1]) if not spec.transpose else split_tensor.t()
    u = unsplit_tensor.reshape(t.shape) if not spec.transpose else unsplit_tensor.t()
    if spec.view == "vector":
        t, u = t.reshape(1, -1), u.reshape(1, -1)
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32  # fp32 sums for 16-bit parts
    cols = spec.col_map
    valid = cols >= 0
    src_cols = cols[valid]
    sums = torch.zeros(t.shape[0], int(src_cols.max()) + 1, dtype=acc)
    sums.index_add_(1, src_cols, t[:, valid].to(acc))
    expected = torch.zeros_like(sums)
    expected[:, src_cols] = u[:, valid].to(acc)
    return sums, expected


def check_bf16_splits(cfg, sd_bf16: dict, sizes: dict, min_checked: int = 8) -> int:
    """Every split group of every tensor sums in fp32 exactly to the stored (bf16) target value
    (new layers' cancelling groups to zero). Returns the number of split tensors checked."""
    import lemon_ext

    plan = lemon_ext.plan_expansion(cfg, source_shapes={k: v.shape for k, v in sd_bf16.items()}, **sizes)
    checked = 0
    for spec in plan.specs:
        if spec.split == "none":
            continue
        src = sd_bf16[spec.source]
        split = spec.execute(src, seed=3)
        assert split.dtype == torch.bfloat16, spec.name
        unsplit = spec.execute(src, seed=3, split="none")
        sums, expected = group_sums(spec, split, unsplit)
        if spec.split == "cancel":
            expected = torch.zeros_like(expected)
        assert torch.equal(sums, expected), spec.name
        checked += 1
    assert checked >= min_checked, checked
    return checked


def assert_rows_distinct(weight: torch.Tensor, name: str) -> float:
    """No two rows (neurons) identical; returns the smallest max-abs difference between rows."""
    w = weight.detach().double().reshape(weight.shape[0], -1)
    d = torch.cdist(w, w, p=float("inf"))
    d.fill_diagonal_(math.inf)
    smallest = float(d.min())
    assert smallest > 0, f"{name}: two identical rows"
    return smallest


def check_backends(cfg, sd_bf16: dict, sizes: dict) -> bool:
    """backend="cpu" equals backend="torch" bit for bit on a bf16 source (False: no C++ build)."""
    import lemon_ext

    if lemon_ext.backends().get("cpu") is not None:
        return False
    ref, _ = lemon_ext.expand_state_dict(sd_bf16, cfg, backend="torch", seed=5, **sizes)
    out, _ = lemon_ext.expand_state_dict(sd_bf16, cfg, backend="cpu", seed=5, **sizes)
    assert ref.keys() == out.keys()
    for k in ref:
        assert ref[k].dtype == out[k].dtype == torch.bfloat16, k
        assert torch.equal(ref[k].view(torch.int16), out[k].view(torch.int16)), k
    return True


def check_triton_one_tensor(spec, source: torch.Tensor) -> bool:
    """One small spec through the Triton backend (interpreter on CPU): within 1 ulp of torch."""
    import lemon_ext

    if lemon_ext.backends().get("triton") is not None:
        return False
    ref = spec.execute(source, seed=5, backend="torch")
    out = spec.execute(source, seed=5, backend="triton")
    ulp = torch.finfo(ref.dtype).eps * ref.float().abs().clamp_min(torch.finfo(ref.dtype).tiny)
    assert ((out.float() - ref.float()).abs() <= ulp).all(), spec.name
    return True


def check_optimizer_state(model_s, sizes: dict, vocab: int, seed: int = 4) -> dict:
    """Two AdamW steps on the source, expand model and optimizer; returns per-check numbers.

    The grown moments follow the weights: in every split tensor the target's exp_avg summed over
    each split group equals the source's exp_avg at the mapped row (times the row factor), as the
    weights do; every stateful source parameter's target has state of its shape; one more step
    on the target runs and stays finite."""
    import lemon_ext
    from lemon_ext.optim_state import expand_optimizer_state

    model_s.train()
    opt = torch.optim.AdamW(model_s.parameters(), lr=1e-3)
    for i in range(2):
        x = tokens(vocab, seed=10 + i)
        model_s(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model_s.eval()
    model_t = lemon_ext.expand_model(model_s, seed=seed, **sizes)
    opt_t = expand_optimizer_state(opt, model_s, model_t, seed=seed, **sizes)
    plan = lemon_ext.plan_expansion(model_s.config, seed=seed,
                                    source_shapes={k: v.shape for k, v in model_s.state_dict().items()}, **sizes)
    params_s = dict(model_s.named_parameters())
    params_t = dict(model_t.named_parameters(remove_duplicate=False))
    worst, checked = 0.0, 0
    for spec in plan.specs:
        p_t = params_t.get(spec.name)
        p_s = params_s.get(spec.source or "")
        if p_t is None or p_s is None or p_s not in opt.state:
            continue
        st_s, st_t = opt.state[p_s], opt_t.state[p_t]
        assert st_t["exp_avg"].shape == p_t.shape and st_t["exp_avg_sq"].shape == p_t.shape, spec.name
        assert float(st_t["step"]) == float(st_s["step"]), spec.name
        if spec.split == "none" or spec.view != "rows" or spec.transpose or len(spec.source_shape) != 2:
            continue
        ea_t = st_t["exp_avg"].double()
        sums, _ = group_sums(spec, ea_t, ea_t)  # sums over each split group
        rows = spec.row_map
        keep = rows >= 0
        want = st_s["exp_avg"].double()[rows.clamp(min=0)][:, : sums.shape[1]]
        if spec.row_factor is not None:
            want = want * spec.row_factor.unsqueeze(1)
        if spec.col_factor is not None:  # one factor for every column of these roles
            want = want * float(spec.col_factor[0])
        if spec.split == "cancel":
            want = torch.zeros_like(want)
        scale = float(st_s["exp_avg"].abs().max()) or 1.0
        err = float((sums[keep] - want[keep]).abs().max()) / scale
        worst = max(worst, err)
        checked += 1
    assert checked >= 5, checked
    assert worst <= 1e-12, worst
    model_t.train()
    x = tokens(vocab, seed=20)
    loss = model_t(x, labels=x).loss
    loss.backward()
    opt_t.step()
    assert all(torch.isfinite(p).all() for p in model_t.parameters())
    return {"moment_tensors_checked": checked, "moment_group_sum_error": worst, "loss": loss.item()}


# -- on-disk form checks (the steps of tests/test_hub_forms.py, for one form) ---------------------

def template(name: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "{i}", name)


def stored_names(path: str) -> list[str]:
    from safetensors import safe_open

    names: list[str] = []
    for fname in sorted(os.listdir(path)):
        if fname.endswith(".safetensors"):
            with safe_open(os.path.join(path, fname), "pt") as f:
                names += list(f.keys())
    return names


def check_hub_form(form: HubForm, tmp: str, seed: int = 3) -> dict:
    """expand_checkpoint on the form: loads with from_pretrained with empty loading info,
    reproduces the source's outputs, keeps its spelling, drops (and reports) exactly its derived
    buffers, equals expand_state_dict on the files' tensors byte for byte, and a misspelled
    tensor is refused by name. Returns {"error": max relative error, "dropped": [...]}."""
    import json

    from lemon_ext import LemonError
    from lemon_ext.checkpoint import expand_checkpoint
    from lemon_ext.engine import expand_state_dict

    dst = os.path.join(tmp, form.name + "_out")
    report = expand_checkpoint(form.path, dst, seed=seed, progress=False, **form.sizes)
    assert report["plan_summary"]["hidden"][1] == form.sizes["hidden_size"]
    model_t, info = form.model_class.from_pretrained(dst, dtype=torch.float64, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    model_t.eval()
    errors = []
    with torch.no_grad():
        for s in (0, 1):
            inputs = form.make_inputs(s)
            errors.append(relative_error(form.model(**inputs).logits, model_t(**inputs).logits))
    with open(os.path.join(dst, "lemon_expansion.json")) as f:
        dropped = [d["name"] for d in json.load(f)["dropped_tensors"]]
    src_names = stored_names(form.path)
    assert sorted(dropped) == sorted(form.derived), dropped
    # planned from config.json alone (no names), the same tensors are expected, in table spelling
    from lemon_ext import plan_expansion
    from lemon_ext.arch import SourceSpelling, find_architecture

    spelling = SourceSpelling(find_architecture(form.config), src_names)
    stored = {spelling.canonical[n]: n for n in src_names if n in spelling.canonical and n not in form.aliases}
    expected = plan_expansion(form.config, **form.sizes).expected_source_shapes()
    assert set(expected) == set(stored), sorted(set(expected) ^ set(stored))
    sources = read_tensors(form.path)
    assert all(tuple(sources[stored[n]].shape) == tuple(shape) for n, shape in expected.items())
    out_names = stored_names(dst)
    assert {template(n) for n in out_names} == {template(n) for n in src_names if n not in dropped}
    assert not [n for n in out_names if is_derived(n)]
    sd_t, _ = expand_state_dict(read_tensors(form.path), form.config, seed=seed, **form.sizes)
    got = read_tensors(dst)
    assert sorted(got) == sorted(sd_t)
    for k, v in sd_t.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k].view(torch.uint8), v.contiguous().view(torch.uint8)), k
    from hub_forms import rewrite_with

    old, new = form.typo
    bad = rewrite_with(form, os.path.join(tmp, form.name + "_typo"), {old: new})
    for call in (lambda: expand_checkpoint(bad, os.path.join(tmp, form.name + "_typo_out"), seed=seed,
                                           progress=False, **form.sizes),
                 lambda: expand_state_dict(read_tensors(bad), form.config, seed=seed, **form.sizes)):
        try:
            call()
        except LemonError as e:
            assert new in str(e), str(e)
        else:
            raise AssertionError(f"{form.name}: misspelled {new!r} was accepted")
    assert not os.path.exists(os.path.join(tmp, form.name + "_typo_out"))
    return {"error": max(errors), "dropped": dropped, "model_t": model_t, "dst": dst}
