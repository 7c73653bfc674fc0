"""New layers learn from the first step: every parameter of a new (zero-output) layer gets a
non-zero gradient on the first backward pass, while the expanded model computes exactly the
source's function (float64, real transformers classes), also when heads and FFN are not widened."""
from __future__ import annotations

import pytest
import torch

import helpers_engine as H
import lemon_ext

CASES = {
    # (model class name, config factory kwargs, expansion): depth only, widths unchanged
    "llama-depth-only": ("llama", dict(intermediate_size=38), dict(num_hidden_layers=4)),
    "llama-gqa-wider": ("llama", dict(intermediate_size=38), dict(hidden_size=64, num_hidden_layers=3)),
    "llama-mqa": ("mqa", dict(intermediate_size=38), dict(num_hidden_layers=3)),
    "gpt2-depth-only": ("gpt2", dict(n_inner=38), dict(num_hidden_layers=3)),
    "bert-depth-only": ("bert", dict(intermediate_size=38), dict(num_hidden_layers=4)),
}


def _model(kind: str, overrides: dict):
    import transformers as tf

    if kind == "gpt2":
        return H.build(tf.GPT2LMHeadModel, H.gpt2_config(**overrides))
    if kind == "bert":
        return H.build(tf.BertForMaskedLM, H.bert_config(**overrides))
    cls, cfg = H.llama_family("gqa" if kind == "llama" else kind, **overrides)
    return H.build(cls, cfg)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_new_layer_parameter_learns_from_step_one(case):
    kind, overrides, sizes = CASES[case]
    source = _model(kind, overrides)
    target = lemon_ext.expand_model(source, **sizes).double()
    x = H.token_batch()
    source.eval(), target.eval()
    assert H.relative_error(source(x).logits, target(x).logits) < 1e-10  # same function
    target.zero_grad()
    target(input_ids=x, labels=x).loss.backward()
    plan = lemon_ext.plan_expansion(source.config, **sizes)
    new = [layer.index for layer in plan.layers if layer.new]
    assert new
    checked = 0
    for name, p in target.named_parameters():
        parts = name.split(".")
        if not any(parts[i].isdigit() and int(parts[i]) in new for i in range(len(parts))):
            continue
        g = p.grad
        assert g is not None, name
        rows = g.reshape(g.shape[0], -1) if g.dim() > 1 else g.reshape(1, -1)
        # Every row (unit) of every matrix and every vector has a non-zero gradient.
        assert (rows.abs().sum(dim=1) > 0).all(), f"{name}: rows with zero gradient {(rows.abs().sum(dim=1) == 0).nonzero().flatten().tolist()}"
        checked += 1
    assert checked >= 8


def test_odd_unit_count_leaves_one_unit_unpaired():
    """An odd FFN width cannot be paired: exactly one neuron of each new layer has no partner
    (its output weights are zero); the function is still exact."""
    source = _model("llama", dict(intermediate_size=37))
    plan = lemon_ext.plan_expansion(source.config, num_hidden_layers=3)
    spec = next(s for s in plan.specs if s.name == "model.layers.2.mlp.down_proj.weight")
    counts = torch.bincount(spec.col_map, minlength=37)
    assert sorted(counts.tolist()).count(1) == 1 and counts.max() == 2
