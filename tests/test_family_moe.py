"""Mixture-of-experts families: Mixtral (mixtral), Qwen3-MoE (qwen3_moe), Qwen2-MoE (qwen2_moe).

The expert count stays; the router (E, D) keeps its rows and splits its fan-in, so router logits
and the chosen experts are unchanged; each expert is a SwiGLU MLP grown on its own (its own
replica groups and noise keys); Qwen2-MoE's shared expert and its (1, D) gate likewise. Both
forms of the experts are read and written back as they came: fused and stacked in memory
(transformers 5: ``mlp.experts.gate_up_proj`` (E, 2F, D), ``mlp.experts.down_proj`` (E, D, F)) and
one tensor per expert on disk (Hub checkpoints: tests/hub_forms_families_c.py).

References: tiny random models of the transformers classes in float64 with the eager experts
(transformers computes the router softmax and RMSNorm in float32: tolerance 1e-5 relative).
"""
from __future__ import annotations

import os
import re

import pytest
import torch
import transformers as tf

import lemon_ext
from family_checks import (adamw_steps, assert_bf16_split_groups_exact, assert_cpu_backend_bitwise,
                           assert_expand_state_dict_equals_files, assert_spelling_kept, assert_typo_refused,
                           check_expanded)
from helpers_engine import VOCAB, bf16_state_dict, build, relative_error, token_batch
from hub_forms import read_tensors
from hub_forms_families_c import FORMS, load_reference
from lemon_ext import LemonError
from lemon_ext.arch import SourceSpelling, find_architecture

TOL = 1e-5
KINDS = ["mixtral", "qwen3_moe", "qwen2_moe"]
E, TOP_K = 4, 2


# -- tiny models ------------------------------------------------------------------------------------

def moe_config(kind: str, **overrides):
    """(model class, config): 2 layers, hidden 32, 4 heads / 2 kv heads, 4 experts, top-2."""
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=VOCAB, max_position_embeddings=64, num_experts_per_tok=TOP_K,
                experts_implementation="eager")
    if kind == "mixtral":
        base.update(intermediate_size=24, num_local_experts=E)
        base.update(overrides)
        return tf.MixtralForCausalLM, tf.MixtralConfig(**base)
    base.update(intermediate_size=40, moe_intermediate_size=12, num_experts=E)
    if kind == "qwen3_moe":
        base.update(head_dim=16, norm_topk_prob=True)  # heads * head_dim != hidden, as Qwen3-30B-A3B
        base.update(overrides)
        return tf.Qwen3MoeForCausalLM, tf.Qwen3MoeConfig(**base)
    base.update(shared_expert_intermediate_size=20)
    base.update(overrides)
    return tf.Qwen2MoeForCausalLM, tf.Qwen2MoeConfig(**base)


def grow(kind: str, *, width: float = 2, layers: int = 1) -> dict:
    """Target sizes: every width x ``width`` (kv heads follow), ``layers`` more layers."""
    _, cfg = moe_config(kind)
    w = lambda n: int(n * width)  # noqa: E731
    sizes = dict(hidden_size=w(32), intermediate_size=w(cfg.intermediate_size), num_hidden_layers=2 + layers)
    if kind != "mixtral":
        sizes["moe_intermediate_size"] = w(12)
    if kind == "qwen2_moe":
        sizes["shared_expert_intermediate_size"] = w(20)
    return sizes


