"""Phi-3 / Phi-4-mini (model_type phi3): the Llama block with fused projections.

Derivation (LEMON_SPEC sections 3, 4 and 10). ``qkv_proj`` computes [q | k | v] = W x with rows
[q heads (H_q hd) | k heads (H_kv hd) | v heads (H_kv hd)]; transformers slices it at H_q hd and
H_q hd + H_kv hd of the *target* config. So each segment must grow exactly like the unfused
projection: q rows replicate whole query heads circularly over H_q -> H_q', k and v rows whole
kv heads over H_kv -> H_kv', each segment laid out at the target offsets (unequal under GQA);
columns take the fan-in split of the V_zero stream. ``gate_up_proj`` is [gate | up] (chunk(2)):
both segments replicate neurons F -> F' circularly, so act(gate) * up stays V_circ and the down
projection's columns split per neuron group. Not q/k-normalised: no eta on q/k rows. RoPE (also
partial, ``partial_rotary_factor``, and LongRoPE) acts per head at fixed head_dim: unchanged.
"""
from __future__ import annotations

import pytest
import torch
import transformers as tf

import family_checks as C
import hub_forms_families_a as F
import lemon_ext
from helpers_engine import bf16_state_dict, build, relative_error

VOCAB = 64
D, FFN = 32, 40


def phi3_config(kv: int, tie: bool, partial: float = 1.0, **extra):
    kw = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv, intermediate_size=FFN,
              vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=tie, partial_rotary_factor=partial,
              pad_token_id=0, bos_token_id=0, eos_token_id=0)
    kw.update(extra)
    return tf.Phi3Config(**kw)


def model(kv=2, tie=False, partial=1.0, dtype=torch.float64, **extra):
    return build(tf.Phi3ForCausalLM, phi3_config(kv, tie, partial, **extra), dtype=dtype)


def sizes(kind: str, kv: int) -> dict:
    if kind == "2x":
        return dict(hidden_size=64, intermediate_size=80, num_attention_heads=8, num_key_value_heads=2 * kv,
                    num_hidden_layers=3)
    # 1.5x: hidden 32 -> 48, heads 4 -> 6, kv x1.5 (MQA keeps its one kv head), odd FFN
    return dict(hidden_size=48, intermediate_size=59, num_attention_heads=6,
                num_key_value_heads=1 if kv == 1 else kv * 3 // 2, num_hidden_layers=3)


# -- lossless in float64 through transformers ------------------------------------------------------

@pytest.mark.parametrize("kind", ["2x", "1.5x"])
@pytest.mark.parametrize("kv, tie, partial", [(4, False, 1.0), (2, False, 0.5), (2, True, 0.5), (1, True, 0.75)],
                         ids=["mha-untied", "gqa-untied-rot0.5", "gqa-tied-rot0.5", "mqa-tied-rot0.75"])
def test_lossless(kind, kv, tie, partial):
    source = model(kv, tie, partial)
    want = sizes(kind, kv)
    target = lemon_ext.expand_model(source, **want)
    cfg = target.config
    assert type(target) is tf.Phi3ForCausalLM
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        want["hidden_size"], want["num_attention_heads"], want["num_key_value_heads"])
    assert cfg.rope_parameters["partial_rotary_factor"] == partial and cfg.tie_word_embeddings is tie
    if tie:
        assert target.lm_head.weight.data_ptr() == target.model.embed_tokens.weight.data_ptr()
    err = C.lossless_error(source, target, VOCAB)
    assert err <= 1e-5, err  # RMSNorm in float32 inside transformers: ~1e-7 at 1.5x


def test_base_model_and_explicit_depth_list():
    source = build(tf.Phi3Model, phi3_config(2, False, 0.5))
    target = lemon_ext.expand_model(source, **sizes("1.5x", 2))
    x = C.tokens(VOCAB)
    with torch.no_grad():
        a, b = source(x).last_hidden_state, target(x).last_hidden_state
    assert relative_error(a, b[..., :D]) <= 1e-5 and not b[..., D:].any()  # V_zero output
    source = model(2, True)
    target = lemon_ext.expand_model(source, hidden_size=64, num_hidden_layers=4, depth_placement=[0, 1, 1, 0])
    assert C.lossless_error(source, target, VOCAB) <= 1e-5


