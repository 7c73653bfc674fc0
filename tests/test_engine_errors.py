"""Every bad input raises LemonError (a ValueError) naming the tensor or field."""
import pytest
import torch
import transformers as tf

import lemon_ext
from helpers_engine import bert_config, build, gpt2_config, llama_family


@pytest.fixture(scope="module")
def llama():
    cls, cfg = llama_family("gqa")
    return build(cls, cfg).state_dict(), cfg


def test_error_class_is_value_error():
    assert issubclass(lemon_ext.LemonError, ValueError)


def test_unknown_model_type_lists_supported():
    with pytest.raises(lemon_ext.LemonError, match=r"unknown model_type 't5'.*llama.*gpt2.*bert.*vit"):
        lemon_ext.plan_expansion({"model_type": "t5"}, hidden_size=64)


def test_missing_config_field():
    cfg = gpt2_config().to_dict()
    del cfg["n_head"]
    with pytest.raises(lemon_ext.LemonError, match="'n_head'"):
        lemon_ext.plan_expansion(cfg, hidden_size=64)


def test_missing_tensor(llama):
    sd, cfg = llama
    sd = dict(sd)
    del sd["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(lemon_ext.LemonError, match=r"'model.layers.1.mlp.down_proj.weight' is missing"):
        lemon_ext.expand_state_dict(sd, cfg, hidden_size=64)


def test_unexpected_tensor(llama):
    sd, cfg = llama
    sd = dict(sd, **{"model.layers.7.extra.weight": torch.zeros(3)})
    with pytest.raises(lemon_ext.LemonError, match=r"unexpected tensor 'model.layers.7.extra.weight'"):
        lemon_ext.expand_state_dict(sd, cfg, hidden_size=64)


def test_shape_disagrees_with_config(llama):
    sd, cfg = llama
    sd = dict(sd)
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(40, 32, dtype=torch.float64)
    with pytest.raises(lemon_ext.LemonError, match=r"'model.layers.0.mlp.up_proj.weight' has shape \(40, 32\)"):
        lemon_ext.expand_state_dict(sd, cfg, hidden_size=64)


@pytest.mark.parametrize("field, value", [("hidden_size", 16), ("intermediate_size", 10),
                                          ("num_hidden_layers", 1), ("num_attention_heads", 2)])
def test_target_smaller_than_source(llama, field, value):
    _, cfg = llama
    with pytest.raises(lemon_ext.LemonError, match=f"{field}={value} is smaller"):
        lemon_ext.plan_expansion(cfg, **{field: value})


def test_head_dim_change_refused():
    with pytest.raises(lemon_ext.LemonError, match="changes head_dim"):
        lemon_ext.plan_expansion(gpt2_config(), hidden_size=64, num_attention_heads=4)


def test_impossible_gqa_refused(llama):
    _, cfg = llama  # 4 query heads, 2 kv heads (group 2); 8 heads over 2 kv heads: head 2 breaks
    with pytest.raises(lemon_ext.LemonError, match="impossible GQA mapping: target query head 2"):
        lemon_ext.plan_expansion(cfg, hidden_size=64, num_key_value_heads=2)
    with pytest.raises(lemon_ext.LemonError, match="not a multiple of num_key_value_heads=3"):
        lemon_ext.plan_expansion(cfg, hidden_size=64, num_key_value_heads=3)


def test_post_ln_indivisible_width_refused():
    with pytest.raises(lemon_ext.LemonError, match="allow_lossy"):
        lemon_ext.plan_expansion(bert_config(), hidden_size=48)


@pytest.mark.parametrize("order, message", [
    ([0, 2, 1], "not a source layer index"),
    ([1, 0, 0], "not a valid layer order"),
    ([0, 0, 0], r"never uses source layer\(s\) \[1\]"),
])
def test_bad_depth_list(llama, order, message):
    _, cfg = llama
    with pytest.raises(lemon_ext.LemonError, match=message):
        lemon_ext.plan_expansion(cfg, depth_placement=order)


def test_unknown_options():
    with pytest.raises(lemon_ext.LemonError, match="symmetry_breaking"):
        lemon_ext.plan_expansion(gpt2_config(), symmetry_breaking="random")
    with pytest.raises(lemon_ext.LemonError, match="depth_placement"):
        lemon_ext.plan_expansion(gpt2_config(), num_hidden_layers=3, depth_placement="zigzag")
    with pytest.raises(lemon_ext.LemonError, match="unknown argument 'hiden_size'"):
        lemon_ext.plan_expansion(gpt2_config(), hiden_size=64)


def test_gpt2_layer_index_scaling_refused_with_depth():
    with pytest.raises(lemon_ext.LemonError, match="scale_attn_by_inverse_layer_idx"):
        lemon_ext.plan_expansion(gpt2_config(scale_attn_by_inverse_layer_idx=True), num_hidden_layers=4)


def test_plan_is_printable():
    text = str(lemon_ext.plan_expansion(bert_config(), hidden_size=64, num_hidden_layers=3))
    assert "encoder.layer.{i}.attention.output.dense.weight" in text
    assert "identity affine (Post-LN depth chain)" in text and "exact up to LayerNorm eps" in text
