"""Losslessness in the storage dtype (bf16), symmetry breaking, determinism."""
import pytest
import torch
import transformers as tf

import lemon_ext
from family_checks import adamw_steps, assert_bf16_split_groups_exact, assert_cpu_backend_bitwise
from helpers_engine import (bf16_state_dict, build, gpt2_config, llama_family, relative_error, token_batch,
                            vit_config)


def _model(kind):
    if kind == "gpt2":
        return tf.GPT2LMHeadModel, gpt2_config()
    if kind == "vit":
        return tf.ViTForImageClassification, vit_config()
    return llama_family(kind)


@pytest.mark.parametrize("kind", ["gqa", "mha_tied", "gpt2", "vit"])
@pytest.mark.parametrize("hidden", [64, 48, 96], ids=["2x", "1.5x", "3x"])
def test_bf16_parts_sum_exactly_to_stored_source(kind, hidden):
    cls, cfg = _model(kind)
    sd = bf16_state_dict(build(cls, cfg, dtype=torch.float32))
    checked = assert_bf16_split_groups_exact(cfg, sd, hidden_size=hidden, intermediate_size=111, num_hidden_layers=5)
    assert len(checked) >= 10


def test_bf16_model_computed_in_fp32_gives_source_logits():
    cls, cfg = llama_family("gqa")
    model = build(cls, cfg, dtype=torch.float32)
    sd = bf16_state_dict(model)
    sd_t, cfg_t = lemon_ext.expand_state_dict(sd, cfg, hidden_size=64, intermediate_size=74, num_hidden_layers=4)
    assert all(v.dtype == torch.bfloat16 for v in sd_t.values())
    source = cls(cfg).float().eval()
    source.load_state_dict({k: v.float() for k, v in sd.items()})
    target = cls(cfg_t).float().eval()
    target.load_state_dict({k: v.float() for k, v in sd_t.items()}, strict=True)
    x = token_batch()
    with torch.no_grad():
        assert relative_error(source(x).logits, target(x).logits) <= 1e-4


def _replica_rows(weight: torch.Tensor, source_rows: int, copies: int):
    return [weight[i * source_rows:(i + 1) * source_rows] for i in range(copies)]


@pytest.mark.parametrize("mode, expect_equal", [("lemon", False), ("equal", True)])
def test_symmetry_after_one_adamw_step(mode, expect_equal):
    """Replicated neurons/heads get different incoming weights after one step, unless split equally."""
    cls, cfg = llama_family("gqa")
    source = build(cls, cfg)
    target = lemon_ext.expand_model(source, hidden_size=64, intermediate_size=74, symmetry_breaking=mode)
    adamw_steps(target, token_batch(batch=4, length=12))
    f_s, q_s = cfg.intermediate_size, cfg.hidden_size  # q rows: 4 heads x 8 = 32 rows per copy
    layer = target.model.layers[0]
    pairs = [
        _replica_rows(layer.mlp.up_proj.weight.detach(), f_s, 2),
        _replica_rows(layer.mlp.gate_proj.weight.detach(), f_s, 2),
        _replica_rows(layer.self_attn.q_proj.weight.detach(), q_s, 2),
    ]
    for a, b in pairs:
        row_diff = (a - b).abs().amax(dim=1)  # per replicated neuron / head row
        if expect_equal:
            assert row_diff.max().item() <= 1e-12
        else:
            assert row_diff.min().item() > 1e-7


def test_same_seed_same_tensors_other_seed_different():
    model = build(tf.GPT2LMHeadModel, gpt2_config())
    sd = model.state_dict()
    kw = dict(hidden_size=48, intermediate_size=74, num_hidden_layers=3)  # every split has a choice
    a, _ = lemon_ext.expand_state_dict(sd, model.config, seed=7, **kw)
    b, _ = lemon_ext.expand_state_dict(sd, model.config, seed=7, **kw)
    c, _ = lemon_ext.expand_state_dict(sd, model.config, seed=8, **kw)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    split_names = [s.name for s in lemon_ext.plan_expansion(model.config, **kw).specs if s.split != "none"]
    assert split_names and all(not torch.equal(a[k], c[k]) for k in split_names)


def test_inputs_never_modified():
    model = build(tf.GPT2LMHeadModel, gpt2_config())
    sd = model.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    cfg = model.config.to_dict()
    cfg_before = dict(cfg)
    lemon_ext.expand_state_dict(sd, cfg, hidden_size=64, num_hidden_layers=4)
    assert all(torch.equal(before[k], sd[k]) for k in sd)
    assert cfg == cfg_before


@pytest.mark.parametrize("mode", ["lemon", "projection", "equal"])
def test_every_symmetry_mode_is_lossless_fp64(mode):
    model = build(tf.GPT2LMHeadModel, gpt2_config())
    target = lemon_ext.expand_model(model, hidden_size=48, num_hidden_layers=3, symmetry_breaking=mode)
    x = token_batch()
    with torch.no_grad():
        # projection: exact up to fp64 rounding of the added noise
        assert relative_error(model(x).logits, target(x).logits) <= 1e-10


def test_backends_give_identical_state_dicts():
    cls, cfg = llama_family("gqa")
    assert_cpu_backend_bitwise(bf16_state_dict(build(cls, cfg, dtype=torch.float32)), cfg, hidden_size=48,
                               intermediate_size=55, num_hidden_layers=3)