def experts_of(kind: str, sd: dict, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up (E, 2F, D), down (E, D, F)) of one layer, from the fused or the per-expert form."""
    p = f"model.layers.{layer}.mlp.experts."
    if p + "gate_up_proj" in sd:
        return sd[p + "gate_up_proj"], sd[p + "down_proj"]
    if kind == "mixtral":
        q = f"model.layers.{layer}.block_sparse_moe.experts."
        g, u, d = (torch.stack([sd[f"{q}{e}.{w}.weight"] for e in range(E)]) for w in ("w1", "w3", "w2"))
    else:
        g, u, d = (torch.stack([sd[f"{p}{e}.{w}.weight"] for e in range(E)]) for w in ("gate_proj", "up_proj", "down_proj"))
    return torch.cat([g, u], dim=1), d


def to_disk_form(kind: str, sd: dict) -> dict:
    """A transformers 5 state dict in the Hub's on-disk spelling (one tensor per expert; Mixtral
    under block_sparse_moe with w1 / w3 / w2), as conversion_mapping.py reverses it."""
    out = {}
    for name, t in sd.items():
        m = re.fullmatch(r"(model\.layers\.\d+)\.mlp\.(experts\.gate_up_proj|experts\.down_proj|gate\.weight)", name)
        if m is None:
            out[name] = t
            continue
        moe = m.group(1) + (".block_sparse_moe." if kind == "mixtral" else ".mlp.")
        names = ("w1", "w3", "w2") if kind == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        if m.group(2) == "gate.weight":
            out[moe + "gate.weight"] = t
        elif m.group(2) == "experts.gate_up_proj":
            f = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{moe}experts.{e}.{names[0]}.weight"] = t[e, :f].clone()
                out[f"{moe}experts.{e}.{names[1]}.weight"] = t[e, f:].clone()
        else:
            for e in range(t.shape[0]):
                out[f"{moe}experts.{e}.{names[2]}.weight"] = t[e].clone()
    return out


def to_memory_form(kind: str, sd: dict, num_layers: int) -> dict:
    """The on-disk spelling back to transformers 5's fused state dict."""
    out = {n: t for n, t in sd.items() if ".experts." not in n and "block_sparse_moe.gate" not in n}
    for i in range(num_layers):
        if not any(n.startswith(f"model.layers.{i}.") and ".experts." in n for n in sd):
            continue
        gu, d = experts_of(kind, sd, i)
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"], out[f"model.layers.{i}.mlp.experts.down_proj"] = gu, d
        if kind == "mixtral":
            out[f"model.layers.{i}.mlp.gate.weight"] = sd[f"model.layers.{i}.block_sparse_moe.gate.weight"]
    return out


def load_target(cls, cfg_t, sd_t, dtype=torch.float64):
    cfg_t._experts_implementation = "eager"
    model = cls(cfg_t).to(dtype).eval()
    model.load_state_dict(sd_t, strict=True)
    return model


def forward(model, x):
    with torch.no_grad():
        return model(x, output_router_logits=True)


def check_routing(out_s, out_t, plan) -> float:
    """Router logits of every original target layer equal its source layer's; same top-k experts.
    Returns the largest relative difference of the router logits."""
    worst = 0.0
    originals = [layer for layer in plan.layers if not layer.new]
    assert len(out_t.router_logits) == len(plan.layers)
    for layer in originals:
        a, b = out_s.router_logits[layer.source], out_t.router_logits[layer.index]
        worst = max(worst, relative_error(a, b))
        assert torch.equal(a.float().topk(TOP_K).indices, b.float().topk(TOP_K).indices), layer
    return worst


# -- float64: logits, router logits and chosen experts unchanged ------------------------------------

@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kind", KINDS)
def test_lossless_2x_width_kv_x2_one_more_layer(kind, tied):
    cls, cfg = moe_config(kind, tie_word_embeddings=tied)
    model = build(cls, cfg)
    sizes = grow(kind)
    target = lemon_ext.expand_model(model, seed=1, **sizes)  # the fused (transformers 5) form
    assert target.config.num_key_value_heads == 4 and target.config.hidden_size == 64
    assert target.config.num_hidden_layers == 3
    if tied:
        assert target.lm_head.weight.data_ptr() == target.model.embed_tokens.weight.data_ptr()
    x = token_batch()
    out_s, out_t = forward(model, x), forward(target, x)
    assert relative_error(out_s.logits, out_t.logits) <= TOL
    plan = lemon_ext.plan_expansion(cfg, **sizes)
    assert check_routing(out_s, out_t, plan) <= 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_lossless_indivisible_width(kind):
    """1.5x: tail columns random, norm gains (and Qwen3's q/k rows) scaled by eta."""
    cls, cfg = moe_config(kind)
    model = build(cls, cfg)
    sizes = grow(kind, width=1.5, layers=2)
    target = lemon_ext.expand_model(model, seed=2, **sizes)
    x = token_batch()
    out_s, out_t = forward(model, x), forward(target, x)
    assert relative_error(out_s.logits, out_t.logits) <= TOL
    check_routing(out_s, out_t, lemon_ext.plan_expansion(cfg, **sizes))