def test_fused_segments_grow_like_the_unfused_projections():
    """The sum of each source column's copies, per fused segment at the target's offsets, is the
    source segment's rows replicated as the unfused roles replicate them (2x, GQA 4/2 -> 8/4)."""
    source = model(2, False)
    sd = source.state_dict()
    sd_t, _ = lemon_ext.expand_state_dict(sd, source.config, **sizes("2x", 2))
    hd, h_s, kv_s, h_t, kv_t = 8, 4, 2, 8, 4

    def heads(n_t, n_s):
        j = torch.arange(n_t * hd)
        return (j // hd % n_s) * hd + j % hd

    for i in (0, 1):  # original layers (the new layer pairs units instead)
        w_s = sd[f"model.layers.{i}.self_attn.qkv_proj.weight"]
        w_t = sd_t[f"model.layers.{i}.self_attn.qkv_proj.weight"]
        assert w_t.shape == ((h_t + 2 * kv_t) * hd, 2 * D)
        summed = w_t[:, :D] + w_t[:, D:]  # k = 2: each source column split in two parts
        q_s, k_s, v_s = w_s.split([h_s * hd, kv_s * hd, kv_s * hd])
        q_t, k_t, v_t = summed.split([h_t * hd, kv_t * hd, kv_t * hd])
        torch.testing.assert_close(q_t, q_s[heads(h_t, h_s)], rtol=0, atol=1e-15)
        torch.testing.assert_close(k_t, k_s[heads(kv_t, kv_s)], rtol=0, atol=1e-15)
        torch.testing.assert_close(v_t, v_s[heads(kv_t, kv_s)], rtol=0, atol=1e-15)
        g_s, u_s = sd[f"model.layers.{i}.mlp.gate_up_proj.weight"].chunk(2)
        gu_t = sd_t[f"model.layers.{i}.mlp.gate_up_proj.weight"]
        g_t, u_t = (gu_t[:, :D] + gu_t[:, D:]).chunk(2)
        neurons = torch.arange(80) % FFN
        torch.testing.assert_close(g_t, g_s[neurons], rtol=0, atol=1e-15)
        torch.testing.assert_close(u_t, u_s[neurons], rtol=0, atol=1e-15)


def test_impossible_gqa_is_refused():
    with pytest.raises(lemon_ext.LemonError, match="GQA"):
        lemon_ext.plan_expansion(phi3_config(2, False), hidden_size=48, num_attention_heads=6, num_key_value_heads=2)


def test_head_dim_change_is_refused():
    with pytest.raises(lemon_ext.LemonError, match="head_dim"):
        lemon_ext.plan_expansion(phi3_config(2, False), hidden_size=64, num_attention_heads=4)


# -- storage dtype, symmetry, backends, optimizer, plan --------------------------------------------

@pytest.mark.parametrize("kind", ["2x", "1.5x"])
def test_bf16_every_split_group_sums_to_the_stored_value(kind):
    source = model(2, True, 0.5, dtype=torch.float32)
    assert len(C.assert_bf16_split_groups_exact(source.config, bf16_state_dict(source), **sizes(kind, 2))) >= 12


@pytest.mark.parametrize("kind", ["2x", "1.5x"])
def test_no_two_ffn_neurons_identical(kind):
    target = lemon_ext.expand_model(model(2, False), **sizes(kind, 2))
    for layer in target.model.layers:
        gate, up = layer.mlp.gate_up_proj.weight.chunk(2)
        C.assert_rows_distinct(gate, "gate")
        C.assert_rows_distinct(up, "up")
        C.assert_rows_distinct(layer.self_attn.qkv_proj.weight, "qkv")


def test_cpu_backend_equals_torch_bitwise_bf16():
    source = model(2, True, 0.5, dtype=torch.float32)
    C.assert_cpu_backend_bitwise(bf16_state_dict(source), source.config, **sizes("1.5x", 2))


def test_optimizer_state_grows_with_the_weights():
    out = C.check_optimizer_state(model(2, False), sizes("2x", 2), VOCAB)
    assert out["moment_tensors_checked"] >= 8


def test_plan_prints_the_fused_rules():
    plan = lemon_ext.plan_expansion(phi3_config(2, False), **sizes("1.5x", 2))
    text = str(plan)
    assert "lemon_ext plan: phi3 (causal_lm)" in text
    assert "heads 4->6 (kv 2->3, head_dim 8)" in text
    assert "[q|k|v] heads 4->6 per segment" in text and "[gate|up] neurons 40->59 per segment" in text
    assert "[64, 32] -> [96, 48]" in text  # qkv rows (4 + 2 * 2) * 8 -> (6 + 2 * 3) * 8
    assert not any("q/k norms" in n for n in plan.notes)


# -- on-disk forms ------------------------------------------------------------------------------------

@pytest.mark.parametrize("maker", [F.make_phi3_mini_4k, F.make_phi4_mini], ids=["phi3-mini-4k", "phi4-mini"])
def test_hub_form(maker, tmp_path):
    form = maker(str(tmp_path))
    result = C.check_hub_form(form, str(tmp_path), derived=F.is_derived)
    assert result["error"] <= 1e-5, result["error"]  # bf16 weights upcast; float32 RMSNorm
    assert result["dropped"] == []
    cfg = result["model_t"].config
    assert cfg.num_key_value_heads == 2 * form.config["num_key_value_heads"]
    assert cfg.rope_parameters == form.model.config.rope_parameters  # partial rotary, LongRoPE kept
