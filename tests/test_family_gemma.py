"""Gemma 2 (gemma2) and Gemma 3 text (gemma3_text) through the transformers classes.

The math (derived here, checked below in float64):
- Norms compute x * (1 + w): a gain factor f (eta at indivisible widths, 1/(k ef) before the tied
  head) is stored as w' = f (1 + w) - 1; the four norms per layer follow the RMSNorm stream rule
  (the post norms normalise a branch output the writers put in the stream type V_zero).
- Embeddings are multiplied by sqrt(hidden) rounded to the activation dtype (f_S, f_T): the
  embedding columns are scaled by ef = f_S / f_T so the stream is V_zero(x). A tied head reads
  that embedding k times: logits x k ef, compensated in the final norm by 1 / (k ef).
- Soft-capping (final logits, attention scores) and query_pre_attn_scalar act on values the
  expansion keeps (logits; per-head q.k with head_dim fixed): nothing changes, tested with caps
  that bite. Sliding-window layers keep their type: a new layer takes its source layer's entry.
- Gemma 3 q/k norms over head_dim ((1 + w) too) are copied; at indivisible widths the q/k rows
  are scaled by eta (the one config eps becomes eta^2 eps).
- New layers: zero gain (w = -1) on both branch norms: the layer adds exactly 0 in every dtype.
"""
from __future__ import annotations

import math

import pytest
import torch
import transformers as tf

import lemon_ext
from family_checks import (ExpandedForms, adamw_steps, assert_bf16_split_groups_exact, assert_cpu_backend_bitwise,
                           assert_expand_state_dict_equals_files, assert_ffn_neurons_distinct, assert_new_layer_learns,
                           assert_typo_refused, check_expanded, layer_io, tokens)
from helpers_engine import bf16_state_dict, build, relative_error
from hub_forms import read_tensors
from hub_forms_families_b import GEMMA3_BF16_TOLERANCE, make_gemma2_2b, make_gemma3_1b_pt

TOL = 1e-5  # Gemma's RMSNorm computes in float32 even in a float64 model (observed <= 1e-6)
KINDS = ("gemma2", "gemma3")


def gemma(kind, **overrides):
    """A tiny Gemma with caps that bite (logits ~1 vs caps 0.3 / 0.5), a window (3) shorter than the
    test sequences, query_pre_attn_scalar (6) != head_dim (8), eager attention (soft-capping)."""
    base = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                intermediate_size=37, vocab_size=50, max_position_embeddings=64, eos_token_id=0, pad_token_id=0,
                bos_token_id=0, sliding_window=3, query_pre_attn_scalar=6, attn_logit_softcapping=0.5,
                final_logit_softcapping=0.3, attn_implementation="eager")
    if kind == "gemma3":
        base["sliding_window_pattern"] = 2
    base.update(overrides)
    if kind == "gemma2":
        return tf.Gemma2ForCausalLM, tf.Gemma2Config(**base)
    return tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(**base)


GROWTHS = {
    "2x_kv2x_plus1": dict(hidden_size=64, intermediate_size=74, num_hidden_layers=4),
    "1.5x_plus2": dict(hidden_size=48, intermediate_size=55, num_hidden_layers=5),
}


@pytest.mark.parametrize("growth", list(GROWTHS))
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("kind", KINDS)
def test_lossless_float64(kind, tied, growth):
    cls, cfg = gemma(kind, tie_word_embeddings=tied)
    model = build(cls, cfg)
    target = lemon_ext.expand_model(model, **GROWTHS[growth])
    assert target.config.num_attention_heads == 2 * target.config.num_key_value_heads  # group size kept
    x = tokens()
    with torch.no_grad():
        err = relative_error(model(x).logits, target(x).logits)
    assert err <= TOL, err