@pytest.mark.parametrize("kind", KINDS)
def test_on_disk_spelling_through_expand_state_dict(kind):
    """One tensor per expert in, one tensor per expert out (new layers too), same function; the
    fused form of the same model gives the same function."""
    cls, cfg = moe_config(kind)
    model = build(cls, cfg)
    sd = to_disk_form(kind, model.state_dict())
    sizes = grow(kind)
    sd_t, cfg_t = lemon_ext.expand_state_dict(sd, cfg, seed=4, **sizes)
    moe = "block_sparse_moe" if kind == "mixtral" else "mlp"
    w = "w2" if kind == "mixtral" else "down_proj"
    assert f"model.layers.2.{moe}.experts.3.{w}.weight" in sd_t and f"model.layers.2.{moe}.gate.weight" in sd_t
    assert not any("gate_up_proj" in n or "experts.down_proj" in n for n in sd_t)
    target = load_target(cls, cfg_t, to_memory_form(kind, sd_t, 3))
    x = token_batch()
    assert relative_error(forward(model, x).logits, forward(target, x).logits) <= TOL


# -- Qwen-MoE dense layers: mlp_only_layers and decoder_sparse_step -----------------------------------

@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen2_moe"])
def test_dense_layers_and_sparse_step_rewritten_for_depth(kind):
    """Layer 0 listed in mlp_only_layers, layer 2 off the sparse step (2): dense; layer 1 sparse.
    With two new layers the pattern breaks: the target lists its dense layers, step 1."""
    cls, cfg = moe_config(kind, num_hidden_layers=3, mlp_only_layers=[0], decoder_sparse_step=2)
    model = build(cls, cfg)
    sparse = [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in model.model.layers]
    assert sparse == [False, True, False]  # the premise, as transformers builds it
    sizes = dict(grow(kind), num_hidden_layers=5)
    plan = lemon_ext.plan_expansion(cfg, **sizes)
    order = [layer.source for layer in plan.layers]
    cfg_t = plan.target_config
    assert cfg_t.decoder_sparse_step == 1
    assert cfg_t.mlp_only_layers == [t for t, s in enumerate(order) if s != 1]
    target = lemon_ext.expand_model(model, seed=5, **sizes)  # loads strictly: every layer its kind
    assert [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in target.model.layers] == \
        [s == 1 for s in order]
    x = token_batch()
    assert relative_error(forward(model, x).logits, forward(target, x).logits) <= TOL
    # width only: the layer order stands, so the config keeps its own pattern
    cfg_w = lemon_ext.plan_expansion(cfg, hidden_size=64).target_config
    assert cfg_w.decoder_sparse_step == 2 and cfg_w.mlp_only_layers == [0]


def test_qwen2_moe_sliding_layers_without_layer_types_in_config_json():
    """Qwen1.5-MoE's config.json has no layer_types: Qwen2MoeConfig derives them (sliding on even
    layers below max_window_layers when use_sliding_window). A new layer order breaks that rule,
    so the target config gets the explicit list, each new layer its source layer's kind."""
    cls, cfg = moe_config("qwen2_moe", use_sliding_window=True, sliding_window=3, max_window_layers=2)
    assert cfg.layer_types == ["sliding_attention", "full_attention"]  # the premise
    model = build(cls, cfg)
    config_json = {k: v for k, v in cfg.to_dict().items() if k != "layer_types"}
    sd_t, cfg_t = lemon_ext.expand_state_dict(dict(model.state_dict()), config_json, seed=8, **grow("qwen2_moe", layers=2))
    # layer 1 moves to index 2, where the rule would make it sliding
    assert cfg_t["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention", "full_attention"]
    cfg_t.pop("transformers_version", None)
    target = load_target(cls, tf.Qwen2MoeConfig(**cfg_t), sd_t)
    x = token_batch(length=9)  # longer than the window
    assert relative_error(forward(model, x).logits, forward(target, x).logits) <= TOL


