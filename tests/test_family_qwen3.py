"""Qwen3: the Llama block plus RMSNorms over head_dim on q and k (q_norm / k_norm) and an explicit
head_dim that may differ from hidden / heads (Qwen3-0.6B: 1024 / 16 = 64, head_dim 128).

Derivation (LEMON_SPEC sections 2 and 10). Heads are replicated whole at fixed head_dim, so each
target head's q (and k) is a source head's q: the q/k norm weights (one per head_dim) are copied.
The config has one ``rms_norm_eps`` for every norm; at an indivisible width it becomes eta^2 eps
(the hidden-size norms need it). The q/k norms then see eps' = eta^2 eps on an unchanged q, which
is not exact; scaling the q and k projection rows by eta makes it exact:
    eta q / sqrt(mean((eta q)^2) + eta^2 eps) = q / sqrt(mean(q^2) + eps).
RoPE and 1/sqrt(head_dim) act after the norm: unchanged. v is not normalised: not scaled.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import transformers as tf

import family_checks as C
import hub_forms_families_a as F
import lemon_ext
from helpers_engine import bf16_state_dict, build, relative_error
from hub_forms import read_tensors
from lemon_ext.arch import ARCHITECTURES

VOCAB = 64
D, HEADS, KV, FFN = 64, 4, 2, 48
SIZES = {
    "2x": dict(hidden_size=128, intermediate_size=96, num_attention_heads=8, num_key_value_heads=4,
               num_hidden_layers=3),
    # the indivisible case: hidden 64 -> 96, heads 4 -> 6, kv 2 -> 3 (1.5x), FFN 48 -> 71
    "1.5x": dict(hidden_size=96, intermediate_size=71, num_attention_heads=6, num_key_value_heads=3,
                 num_hidden_layers=3),
}


def qwen3_config(head_dim: int, tie: bool, **extra):
    kw = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=head_dim,
              intermediate_size=FFN, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=tie,
              rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    kw.update(extra)
    return tf.Qwen3Config(**kw)


def model(head_dim=16, tie=False, dtype=torch.float64, **extra):
    return build(tf.Qwen3ForCausalLM, qwen3_config(head_dim, tie, **extra), dtype=dtype)


# -- lossless in float64 through transformers ------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("head_dim", [16, 32], ids=["hd=D/H", "hd=2D/H"])
@pytest.mark.parametrize("size", list(SIZES))
def test_lossless(size, head_dim, tie):
    source = model(head_dim, tie)
    target = lemon_ext.expand_model(source, **SIZES[size])
    cfg = target.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
        SIZES[size]["hidden_size"], SIZES[size]["num_attention_heads"], SIZES[size]["num_key_value_heads"], head_dim)
    assert cfg.tie_word_embeddings is tie
    if tie:
        assert target.lm_head.weight.data_ptr() == target.model.embed_tokens.weight.data_ptr()
    err = C.lossless_error(source, target, VOCAB)
    # transformers computes RMSNorm (hidden and q/k) in float32: ~1e-7 at 1.5x, ~1e-16 at 2x
    assert err <= 1e-5, err


def test_default_heads_keep_head_dim_with_explicit_head_dim():
    """head_dim != hidden / heads: heads follow hidden (4 * 96 / 64 = 6), kv the group size."""
    plan = lemon_ext.plan_expansion(qwen3_config(32, False), hidden_size=96)
    t = plan.target_sizes
    assert (t.heads, t.kv_heads, t.head_dim) == (6, 3, 32)


def _swap_architecture(monkeypatch, family: str, **changes):
    archs = tuple(replace(a, **changes) if a.family == family else a for a in ARCHITECTURES)
    monkeypatch.setattr(lemon_ext.arch, "ARCHITECTURES", archs)


def test_qk_rows_scaled_by_eta_is_what_makes_it_exact(monkeypatch):
    """With a large eps the q/k norms' eps matters: the eta-scaled q/k rows keep the function
    (float32 RMSNorm level, ~1e-7); without them (same table, qk_norm unset) it is ~1e-3."""
    source = model(32, False, rms_norm_eps=0.3)
    sizes = SIZES["1.5x"]
    err = C.lossless_error(source, lemon_ext.expand_model(source, **sizes), VOCAB)
    assert err <= 1e-5, err
    _swap_architecture(monkeypatch, "qwen3", qk_norm=None)
    err_without = C.lossless_error(source, lemon_ext.expand_model(source, **sizes), VOCAB)
    assert err_without > 1e-4 and err_without > 100 * err, (err_without, err)


def test_attention_biases_scaled_with_their_rows():
    """attention_bias: q and k biases feed the q/k norms too (scaled by eta), v and o not."""
    source = model(32, True, rms_norm_eps=0.3, attention_bias=True)
    err = C.lossless_error(source, lemon_ext.expand_model(source, **SIZES["1.5x"]), VOCAB)
    assert err <= 1e-5, err


def test_base_model_output_is_v_zero():
    source = build(tf.Qwen3Model, qwen3_config(32, False))
    target = lemon_ext.expand_model(source, **SIZES["1.5x"])
    x = C.tokens(VOCAB)
    with torch.no_grad():
        a, b = source(x).last_hidden_state, target(x).last_hidden_state
    assert relative_error(a, b[..., :D]) <= 1e-5 and not b[..., D:].any()


def test_qk_norm_weights_copied_q_k_rows_scaled_v_not():
    source = model(32, False)
    sd = source.state_dict()
    sd_t, cfg_t = lemon_ext.expand_state_dict(sd, source.config, **SIZES["1.5x"])
    plan = lemon_ext.plan_expansion(source.config, **SIZES["1.5x"])
    row_maps = {spec.name: spec.row_map for spec in plan.specs}
    eta = (64 / 96) ** 0.5
    assert cfg_t.rms_norm_eps == pytest.approx(1e-6 * eta ** 2, rel=1e-12)
    for i, src_i in ((0, 0), (1, 1), (2, 1)):  # layer 2 is the new copy of layer 1
        p, q = f"model.layers.{i}.self_attn.", f"model.layers.{src_i}.self_attn."
        assert torch.equal(sd_t[p + "q_norm.weight"], sd[q + "q_norm.weight"])
        assert torch.equal(sd_t[p + "k_norm.weight"], sd[q + "k_norm.weight"])
        # k = 1 at 1.5x: the first 64 columns are the source columns (no split), the rest random
        for proj, heads, scale in (("q_proj", 4, eta), ("k_proj", 2, eta), ("v_proj", 2, 1.0)):
            w_s, w_t = sd[q + proj + ".weight"], sd_t[p + proj + ".weight"]
            rows = row_maps[p + proj + ".weight"]
            if i == src_i:  # an original layer: whole heads of 32 rows, circularly
                circular = (torch.arange(w_t.shape[0]) // 32 % heads) * 32 + torch.arange(w_t.shape[0]) % 32
                assert torch.equal(rows, circular)
            torch.testing.assert_close(w_t[:, :64], scale * w_s[rows], rtol=1e-15, atol=0)


def test_config_lists_and_thresholds():
    source = model(16, False, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    assert source.config.layer_types == ["full_attention", "sliding_attention"]
    target = lemon_ext.expand_model(source, **SIZES["2x"])
    assert target.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert target.config.max_window_layers == 1
    assert C.lossless_error(source, target, VOCAB) <= 1e-5


# -- storage dtype, symmetry, backends, optimizer, plan --------------------------------------------

@pytest.mark.parametrize("size", list(SIZES))
def test_bf16_every_split_group_sums_to_the_stored_value(size):
    source = model(32, True, dtype=torch.float32)
    assert len(C.assert_bf16_split_groups_exact(source.config, bf16_state_dict(source), **SIZES[size])) >= 20


@pytest.mark.parametrize("size", list(SIZES))
def test_no_two_ffn_neurons_identical(size):
    target = lemon_ext.expand_model(model(16, False), **SIZES[size])
    for layer in target.model.layers:  # originals and the new layer
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.self_attn.q_proj, layer.self_attn.k_proj):
            C.assert_rows_distinct(proj.weight, "qwen3")


def test_cpu_backend_equals_torch_bitwise_bf16():
    source = model(32, True, dtype=torch.float32)
    C.assert_cpu_backend_bitwise(bf16_state_dict(source), source.config, **SIZES["1.5x"])


def test_optimizer_state_grows_with_the_weights():
    out = C.check_optimizer_state(model(32, False), SIZES["2x"], VOCAB)
    assert out["moment_tensors_checked"] >= 10


def test_plan_prints_the_qk_rules():
    plan = lemon_ext.plan_expansion(qwen3_config(32, True), **SIZES["1.5x"])
    text = str(plan)
    assert "lemon_ext plan: qwen3 (causal_lm)" in text
    assert "heads 4->6 (kv 2->3, head_dim 32)" in text
    assert "model.layers.{i}.self_attn.q_norm.weight" in text and "qk_norm_head" in text
    q_line = next(line for line in text.splitlines() if "self_attn.q_proj.weight" in line)
    v_line = next(line for line in text.splitlines() if "self_attn.v_proj.weight" in line)
    assert "x eta=0.816497" in q_line and "x eta" not in v_line
    assert any("q/k norms (head_dim)" in n for n in plan.notes)
    assert "tied to model.embed_tokens.weight" in text
    assert not any("q/k norms" in n for n in lemon_ext.plan_expansion(qwen3_config(32, True), **SIZES["2x"]).notes)


# -- the on-disk form of Qwen/Qwen3-0.6B ------------------------------------------------------------

def test_hub_form_qwen3_0_6b(tmp_path):
    form = F.make_qwen3_0_6b(str(tmp_path))
    result = C.check_hub_form(form, str(tmp_path), derived=F.is_derived)
    assert result["error"] <= 1e-6, result["error"]
    assert result["dropped"] == []
    out = read_tensors(result["dst"])
    # the stored tied head stays stored, equal to the embedding
    assert torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])
    assert result["model_t"].config.head_dim == F.QWEN3_HEAD_DIM
