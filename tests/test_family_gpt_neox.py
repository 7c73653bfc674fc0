"""GPT-NeoX / Pythia (model_type gpt_neox).

Derivation (LEMON_SPEC sections 2-6 and 10). Pre-LN LayerNorm with biases: the stream is V_avg,
LN(V_avg(x); eta V_circ(gamma), V_zero(beta), eta^2 eps) = V_zero(LN(x)). ``query_key_value`` is
viewed (tokens, heads, 3 * hd) and chunked into q, k, v per head: its rows are blocks of 3 * hd per
head, so whole blocks replicate circularly (head h' reads block h' mod H) and q, k, v of a target
head are those of its source head; columns take the fan-in split. ``dense`` and ``dense_4h_to_h``
write V_avg rows (the tail row is the mean row, biases too). Parallel residual:
x + attn(ln1(x)) + mlp(ln2(x)); V_avg is closed under sums (the mean is linear), so both residual
forms keep the stream V_avg, and a new layer with both branches zero is the identity. Partial
rotary (rotary_pct) acts on the first dims of each head: unchanged at fixed head_dim. The untied
head reads the final LN's V_zero output (fan-in split); a tied one is the V_avg embedding read
back, k times the logits, so the final LN's gain and bias get 1/k.
"""
from __future__ import annotations

import pytest
import torch
import transformers as tf

import family_checks as C
import hub_forms_families_a as F
import lemon_ext
from helpers_engine import bf16_state_dict, build, relative_error
from hub_forms import stored_names
from lemon_ext.arch import SourceSpelling, find_architecture

VOCAB = 64
D, FFN = 32, 40
SIZES = {
    "2x": dict(hidden_size=64, intermediate_size=80, num_hidden_layers=3),
    "1.5x": dict(hidden_size=48, intermediate_size=59, num_hidden_layers=4),  # heads 4 -> 6, 2 new layers
}


def neox_config(parallel: bool = True, tie: bool = False, rotary: float = 0.25, bias: bool = True, **extra):
    kw = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=FFN, vocab_size=VOCAB,
              max_position_embeddings=64, tie_word_embeddings=tie, use_parallel_residual=parallel, rotary_pct=rotary,
              attention_bias=bias, pad_token_id=0)
    kw.update(extra)
    return tf.GPTNeoXConfig(**kw)


def model(cls=tf.GPTNeoXForCausalLM, dtype=torch.float64, **cfg):
    return build(cls, neox_config(**cfg), dtype=dtype)


# -- lossless in float64 through transformers ------------------------------------------------------

@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("parallel, tie, rotary, bias", [
    (True, False, 0.25, True), (False, False, 0.5, True), (True, True, 0.25, True), (False, True, 1.0, False)],
    ids=["parallel-untied", "sequential-untied", "parallel-tied", "sequential-tied-nobias"])
def test_lossless(size, parallel, tie, rotary, bias):
    source = model(parallel=parallel, tie=tie, rotary=rotary, bias=bias)
    target = lemon_ext.expand_model(source, **SIZES[size])
    cfg = target.config
    assert cfg.hidden_size // cfg.num_attention_heads == D // 4  # head_dim kept
    assert cfg.use_parallel_residual is parallel and cfg.rope_parameters["partial_rotary_factor"] == rotary
    if tie:
        assert target.lm_head.weight.data_ptr() == target.gpt_neox.embed_in.weight.data_ptr()
    err = C.lossless_error(source, target, VOCAB)
    assert err <= 1e-10, err  # transformers computes GPT-NeoX in float64 throughout


@pytest.mark.parametrize("options", [dict(symmetry_breaking="projection"), dict(symmetry_breaking="equal"),
                                     dict(hidden_size=64, num_hidden_layers=5, depth_placement="stack")],
                         ids=["projection", "equal", "stack"])
def test_other_modes_and_placements(options):
    source = model(parallel=False)
    target = lemon_ext.expand_model(source, **{**SIZES["1.5x"], **options})
    assert C.lossless_error(source, target, VOCAB) <= 1e-10