def test_dense_layer_holding_experts_is_refused():
    cls, cfg = moe_config("qwen3_moe")
    sd = dict(build(cls, cfg, dtype=torch.float32).state_dict())
    with pytest.raises(LemonError, match=r"model\.layers\.0\.mlp\.(gate|experts)"):
        lemon_ext.expand_state_dict(sd, {**cfg.to_dict(), "mlp_only_layers": [0]}, hidden_size=64)


# -- storage dtype, symmetry, backends --------------------------------------------------------------

@pytest.mark.parametrize("form", ["fused", "per_expert"])
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_split_groups_sum_exactly(kind, form):
    cls, cfg = moe_config(kind)
    sd = bf16_state_dict(build(cls, cfg, dtype=torch.float32))
    if form == "per_expert":
        sd = to_disk_form(kind, sd)
    roles = {spec.role for spec in assert_bf16_split_groups_exact(cfg, sd, **grow(kind))}
    moe_roles = {"router", "experts_gate_up", "experts_down"} if form == "fused" else \
        {"router", "expert_up_weight", "expert_down_weight"}
    if kind == "qwen2_moe":
        moe_roles |= {"shared_up_weight", "shared_down_weight", "shared_gate"}
    assert moe_roles <= roles


def _distinct_rows(rows: torch.Tensor) -> bool:
    return torch.unique(rows, dim=0).shape[0] == rows.shape[0]