@pytest.mark.parametrize("growth", list(GROWTHS))
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("kind", KINDS)
def test_lossless_with_float64_norms(monkeypatch, kind, tied, growth):
    """With the (1 + w) RMSNorm computed in float64 (transformers' runs in float32), the expansion
    is exact to float64 rounding, tied head, embedding scale, eta and q/k norms included (~1e-15)."""
    from transformers.models.gemma2 import modeling_gemma2
    from transformers.models.gemma3 import modeling_gemma3

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)

    monkeypatch.setattr(modeling_gemma2.Gemma2RMSNorm, "forward", forward)
    monkeypatch.setattr(modeling_gemma3.Gemma3RMSNorm, "forward", forward)
    cls, cfg = gemma(kind, tie_word_embeddings=tied, attention_bias=not tied)  # q/k/v/o biases
    model = build(cls, cfg)
    target = lemon_ext.expand_model(model, **GROWTHS[growth])
    x = tokens()
    with torch.no_grad():
        assert relative_error(model(x).logits, target(x).logits) <= 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_caps_window_and_scalar_bite_and_are_kept(kind):
    """The soft-caps, the window and query_pre_attn_scalar all change the source's logits (so the
    losslessness above covers them), and the target config keeps them. (Gemma3Attention in
    transformers 5 passes no softcap: attn_logit_softcapping is a config field it ignores, null in
    the Gemma 3 uploads.)"""
    cls, cfg = gemma(kind)
    model = build(cls, cfg)
    x = tokens(length=9)
    changes = [dict(final_logit_softcapping=None), dict(sliding_window=64), dict(query_pre_attn_scalar=8)]
    if kind == "gemma2":
        changes.append(dict(attn_logit_softcapping=None))
    with torch.no_grad():
        ref = model(x).logits
        for change in changes:
            _, other_cfg = gemma(kind, **change)
            other = cls(other_cfg).double().eval()
            other.load_state_dict(model.state_dict())
            assert relative_error(ref, other(x).logits) > 1e-2, change
    cfg_t = lemon_ext.expand_model(model, hidden_size=64, num_hidden_layers=4).config
    assert (cfg_t.final_logit_softcapping, cfg_t.attn_logit_softcapping, cfg_t.sliding_window,
            cfg_t.query_pre_attn_scalar) == (0.3, 0.5, 3, 6)
    assert cfg_t.layer_types == ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]


@pytest.mark.parametrize("kind", KINDS)
def test_tied_head_final_norm_compensates_through_one_plus_w(kind):
    cls, cfg = gemma(kind)
    model = build(cls, cfg)
    plan = lemon_ext.plan_expansion(cfg, hidden_size=64)
    f_s, f_t = float(torch.tensor(32 ** 0.5)), float(torch.tensor(64 ** 0.5))  # float32: the config's dtype
    ef = f_s / f_t
    assert any(f"embeddings scaled by {ef:.6g}" in n for n in plan.notes)
    assert any("tied head" in n and f"1/(2 x {ef:.6g})" in n for n in plan.notes)
    target = lemon_ext.expand_model(model, hidden_size=64)
    w, w_t = model.model.norm.weight, target.model.norm.weight
    assert torch.allclose(w_t, (1 + torch.cat([w, w])) / (2 * ef) - 1, rtol=0, atol=1e-15)
    assert torch.allclose(target.model.embed_tokens.weight, torch.cat([model.model.embed_tokens.weight] * 2, 1) * ef,
                          rtol=0, atol=1e-15)
    assert target.lm_head.weight is target.model.embed_tokens.weight