@pytest.mark.parametrize("parallel", [True, False])
def test_stream_is_v_avg_and_output_v_zero(parallel):
    """GPTNeoXModel at 1.5x (k = 1, r = 16): every hidden state is [x, mean(x) * 16]; the final
    LayerNorm's output is [y, 0 * 16]."""
    source = model(tf.GPTNeoXModel, parallel=parallel)
    target = lemon_ext.expand_model(source, **SIZES["1.5x"])
    x = C.tokens(VOCAB)
    with torch.no_grad():
        a = source(x, output_hidden_states=True)
        b = target(x, output_hidden_states=True)
    out_s, out_t = a.last_hidden_state, b.last_hidden_state
    assert relative_error(out_s, out_t[..., :D]) <= 1e-12
    assert out_t[..., D:].abs().max() <= 1e-12 * out_s.abs().max()
    # hidden_states: the embeddings, then the stream after each layer but the last (transformers
    # puts the final norm's output last). Target layers 0, 0', 1, 1': the stream after 0 and after
    # 0' is the source's after 0.
    for t, s_index in ((0, 0), (1, 1), (2, 1)):
        h, s = b.hidden_states[t], a.hidden_states[s_index]
        assert relative_error(s, h[..., :D]) <= 1e-12, t
        tail = s.mean(dim=-1, keepdim=True).expand(*s.shape[:-1], 16)
        assert relative_error(tail, h[..., D:]) <= 1e-12, t


def test_interleaved_qkv_blocks_replicate_whole_heads():
    source = model()
    sd = source.state_dict()
    sd_t, _ = lemon_ext.expand_state_dict(sd, source.config, **SIZES["2x"])
    hd = D // 4
    for i in (0, 1):
        p = f"gpt_neox.layers.{i}.attention.query_key_value."
        w_s = sd[p + "weight"].reshape(4, 3 * hd, D)
        w_t = sd_t[p + "weight"]
        summed = (w_t[:, :D] + w_t[:, D:]).reshape(8, 3 * hd, D)  # k = 2
        torch.testing.assert_close(summed, w_s[torch.arange(8) % 4], rtol=0, atol=1e-15)
        b_s, b_t = sd[p + "bias"].reshape(4, 3 * hd), sd_t[p + "bias"].reshape(8, 3 * hd)
        assert torch.equal(b_t, b_s[torch.arange(8) % 4])


def test_refusals():
    with pytest.raises(lemon_ext.LemonError, match="grouped-query"):
        lemon_ext.plan_expansion(neox_config(), hidden_size=64, num_key_value_heads=4)
    with pytest.raises(lemon_ext.LemonError, match="head_dim"):
        lemon_ext.plan_expansion(neox_config(), hidden_size=64, num_attention_heads=4)


# -- spellings: embed_out on disk, lm_head in memory; derived buffers ------------------------------

def test_embed_out_and_lm_head_give_the_same_bytes_each_in_its_spelling():
    source = model()
    sd = dict(source.state_dict())
    on_disk = {("embed_out.weight" if n == "lm_head.weight" else n): t for n, t in sd.items()}
    a, _ = lemon_ext.expand_state_dict(on_disk, source.config, **SIZES["2x"])
    b, cfg_t = lemon_ext.expand_state_dict(sd, source.config, **SIZES["2x"])
    assert "embed_out.weight" in a and "lm_head.weight" not in a
    assert "lm_head.weight" in b and "embed_out.weight" not in b
    assert torch.equal(a.pop("embed_out.weight"), b.pop("lm_head.weight")) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    spelling = SourceSpelling(find_architecture({"model_type": "gpt_neox"}), on_disk)
    assert spelling.renamed and spelling.canonical["embed_out.weight"] == "lm_head.weight"
    with pytest.raises(lemon_ext.LemonError, match="two spellings"):
        lemon_ext.expand_state_dict({**sd, "embed_out.weight": sd["lm_head.weight"]}, source.config, hidden_size=64)