@pytest.mark.parametrize("kind", KINDS)
def test_every_expert_breaks_symmetry(kind):
    """After growth no two FFN neurons of one expert have the same gate row or the same up row
    (original and new layers, both forms), experts differ from each other, and each expert draws
    its own noise; with symmetry_breaking="equal" the replicas are identical (the check bites)."""
    cls, cfg = moe_config(kind)
    model = build(cls, cfg)
    sizes = grow(kind)
    f_t = sizes.get("moe_intermediate_size", sizes["intermediate_size"])
    for form in ("fused", "per_expert"):
        sd = dict(model.state_dict()) if form == "fused" else to_disk_form(kind, model.state_dict())
        sd_t, _ = lemon_ext.expand_state_dict(sd, cfg, seed=6, **sizes)
        for layer in range(3):
            gate_up, down = experts_of(kind, sd_t, layer)
            assert gate_up.shape == (E, 2 * f_t, 64) and down.shape == (E, 64, f_t)
            for e in range(E):
                assert _distinct_rows(gate_up[e, :f_t]) and _distinct_rows(gate_up[e, f_t:]), (form, layer, e)
            assert _distinct_rows(gate_up.reshape(E, -1)) and _distinct_rows(down.reshape(E, -1))
        if kind == "qwen2_moe":
            w = sd_t["model.layers.0.mlp.shared_expert.gate_proj.weight"]
            assert _distinct_rows(w) and w.shape == (40, 64)
    # each expert its own noise: the split fractions of replica pairs differ between experts
    sd_t, _ = lemon_ext.expand_state_dict(dict(model.state_dict()), cfg, seed=6, **sizes)
    gate_up, _ = experts_of(kind, sd_t, 0)
    gate_up_s, _ = experts_of(kind, model.state_dict(), 0)
    fractions = gate_up[:, 0, :32] / gate_up_s[:, 0, :]  # neuron 0's first copy of its fan-in, per expert
    assert _distinct_rows(fractions)
    equal, _ = lemon_ext.expand_state_dict(dict(model.state_dict()), cfg, symmetry_breaking="equal", **sizes)
    gate_up, _ = experts_of(kind, equal, 0)
    assert torch.equal(gate_up[0, 0], gate_up[0, f_t // 2])  # neuron 0 and its replica


@pytest.mark.parametrize("kind", KINDS)
def test_cpu_backend_bitwise_equals_torch_on_bf16(kind):
    cls, cfg = moe_config(kind)
    sd = bf16_state_dict(build(cls, cfg, dtype=torch.float32))
    for form in (sd, to_disk_form(kind, sd)):
        assert_cpu_backend_bitwise(form, cfg, **grow(kind, width=1.5))


# -- plan, sizes and refusals -----------------------------------------------------------------------

def test_plan_prints_experts_and_per_expert_templates():
    cls, cfg = moe_config("qwen2_moe")
    sd = to_disk_form("qwen2_moe", build(cls, cfg, dtype=torch.float32).state_dict())
    plan = lemon_ext.plan_expansion(cfg, source_shapes={k: v.shape for k, v in sd.items()}, **grow("qwen2_moe"))
    text = str(plan)
    assert "experts 4 (kept), expert ffn 12->24, shared expert ffn 20->40" in text
    assert "model.layers.{i}.mlp.experts.{e}.gate_proj.weight" in text
    assert "near-tie" in text
    assert plan.target_config.moe_intermediate_size == 24
    assert plan.target_config.shared_expert_intermediate_size == 40
    assert plan.target_config.num_experts == E
    from_config = str(lemon_ext.plan_expansion(cfg, **grow("qwen2_moe")))  # no names: the in-memory form
    assert "model.layers.{i}.mlp.experts.gate_up_proj" in from_config and ".experts.{e}." not in from_config


def test_size_keywords_refused_where_the_family_has_no_such_size():
    _, cfg = moe_config("mixtral")
    with pytest.raises(LemonError, match="sized by intermediate_size"):
        lemon_ext.plan_expansion(cfg, hidden_size=64, moe_intermediate_size=48)
    assert lemon_ext.plan_expansion(cfg, intermediate_size=48, moe_intermediate_size=48).target_sizes.expert_ffn == 48
    _, cfg = moe_config("qwen3_moe")
    with pytest.raises(LemonError, match="shared_expert_intermediate_size=40: model family 'qwen3_moe' has no such size"):
        lemon_ext.plan_expansion(cfg, shared_expert_intermediate_size=40)
    with pytest.raises(LemonError, match="moe_intermediate_size=8 is smaller"):
        lemon_ext.plan_expansion(cfg, moe_intermediate_size=8)
    _, cfg = moe_config("qwen2_moe")
    cfg_dict = cfg.to_dict()
    cfg_dict.pop("num_experts")  # config.json without it: Qwen2MoeConfig's default 60
    assert lemon_ext.plan_expansion(cfg_dict).source_sizes.experts == 60


def test_qwen3_moe_reads_num_experts_in_both_spellings():
    """config.json says num_experts; Qwen3MoeConfig.to_dict() says num_local_experts."""
    _, cfg = moe_config("qwen3_moe")
    as_dict = cfg.to_dict()
    assert "num_local_experts" in as_dict and "num_experts" not in as_dict  # the premise
    hub = {k: v for k, v in as_dict.items() if k != "num_local_experts"} | {"num_experts": E}
    for c in (cfg, as_dict, hub):
        assert lemon_ext.plan_expansion(c, hidden_size=64).source_sizes.experts == E


@pytest.mark.parametrize("expert", [0, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_missing_expert_tensor_is_named(kind, expert):
    cls, cfg = moe_config(kind)
    sd = to_disk_form(kind, build(cls, cfg, dtype=torch.float32).state_dict())
    gone = next(n for n in sd if f".experts.{expert}." in n and "layers.1." in n)
    del sd[gone]
    with pytest.raises(LemonError, match=re.escape(gone)):
        lemon_ext.expand_state_dict(sd, cfg, hidden_size=64)


def test_expand_optimizer_state_on_moe():
    cls, cfg = moe_config("qwen2_moe")
    model = build(cls, cfg, dtype=torch.float32)
    opt = adamw_steps(model, token_batch(batch=2, length=6))
    sizes = grow("qwen2_moe")
    target = lemon_ext.expand_model(model, seed=7, **sizes)
    opt_t = lemon_ext.expand_optimizer_state(opt, model, target, seed=7, **sizes)
    params = dict(target.named_parameters())
    for name in ("model.layers.2.mlp.experts.gate_up_proj", "model.layers.0.mlp.gate.weight",
                 "model.layers.1.mlp.shared_expert_gate.weight"):
        state = opt_t.state[params[name]]
        assert state["exp_avg"].shape == params[name].shape and state["exp_avg_sq"].min() >= 0


# -- Hub on-disk forms through expand_checkpoint and lemon-expand -----------------------------------

@pytest.fixture(scope="module")
def hub_root(tmp_path_factory):
    return tmp_path_factory.mktemp("hub_moe")


@pytest.mark.parametrize("name, how", [("mixtral_8x7b", "api"), ("qwen3_30b_a3b", "cli"), ("qwen15_moe_a27b", "cli")])
def test_hub_form_expands_loads_and_reproduces(hub_root, name, how):
    from lemon_ext.checkpoint import expand_checkpoint
    from lemon_ext.cli import main

    form = FORMS[name](str(hub_root))
    dst = os.path.join(str(hub_root), "out_" + name)
    if how == "api":
        expand_checkpoint(form.path, dst, seed=3, progress=False, **form.sizes)
    else:
        argv = [form.path, dst, "--seed", "3", "--quiet"]
        for key, value in form.sizes.items():
            argv += ["--" + key.replace("_", "-"), str(value)]
        assert "--moe-intermediate-size" in argv
        assert main(argv) == 0
    _, error = check_expanded(form, dst, load=load_reference)  # transformers fuses the experts on load
    assert error <= TOL, error
    assert_spelling_kept(form, dst, dropped=())  # the source's spelling, one tensor per expert
    assert all(t.dtype == torch.bfloat16 for t in read_tensors(dst).values())
    assert_expand_state_dict_equals_files(form, dst)
    assert_typo_refused(form, str(hub_root))


def test_transformers5_save_pretrained_directory(tmp_path):
    """transformers 5 writes the experts one tensor each (it reverses its fusing on save) and
    Qwen3-MoE's config.json with num_local_experts: expanded, loaded, same logits."""
    from lemon_ext.checkpoint import expand_checkpoint

    cls, cfg = moe_config("qwen3_moe")
    model = build(cls, cfg)
    model.to(torch.float32).save_pretrained(tmp_path / "src")
    expand_checkpoint(str(tmp_path / "src"), str(tmp_path / "dst"), progress=False, **grow("qwen3_moe"))
    assert "model.layers.2.mlp.experts.3.up_proj.weight" in read_tensors(str(tmp_path / "dst"))
    source, _ = load_reference(cls, str(tmp_path / "src"))
    target, _ = load_reference(cls, str(tmp_path / "dst"))
    x = token_batch()
    assert relative_error(forward(source, x).logits, forward(target, x).logits) <= TOL


def test_spellings_map_to_transformers_names():
    """Mixtral's block_sparse_moe names read as transformers 5 renames them (.block_sparse_moe. ->
    .mlp.), and back."""
    spelling = SourceSpelling(find_architecture({"model_type": "mixtral"}),
                              ["model.layers.0.block_sparse_moe.gate.weight",
                               "model.layers.0.block_sparse_moe.experts.1.w3.weight"])
    assert sorted(spelling.canonical.values()) == ["model.layers.0.mlp.experts.1.w3.weight",
                                                    "model.layers.0.mlp.gate.weight"]
    assert spelling.source_name("model.layers.5.mlp.experts.2.w3.weight") == \
        "model.layers.5.block_sparse_moe.experts.2.w3.weight"
