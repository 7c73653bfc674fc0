"""Tiny checkpoints in the on-disk form of allenai/OLMo-2-0425-1B, google/gemma-2-2b and
google/gemma-3-1b-pt, plus the tiny random models and checks the family tests share
(tests/test_family_olmo2.py, tests/test_family_gemma.py).

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
from collections import OrderedDict
from dataclasses import dataclass

import torch

from hub_forms import HubForm, _load_reference, _Rand, _token_inputs, _write_json, write_tensors

VOCAB = 96
HIDDEN = 32
POSITIONS = 64


@dataclass
class FamilyForm(HubForm):
    """A HubForm whose tolerance is given (bf16 storage with a rounding the plan reports)."""

    tol: float = 1e-6

    @property
    def tolerance(self) -> float:
        return self.tol


def _sizes(layers: int) -> dict:
    return dict(hidden_size=2 * HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=layers + 1)


# -- OLMo 2 -----------------------------------------------------------------------------------------

OLMO2_LAYERS, OLMO2_HEADS = 2, 4


def make_olmo2_0425_1b(root: str, seed: int = 20) -> FamilyForm:
    path = os.path.join(root, "olmo2_0425_1b")
    r = _Rand(seed)
    h, f = HIDDEN, 2 * HIDDEN
    sd = OrderedDict()
    sd["model.embed_tokens.weight"] = r.w(VOCAB, h, std=0.5)
    for i in range(OLMO2_LAYERS):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = r.w(h, h, std=0.3)
        sd[p + "self_attn.k_proj.weight"] = r.w(h, h, std=0.3)
        sd[p + "self_attn.v_proj.weight"] = r.w(h, h, std=0.3)
        sd[p + "self_attn.o_proj.weight"] = r.w(h, h, std=0.3)
        sd[p + "self_attn.q_norm.weight"] = r.gain(h)
        sd[p + "self_attn.k_norm.weight"] = r.gain(h)
        sd[p + "mlp.gate_proj.weight"] = r.w(f, h, std=0.3)
        sd[p + "mlp.up_proj.weight"] = r.w(f, h, std=0.3)
        sd[p + "mlp.down_proj.weight"] = r.w(h, f, std=0.3)
        sd[p + "post_attention_layernorm.weight"] = r.gain(h)
        sd[p + "post_feedforward_layernorm.weight"] = r.gain(h)
    sd["model.norm.weight"] = r.gain(h)
    sd["lm_head.weight"] = r.w(VOCAB, h, std=0.3)
    write_tensors(path, sd, "safetensors")
    _write_json(os.path.join(path, "config.json"), {
        "architectures": ["Olmo2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "eos_token_id": VOCAB - 2, "hidden_act": "silu", "hidden_size": h, "initializer_range": 0.02,
        "intermediate_size": f, "max_position_embeddings": POSITIONS, "model_type": "olmo2",
        "num_attention_heads": OLMO2_HEADS, "num_hidden_layers": OLMO2_LAYERS, "num_key_value_heads": OLMO2_HEADS,
        "pad_token_id": VOCAB - 1, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 500000,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.3",
        "use_cache": True, "vocab_size": VOCAB})
    from transformers import Olmo2ForCausalLM

    model, info = _load_reference(Olmo2ForCausalLM, path)
    return FamilyForm(
        name="olmo2_0425_1b", path=path, model_class=Olmo2ForCausalLM, model=model, storage_dtype=torch.float32,
        fmt="safetensors", derived=[], aliases={}, sizes=_sizes(OLMO2_LAYERS), outputs=("logits",),
        make_inputs=_token_inputs(VOCAB), typo=("model.layers.0.self_attn.q_norm.weight",
                                                "model.layers.0.self_attn.q_nrom.weight"),
        source="allenai/OLMo-2-0425-1B model.safetensors (float32, untied lm_head)", load_info=info)


# -- Gemma 2 / Gemma 3 ------------------------------------------------------------------------------

def _gemma_tensors(r: _Rand, *, layers: int, heads: int, kv_heads: int, head_dim: int, ffn: int,
                   qk_norm: bool, dtype) -> "OrderedDict[str, torch.Tensor]":
    """Gemma*ForCausalLM state-dict order; norm weights are the w of x * (1 + w) (near 0)."""
    h = HIDDEN
    sd = OrderedDict()
    sd["model.embed_tokens.weight"] = r.w(VOCAB, h, std=0.5)
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = r.w(heads * head_dim, h, std=0.3)
        sd[p + "self_attn.k_proj.weight"] = r.w(kv_heads * head_dim, h, std=0.3)
        sd[p + "self_attn.v_proj.weight"] = r.w(kv_heads * head_dim, h, std=0.3)
        sd[p + "self_attn.o_proj.weight"] = r.w(h, heads * head_dim, std=0.3)
        if qk_norm:
            sd[p + "self_attn.q_norm.weight"] = r.w(head_dim, std=0.2)
            sd[p + "self_attn.k_norm.weight"] = r.w(head_dim, std=0.2)
        sd[p + "mlp.gate_proj.weight"] = r.w(ffn, h, std=0.3)
        sd[p + "mlp.up_proj.weight"] = r.w(ffn, h, std=0.3)
        sd[p + "mlp.down_proj.weight"] = r.w(h, ffn, std=0.3)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            sd[p + norm + ".weight"] = r.w(h, std=0.2)
    sd["model.norm.weight"] = r.w(h, std=0.2)
    return OrderedDict((k, v.to(dtype)) for k, v in sd.items())


GEMMA2_LAYERS, GEMMA2_HEADS, GEMMA2_KV, GEMMA2_HEAD_DIM = 2, 4, 2, 16


def make_gemma2_2b(root: str, seed: int = 21) -> FamilyForm:
    path = os.path.join(root, "gemma2_2b")
    ffn = 4 * HIDDEN
    sd = _gemma_tensors(_Rand(seed), layers=GEMMA2_LAYERS, heads=GEMMA2_HEADS, kv_heads=GEMMA2_KV,
                        head_dim=GEMMA2_HEAD_DIM, ffn=ffn, qk_norm=False, dtype=torch.float32)
    write_tensors(path, sd, "sharded", n_shards=3)
    _write_json(os.path.join(path, "config.json"), {
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

    model, info = _load_reference(Gemma2ForCausalLM, path)
    return FamilyForm(
        name="gemma2_2b", path=path, model_class=Gemma2ForCausalLM, model=model, storage_dtype=torch.float32,
        fmt="sharded", derived=[], aliases={}, sizes=dict(_sizes(GEMMA2_LAYERS), intermediate_size=2 * ffn),
        outputs=("logits",), make_inputs=_token_inputs(VOCAB),
        typo=("model.layers.0.pre_feedforward_layernorm.weight", "model.layers.0.pre_feedforward_layernrom.weight"),
        source="google/gemma-2-2b (3 float32 shards, tied head not stored, config.json without layer_types)",
        load_info=info)


GEMMA3_LAYERS, GEMMA3_HEADS, GEMMA3_KV, GEMMA3_HEAD_DIM = 6, 4, 1, 16
#: bf16 storage at 2x width: the embedding columns times f_S / f_T ~ 0.707 and the tied final
#: norm's (1 + w) / (2 x 0.707) are rounded once to bf16 (the plan notes say so): ~2^-8 relative
GEMMA3_BF16_TOLERANCE = 2e-2


def make_gemma3_1b_pt(root: str, seed: int = 22) -> FamilyForm:
    path = os.path.join(root, "gemma3_1b_pt")
    ffn = 6 * HIDDEN  # 6912 = 6 x 1152
    sd = _gemma_tensors(_Rand(seed), layers=GEMMA3_LAYERS, heads=GEMMA3_HEADS, kv_heads=GEMMA3_KV,
                        head_dim=GEMMA3_HEAD_DIM, ffn=ffn, qk_norm=True, dtype=torch.bfloat16)
    write_tensors(path, sd, "safetensors")
    _write_json(os.path.join(path, "config.json"), {
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

    model, info = _load_reference(Gemma3ForCausalLM, path)
    return FamilyForm(
        name="gemma3_1b_pt", path=path, model_class=Gemma3ForCausalLM, model=model, storage_dtype=torch.bfloat16,
        fmt="safetensors", derived=[], aliases={}, sizes=dict(_sizes(GEMMA3_LAYERS), intermediate_size=2 * ffn),
        outputs=("logits",), make_inputs=_token_inputs(VOCAB),
        typo=("model.layers.0.self_attn.k_norm.weight", "model.layers.0.self_attn.k_nrom.weight"),
        source="google/gemma-3-1b-pt model.safetensors (bfloat16, tied head not stored, sliding_window_pattern 6)",
        load_info=info, tol=GEMMA3_BF16_TOLERANCE)


# -- shared checks ----------------------------------------------------------------------------------

def relative_error(reference: torch.Tensor, value: torch.Tensor) -> float:
    return ((reference.double() - value.double()).abs().max() / reference.double().abs().max()).item()


def group_sums(spec, split_tensor, unsplit_tensor):
    """fp32 sums of the stored parts of every split group and the stored unsplit values they must
    equal (as tests/test_engine_storage.py: columns sharing a source column form a group)."""
    t = split_tensor.reshape(-1, split_tensor.shape[-1]) if not spec.transpose else split_tensor.t()
    u = unsplit_tensor.reshape(t.shape) if not spec.transpose else unsplit_tensor.t()
    cols = spec.col_map
    valid = cols >= 0
    src_cols = cols[valid]
    sums = torch.zeros(t.shape[0], int(src_cols.max()) + 1, dtype=torch.float32)
    sums.index_add_(1, src_cols, t[:, valid].float())
    expected = torch.zeros_like(sums)
    expected[:, src_cols] = u[:, valid].float()
    return sums, expected


def assert_bf16_groups_exact(plan, sd) -> int:
    """Every split group of every spec sums in fp32 to the stored unsplit value (zero for the
    cancelling splits of new layers); returns the number of split tensors checked."""
    checked = 0
    for spec in plan.specs:
        if spec.split == "none":
            continue
        src = sd[spec.source]
        split = spec.execute(src, seed=3)
        assert split.dtype == torch.bfloat16, spec.name
        unsplit = spec.execute(src, seed=3, split="none")
        sums, expected = group_sums(spec, split, unsplit)
        if spec.split.startswith("cancel"):
            expected = torch.zeros_like(expected)
        assert torch.equal(sums, expected), spec.name
        checked += 1
    return checked


def assert_rows_distinct(weight: torch.Tensor, name: str) -> None:
    """No two rows (FFN neurons) of an up / gate weight are identical."""
    w = weight.detach().double()
    d = torch.cdist(w, w)
    d.fill_diagonal_(float("inf"))
    assert float(d.min()) > 0, f"{name}: two FFN neurons are identical"


def perturbed(model_class, config, dtype=torch.float64, seed=0):
    """The model with every parameter perturbed (norms off their init), in ``dtype``, eval mode."""
    torch.manual_seed(seed)
    model = model_class(config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def tokens(seed=1, batch=2, length=9, vocab=50):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)