@pytest.mark.parametrize("kind", KINDS)
def test_layer_types_from_a_config_without_them(kind):
    """Older config.json files have no layer_types (google/gemma-2-2b; gemma-3 ones carry
    sliding_window_pattern): after depth growth the target config lists every layer explicitly,
    each new layer with its source layer's type, and the model built from it reproduces the source."""
    cls, cfg = gemma(kind, num_hidden_layers=4 if kind == "gemma2" else 6)
    model = build(cls, cfg)
    if kind == "gemma3":
        cfg.sliding_window_pattern = 3  # old configs: every 3rd layer full
        cfg.layer_types = [("full_attention" if (i + 1) % 3 == 0 else "sliding_attention") for i in range(6)]
        model = cls(cfg).double().eval()
        model.load_state_dict(build(cls, cfg).state_dict())
    d = {k: v for k, v in cfg.to_dict().items() if k != "layer_types"}
    sd = model.state_dict()
    same, cfg_same = lemon_ext.expand_state_dict(sd, d, hidden_size=64)
    assert "layer_types" not in cfg_same  # same layer order: the rule still gives the right list
    sd_t, cfg_t = lemon_ext.expand_state_dict(sd, d, hidden_size=64, num_hidden_layers=len(cfg.layer_types) + 2)
    order = [layer.source for layer in lemon_ext.plan_expansion(d, hidden_size=64,
                                                                num_hidden_layers=len(cfg.layer_types) + 2).layers]
    assert cfg_t["layer_types"] == [cfg.layer_types[s] for s in order]
    rebuilt = type(cfg)(**{k: v for k, v in cfg_t.items() if k != "transformers_version"})
    assert rebuilt.layer_types == cfg_t["layer_types"]
    default = type(cfg)(**{k: v for k, v in cfg_t.items() if k not in ("transformers_version", "layer_types")})
    assert default.layer_types != cfg_t["layer_types"]  # the class's own rule would have got it wrong
    target = cls(rebuilt).double().eval()
    target.load_state_dict(sd_t)
    x = tokens(length=9)
    with torch.no_grad():
        assert relative_error(model(x).logits, target(x).logits) <= TOL


def test_gemma3_rope_and_pattern_fields_kept():
    cls, cfg = gemma("gemma3", rope_local_base_freq=123.0)
    d = cfg.to_dict()
    cfg_t = lemon_ext.plan_expansion(d, hidden_size=64, num_hidden_layers=5).target_config
    assert cfg_t["rope_parameters"] == d["rope_parameters"]
    assert cfg_t["rope_parameters"]["sliding_attention"]["rope_theta"] == 123.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_new_layers_add_exactly_zero_in_low_precision(kind, dtype):
    cls, cfg = gemma(kind)
    model = build(cls, cfg, dtype=torch.float32)
    target = lemon_ext.expand_model(model, hidden_size=64, num_hidden_layers=5).to(dtype)
    plan = lemon_ext.plan_expansion(cfg, hidden_size=64, num_hidden_layers=5)
    new = [layer.index for layer in plan.layers if layer.new]
    assert new == [2, 4]
    for index in new:
        layer = target.model.layers[index]
        assert torch.equal(layer.post_attention_layernorm.weight, torch.full((64,), -1.0, dtype=dtype))
        assert torch.equal(layer.post_feedforward_layernorm.weight, torch.full((64,), -1.0, dtype=dtype))
        inp, out = layer_io(target, index, tokens(length=9))
        assert torch.equal(inp, out), index


@pytest.mark.parametrize("kind", KINDS)
def test_new_layers_learn(kind):
    cls, cfg = gemma(kind)
    target = lemon_ext.expand_model(build(cls, cfg), hidden_size=64, num_hidden_layers=4)
    assert_new_layer_learns(target, 3, tokens(batch=4, length=12))


@pytest.mark.parametrize("kind", KINDS)
def test_symmetry_ffn_neurons_distinct(kind):
    cls, cfg = gemma(kind)
    target = lemon_ext.expand_model(build(cls, cfg), hidden_size=64, intermediate_size=74, num_hidden_layers=4)
    assert_ffn_neurons_distinct(target)