def test_derived_buffers_dropped_listed_and_printed():
    source = model()
    sd = dict(source.state_dict())
    for i in range(2):
        sd[f"gpt_neox.layers.{i}.attention.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.uint8)).view(1, 1, 64, 64)
        sd[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        sd[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(1)
    plan = lemon_ext.plan_expansion(source.config, source_shapes={n: t.shape for n, t in sd.items()}, **SIZES["2x"])
    assert len(plan.dropped) == 6
    text = str(plan)
    for buf in ("bias", "masked_bias", "rotary_emb.inv_freq"):
        assert f"dropped: gpt_neox.layers.{{i}}.attention.{buf} (x2)" in text
    sd_t, _ = lemon_ext.expand_state_dict(sd, source.config, **SIZES["2x"])
    assert not [n for n in sd_t if F.is_derived(n)]
    sd_typo = {**sd, "gpt_neox.layers.0.attention.biass": torch.zeros(1)}
    with pytest.raises(lemon_ext.LemonError, match="attention.biass"):
        lemon_ext.expand_state_dict(sd_typo, source.config, **SIZES["2x"])


# -- storage dtype, symmetry, backends, optimizer, plan --------------------------------------------

@pytest.mark.parametrize("size", list(SIZES))
def test_bf16_every_split_group_sums_to_the_stored_value(size):
    source = model(dtype=torch.float32, tie=True)
    assert len(C.assert_bf16_split_groups_exact(source.config, bf16_state_dict(source), **SIZES[size])) >= 12


@pytest.mark.parametrize("size", list(SIZES))
def test_no_two_ffn_neurons_identical(size):
    target = lemon_ext.expand_model(model(), **SIZES[size])
    for layer in target.gpt_neox.layers:
        C.assert_rows_distinct(layer.mlp.dense_h_to_4h.weight, "dense_h_to_4h")
        C.assert_rows_distinct(layer.attention.query_key_value.weight, "query_key_value")


def test_cpu_backend_equals_torch_bitwise_bf16():
    source = model(dtype=torch.float32)
    C.assert_cpu_backend_bitwise(bf16_state_dict(source), source.config, **SIZES["1.5x"])


def test_triton_interleaved_bias_within_one_ulp():
    source = model(dtype=torch.float32)
    sd = bf16_state_dict(source)
    plan = lemon_ext.plan_expansion(source.config, **SIZES["1.5x"])
    spec = next(s for s in plan.specs if s.name.endswith("layers.0.attention.query_key_value.bias"))
    if not C.check_triton_one_tensor(spec, sd[spec.source]):
        pytest.skip(f"triton: {lemon_ext.backends()['triton']}")


def test_optimizer_state_grows_with_the_weights():
    out = C.check_optimizer_state(model(), SIZES["2x"], VOCAB)
    assert out["moment_tensors_checked"] >= 8


def test_plan_prints_the_interleaved_rule():
    cfg = neox_config(tie=True).to_dict() | {"architectures": ["GPTNeoXForCausalLM"]}
    text = str(lemon_ext.plan_expansion(cfg, **SIZES["2x"]))
    assert "lemon_ext plan: gpt_neox (causal_lm)" in text
    assert "[q k v] per head, heads 4->8" in text and "[96, 32] -> [192, 64]" in text
    assert "V_zero(beta), x1/2 (tied head)" in text and "hidden axis -> V_avg (k=2)" in text
    base = lemon_ext.plan_expansion(neox_config(), source_shapes={
        n: t.shape for n, t in tf.GPTNeoXModel(neox_config()).state_dict().items()}, **SIZES["2x"])
    assert base.layout.name == "base"


# -- on-disk forms --------------------------------------------------------------------------------------

@pytest.mark.parametrize("maker", [F.make_pythia, F.make_neox_v5_saved], ids=["pythia", "v5-saved"])
def test_hub_form(maker, tmp_path):
    form = maker(str(tmp_path))
    result = C.check_hub_form(form, str(tmp_path), derived=F.is_derived)
    assert result["error"] <= 1e-10, result["error"]
    out = stored_names(result["dst"])
    assert "embed_out.weight" in out and "lm_head.weight" not in out  # the source's spelling
    if form.name == "pythia":
        assert len(result["dropped"]) == 3 * 2  # three buffers per layer
