"""OLMo 2 (model_type olmo2, Olmo2ForCausalLM / Olmo2Model) through the transformers classes.

The math (derived here, checked below in float64):
- No pre-norms: q/k/v and gate/up read the raw stream, which is V_zero(x) (RMSNorm family): the
  k copies of each column split the fan-in, the zero tail multiplies free columns.
- q_norm / k_norm are RMSNorms over the whole projection: heads replicated m times each give
  rms(V_circ(q)) = rms(q), so the weight is V_circ over the heads; with unequal replication the
  rms changes: refused (integer head multiples only). At an indivisible hidden width the config's
  one eps becomes eta^2 eps, so the q and k rows are scaled by eta: eta q / sqrt(eta^2 (ms + eps))
  = q / sqrt(ms + eps).
- post_attention_layernorm / post_feedforward_layernorm normalise the branch output o, which the
  writers put in the stream type: rms(V_zero(o)) = eta rms(o), eps* = eta^2 eps, gain eta V_circ(w)
  -> V_zero(norm(o)): the norm_weight rule.
- New layers: zero gain on both branch norms, the rest a plain copy: the layer adds exactly 0 in
  every dtype. A cancelled (+e/-e) branch output instead would be rounding noise that the norm
  scales up by 1/sqrt(eps) (~1e3), or to O(|w|) once it exceeds sqrt(eps) (bf16 activations).
"""
from __future__ import annotations

import pytest
import torch
import transformers as tf

import lemon_ext
from family_checks import (ExpandedForms, adamw_steps, assert_bf16_split_groups_exact, assert_cpu_backend_bitwise,
                           assert_expand_state_dict_equals_files, assert_ffn_neurons_distinct, assert_new_layer_learns,
                           assert_typo_refused, check_expanded, layer_io, tokens)
from helpers_engine import bf16_state_dict, build, relative_error
from hub_forms import read_tensors
from hub_forms_families_b import make_olmo2_0425_1b
from lemon_ext import LemonError

TOL = 1e-5  # Olmo2RMSNorm computes in float32 even in a float64 model (observed <= 1e-6)


def olmo2(**overrides):
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=37, vocab_size=50, max_position_embeddings=64, eos_token_id=0, pad_token_id=0,
                rms_norm_eps=1e-6)
    base.update(overrides)
    return tf.Olmo2ForCausalLM, tf.Olmo2Config(**base)


GROWTHS = {
    "2x_kv2x_plus1": dict(hidden_size=64, intermediate_size=74, num_hidden_layers=3),
    "1.5x_heads2x": dict(hidden_size=48, num_attention_heads=8, intermediate_size=55, num_hidden_layers=4),
    "3x_stack": dict(hidden_size=96, num_hidden_layers=4, depth_placement="stack"),
}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("growth", list(GROWTHS))
def test_lossless_float64(tied, growth):
    cls, cfg = olmo2(tie_word_embeddings=tied)
    model = build(cls, cfg)
    target = lemon_ext.expand_model(model, **GROWTHS[growth])
    assert target.config.num_key_value_heads == 2 * target.config.num_attention_heads // 4  # group size kept
    x = tokens()
    with torch.no_grad():
        err = relative_error(model(x).logits, target(x).logits)
    assert err <= TOL, err


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("growth", list(GROWTHS))
def test_lossless_with_float64_norms(monkeypatch, tied, growth):
    """With the RMSNorm computed in float64 (transformers' runs in float32), the expansion is exact
    to float64 rounding: the rules, not a tolerance, make it lossless (observed ~1e-15)."""
    from transformers.models.olmo2 import modeling_olmo2

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_olmo2.Olmo2RMSNorm, "forward", forward)
    cls, cfg = olmo2(tie_word_embeddings=tied, attention_bias=tied)  # q/k/v/o biases (q/k rows x eta too)
    model = build(cls, cfg)
    target = lemon_ext.expand_model(model, **GROWTHS[growth])
    x = tokens()
    with torch.no_grad():
        assert relative_error(model(x).logits, target(x).logits) <= 1e-12


def test_base_model_lossless():
    cls, cfg = olmo2()
    model = build(tf.Olmo2Model, cfg)
    target = lemon_ext.expand_model(model, hidden_size=64, num_hidden_layers=3)
    x = tokens()
    with torch.no_grad():
        a, b = model(x).last_hidden_state, target(x).last_hidden_state
    assert relative_error(a, b[..., :32]) <= TOL and relative_error(a, b[..., 32:]) <= TOL


@pytest.mark.parametrize("sizes", [dict(hidden_size=48), dict(hidden_size=64, num_attention_heads=6)],
                         ids=["1.5x_default_heads", "heads_4_to_6"])