@pytest.mark.parametrize("hidden", [64, 48], ids=["2x", "1.5x"])
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_parts_sum_exactly_to_stored_source(kind, hidden):
    cls, cfg = gemma(kind)
    sd = bf16_state_dict(build(cls, cfg, dtype=torch.float32))
    assert len(assert_bf16_split_groups_exact(cfg, sd, hidden_size=hidden, intermediate_size=111,
                                              num_hidden_layers=5)) >= 10


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_run_extra_rounding_is_reported_and_bounded(kind):
    """A bf16 checkpoint (config dtype bfloat16) at 2x, tied: the embedding columns x ef and the
    final norm's (1 + w) / (2 ef) are rounded once to bf16; the plan says so, and the expanded
    bf16 weights reproduce the source's bf16 weights (both run in float64) to that rounding."""
    cls, cfg = gemma(kind, dtype="bfloat16")
    model = build(cls, cfg, dtype=torch.float32)
    sd = bf16_state_dict(model)
    plan = lemon_ext.plan_expansion(cfg, hidden_size=64, num_hidden_layers=4,
                                    source_shapes={k: v.shape for k, v in sd.items()})
    f_s, f_t = float(torch.tensor(32 ** 0.5, dtype=torch.bfloat16)), 8.0
    notes = " | ".join(plan.notes)
    assert f"in bfloat16: {f_s:g} -> 8" in notes and "embeddings scaled by" in notes
    assert "tied head" in notes and "x * (1 + w)" in notes and notes.count("one rounding in low precision") >= 3
    sd_t, cfg_t = lemon_ext.expand_state_dict(sd, cfg, hidden_size=64, num_hidden_layers=4)
    src = cls(cfg).double().eval()
    src.load_state_dict({k: v.double() for k, v in sd.items()})
    src.model.embed_tokens.embed_scale.fill_(f_s)  # the bf16 activation dtype's factors
    tgt = cls(cfg_t).double().eval()
    tgt.load_state_dict({k: v.double() for k, v in sd_t.items()})
    tgt.model.embed_tokens.embed_scale.fill_(f_t)
    x = tokens(length=9)
    with torch.no_grad():
        err = relative_error(src(x).logits, tgt(x).logits)
    assert 0 < err <= 2 ** -6, err  # one bf16 rounding (2^-9) of the embedding and the final gain
    # the same checkpoint in float32 storage: exact (the rounding was the bf16 storage's)
    sd32 = {k: v.float() for k, v in sd.items()}
    d = dict(cfg.to_dict(), dtype="float32")
    sd_t32, _ = lemon_ext.expand_state_dict(sd32, d, hidden_size=64, num_hidden_layers=4)
    tgt.load_state_dict({k: v.double() for k, v in sd_t32.items()})
    tgt.model.embed_tokens.embed_scale.fill_(float(torch.tensor(64 ** 0.5)))
    src.model.embed_tokens.embed_scale.fill_(float(torch.tensor(32 ** 0.5)))
    with torch.no_grad():
        assert relative_error(src(x).logits, tgt(x).logits) <= TOL


def test_backends_cpu_equals_torch_bf16():
    for kind in KINDS:  # 1.5x: eta, 1/k, (1 + w), embed scale
        cls, cfg = gemma(kind, dtype="bfloat16")
        assert_cpu_backend_bitwise(bf16_state_dict(build(cls, cfg, dtype=torch.float32)), cfg, hidden_size=48,
                                   intermediate_size=55, num_hidden_layers=4)


@pytest.mark.parametrize("kind", KINDS)
def test_plan_prints_and_optimizer_state_grows(kind):
    cls, cfg = gemma(kind)
    kw = dict(hidden_size=64, intermediate_size=74, num_hidden_layers=4, seed=2)
    text = str(lemon_ext.plan_expansion(cfg, **kw))
    for piece in ("branch_norm_weight", "zero gain (w = -1)", "tied head, scaled embedding", "layers 3->4"):
        assert piece in text, piece
    assert ("qk_norm_head" in text) == (kind == "gemma3")
    model = build(cls, cfg)
    x = tokens(batch=4, length=12)
    opt = adamw_steps(model, x)
    target = lemon_ext.expand_model(model, **kw)
    opt_t = lemon_ext.expand_optimizer_state(opt, model, target, **kw)
    p_s, p_t = model.model.layers[0].input_layernorm.weight, target.model.layers[0].input_layernorm.weight
    assert torch.allclose(opt_t.state[p_t]["exp_avg"], torch.cat([opt.state[p_s]["exp_avg"]] * 2), rtol=1e-12, atol=0)
    adamw_steps(target, x, opt=opt_t)


def test_adam_moments_of_offset_norms_keep_precision():
    """Moments of (1 + w) norm gains are scaled by the gain factor f only (the offset belongs to
    the weight, not to its moments): exp_avg_sq ~ 1e-14 must come out as f^2 x itself."""
    from lemon_ext.optim_state import expand_adam_state

    cls, cfg = gemma("gemma2")
    shapes = {k: tuple(v.shape) for k, v in cls(cfg).state_dict().items()}
    name = "model.layers.0.input_layernorm.weight"
    v = torch.linspace(1, 2, 32, dtype=torch.float64) * 1e-14
    out = expand_adam_state({name: {"step": torch.tensor(5.0), "exp_avg": v.clone(), "exp_avg_sq": v.clone()}},
                            cfg, hidden_size=48, source_shapes=shapes)  # eta != 1: a scaled (1 + w) gain
    eta = math.sqrt(32 / 48)
    want = torch.cat([v, v[:16]])
    assert torch.allclose(out[name]["exp_avg"], eta * want, rtol=1e-9, atol=0)
    assert torch.allclose(out[name]["exp_avg_sq"], eta ** 2 * want, rtol=1e-9, atol=0)


# -- the on-disk forms of google/gemma-2-2b and google/gemma-3-1b-pt --------------------------------

@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    forms = ExpandedForms(tmp_path_factory.mktemp("gemma_hub"),
                          {"gemma2_2b": make_gemma2_2b, "gemma3_1b_pt": make_gemma3_1b_pt})
    return forms.expanded


HUB = ("gemma2_2b", "gemma3_1b_pt")


@pytest.mark.parametrize("name", HUB)
def test_hub_form_expands_loads_and_reproduces(hub, name):
    form, dst, report = hub(name)
    _, error = check_expanded(form, dst)
    names_s, names_t = set(read_tensors(form.path)), set(read_tensors(dst))
    assert "lm_head.weight" not in names_t and all(n in names_t for n in names_s)
    assert error <= form.tolerance, error
    if form.storage_dtype == torch.bfloat16:  # the bf16 rounding is reported, and only there
        notes = " | ".join(report["plan_summary"]["notes"])
        assert "embeddings scaled by" in notes and "tied head" in notes
        assert form.tolerance == GEMMA3_BF16_TOLERANCE


@pytest.mark.parametrize("name", HUB)
def test_hub_form_layer_types_written_explicitly(hub, name):
    form, dst, report = hub(name)
    assert "layer_types" not in form.config
    source_types = form.model.config.layer_types  # what transformers made of the old config.json
    cfg_t = form.model_class.config_class.from_pretrained(dst)
    assert cfg_t.layer_types == [source_types[s] for s in report["plan_summary"]["layer_sources"]]
    assert cfg_t.layer_types[-1] == "full_attention"  # the new layer copies a full-attention layer


@pytest.mark.parametrize("name", HUB)
def test_hub_form_expand_state_dict_equals_files(hub, name):
    form, dst, _ = hub(name)
    assert_expand_state_dict_equals_files(form, dst)


@pytest.mark.parametrize("name", HUB)
def test_hub_form_typo_refused(hub, tmp_path, name):
    form, _, _ = hub(name)
    assert_typo_refused(form, str(tmp_path))


def test_triton_interpreted_offset_norm_and_scaled_embedding_specs():
    """The (1 + w) gain arithmetic and the embedding scale run on the Triton backend too (one small
    spec of each, interpreted on CPU): within 1 ulp of the torch backend."""
    pytest.importorskip("triton", reason="triton is not installed")
    from helpers_ops import assert_within_ulp, skip_reason

    if skip_reason("triton") is not None:
        pytest.skip(f"triton: {skip_reason('triton')}")
    cls, cfg = gemma("gemma3", vocab_size=6, dtype="bfloat16")
    sd = bf16_state_dict(build(cls, cfg, dtype=torch.float32))
    plan = lemon_ext.plan_expansion(cfg, hidden_size=48, num_hidden_layers=4,
                                    source_shapes={k: v.shape for k, v in sd.items()})
    picked = [s for s in plan.specs if s.name in ("model.norm.weight", "model.embed_tokens.weight",
                                                   "model.layers.3.post_attention_layernorm.weight")]
    assert len(picked) == 3 and all(s.offset == 1.0 for s in picked if "norm" in s.name)
    for spec in picked:
        out = spec.execute(sd[spec.source], seed=1, backend="triton")
        ref = spec.execute(sd[spec.source], seed=1, backend="torch")
        assert_within_ulp(out, ref, 1, spec.name)