def test_non_integer_head_multiples_refused(sizes):
    cls, cfg = olmo2()
    with pytest.raises(LemonError, match=r"q_norm.*whole projection.*integer multiples"):
        lemon_ext.plan_expansion(cfg, **sizes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_new_layers_add_exactly_zero_in_low_precision(dtype):
    """The new layer's output equals its input bit for bit in fp32 and bf16 (zero branch-norm gains:
    x * 0 = 0 whatever the branch computes), and the expanded model stays at the source's error."""
    cls, cfg = olmo2()
    model = build(cls, cfg, dtype=torch.float32)
    plan = lemon_ext.plan_expansion(cfg, hidden_size=64, num_hidden_layers=4)
    new = [layer.index for layer in plan.layers if layer.new]
    assert new == [1, 3]
    zero_gain = [s for s in plan.specs if s.rule.startswith("zero gain")]
    assert {s.name.split(".")[2] for s in zero_gain} == {"1", "3"} and len(zero_gain) == 4
    target = lemon_ext.expand_model(model, hidden_size=64, num_hidden_layers=4).to(dtype)
    for name in ("post_attention_layernorm", "post_feedforward_layernorm"):
        assert torch.equal(getattr(target.model.layers[1], name).weight, torch.zeros(64, dtype=dtype))
    x = tokens(batch=3, length=12)
    for index in new:
        inp, out = layer_io(target, index, x)
        assert torch.equal(inp, out), index
    # the whole expanded model in low precision: as close to the source as the source in that
    # precision is to itself in float64 (the expansion adds no amplified rounding)
    ref = model.double()
    with torch.no_grad():
        r = ref(x).logits
        s = model.to(dtype)(x).logits
        t = target(x).logits
    assert relative_error(r, t) <= 2 * relative_error(r, s) + 1e-6


def test_new_layers_learn():
    """First backward: the new layers' branch-norm gains get gradients (the branches are live
    copies); after one AdamW step every new-layer parameter gets a gradient."""
    cls, cfg = olmo2()
    target = lemon_ext.expand_model(build(cls, cfg), hidden_size=64, num_hidden_layers=3)
    assert_new_layer_learns(target, 2, tokens(batch=4, length=12))


def test_symmetry_ffn_neurons_distinct():
    cls, cfg = olmo2()
    target = lemon_ext.expand_model(build(cls, cfg), hidden_size=64, intermediate_size=74, num_hidden_layers=3)
    assert_ffn_neurons_distinct(target)


@pytest.mark.parametrize("hidden", [64, 48], ids=["2x", "1.5x"])
def test_bf16_parts_sum_exactly_to_stored_source(hidden):
    cls, cfg = olmo2(tie_word_embeddings=True)
    sd = bf16_state_dict(build(cls, cfg, dtype=torch.float32))
    heads = dict(num_attention_heads=8) if hidden == 48 else {}
    checked = assert_bf16_split_groups_exact(cfg, sd, hidden_size=hidden, intermediate_size=111, num_hidden_layers=4,
                                             **heads)
    assert len(checked) >= 10


def test_backends_cpu_equals_torch_bf16():
    cls, cfg = olmo2()
    assert_cpu_backend_bitwise(bf16_state_dict(build(cls, cfg, dtype=torch.float32)), cfg, hidden_size=48,
                               num_attention_heads=8, intermediate_size=55, num_hidden_layers=3)


def test_plan_prints_and_optimizer_state_grows():
    cls, cfg = olmo2()
    kw = dict(hidden_size=64, intermediate_size=74, num_hidden_layers=3, seed=2)
    text = str(lemon_ext.plan_expansion(cfg, **kw))
    for piece in ("olmo2 (causal_lm)", "q_norm_projection", "k_norm_projection", "branch_norm_weight",
                  "zero gain (w = 0)", "layers 2->3"):
        assert piece in text, piece
    model = build(cls, cfg)
    x = tokens(batch=4, length=12)
    opt = adamw_steps(model, x)
    target = lemon_ext.expand_model(model, **kw)
    opt_t = lemon_ext.expand_optimizer_state(opt, model, target, **kw)
    state = opt_t.state[target.model.layers[0].self_attn.q_norm.weight]
    src = opt.state[model.model.layers[0].self_attn.q_norm.weight]
    assert torch.equal(state["exp_avg"], torch.cat([src["exp_avg"]] * 2))  # V_circ over heads, factor 1
    new_gain = opt_t.state[target.model.layers[2].post_attention_layernorm.weight]
    assert float(new_gain["exp_avg"].abs().max()) == 0  # a zero gain is not a copy: fresh moments
    adamw_steps(target, x, opt=opt_t)


def test_config_head_dim_and_eps():
    cls, cfg = olmo2()
    plan = lemon_ext.plan_expansion(cfg.to_dict(), hidden_size=48, num_attention_heads=8)
    cfg_t = plan.target_config
    assert cfg_t["head_dim"] == 8 and cfg_t["num_attention_heads"] == 8 and cfg_t["num_key_value_heads"] == 4
    assert cfg_t["rms_norm_eps"] == pytest.approx(1e-6 * 32 / 48)
    assert tf.Olmo2Config(**cfg_t).head_dim == 8


# -- the on-disk form of allenai/OLMo-2-0425-1B ----------------------------------------------------

@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    forms = ExpandedForms(tmp_path_factory.mktemp("olmo2_hub"), {"olmo2_0425_1b": make_olmo2_0425_1b})
    return forms.expanded("olmo2_0425_1b")


def test_hub_form_expands_loads_and_reproduces(hub):
    form, dst, report = hub
    assert report["plan_summary"]["layers"] == [2, 3]
    _, error = check_expanded(form, dst)
    assert set(read_tensors(dst)) == set(read_tensors(form.path)) | {
        n.replace("layers.1.", "layers.2.") for n in read_tensors(form.path) if "layers.1." in n}
    assert error <= form.tolerance, error


def test_hub_form_expand_state_dict_equals_files(hub):
    form, dst, _ = hub
    assert_expand_state_dict_equals_files(form, dst)


def test_hub_form_typo_refused(hub, tmp_path):
    form, _, _ = hub
    assert_typo_refused(form, str(tmp_path))
