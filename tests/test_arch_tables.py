"""The architecture tables as data: spellings, derived buffers, defaults, and no family code
outside lemon_ext/arch. References: transformers' own save_pretrained / from_pretrained."""
from __future__ import annotations

import ast
import pathlib

import pytest
import torch

import helpers_engine as H
import lemon_ext
from lemon_ext.arch import ARCHITECTURES, ROLES, SourceSpelling, find_architecture

PACKAGE = pathlib.Path(lemon_ext.__file__).parent


def test_no_family_branch_outside_arch():
    """Family knowledge lives in lemon_ext/arch only: no comparison of a family or model_type
    name, nor a family string literal used in a condition, anywhere else in the package."""
    families = {a.family for a in ARCHITECTURES} | {t for a in ARCHITECTURES for t in a.model_types}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "arch" in path.relative_to(PACKAGE).parts[:1]:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                text = ast.unparse(node)
                if "family" in text or "model_type" in text:
                    offenders.append(f"{path.name}:{node.lineno}: {text}")
                for c in [node.left, *node.comparators]:
                    if isinstance(c, ast.Constant) and c.value in families:
                        offenders.append(f"{path.name}:{node.lineno}: {text}")
    assert not offenders, offenders


def test_every_table_role_and_axis_rule_exists():
    builder_rules = {"stream", "stream_in", "stream_circ", "stream_zero", "q_heads", "kv_heads", "ffn", "keep",
                     "expert_ffn", "shared_ffn", "heads_qkv", "experts"}
    for arch in ARCHITECTURES:
        entries = [*arch.embeddings, *arch.layer, *arch.final, *(e for lo in arch.layouts for e in lo.head)]
        for entry in entries:
            assert entry[1] in ROLES, (arch.family, entry)
    for name, role in ROLES.items():
        for rule in (role.rows, role.cols):
            for r in (rule if isinstance(rule, tuple) else (rule,)):  # "experts" prefixes a repeat
                assert r in builder_rules, (name, r)


def _saved_names(model, tmp_path) -> list[str]:
    from safetensors import safe_open

    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        return list(f.keys())


def test_vit_pre_v5_names_read_as_transformers_reads_them(tmp_path):
    """transformers 5 writes ViT in its pre-v5 names and renames them on load: our spelling maps
    exactly the names it writes to exactly the names its model holds."""
    import transformers as tf

    model = H.build(tf.ViTForImageClassification, H.vit_config())
    on_disk = _saved_names(model, tmp_path)
    assert any(".attention.attention.query." in n for n in on_disk)  # the premise of the test
    spelling = SourceSpelling(find_architecture({"model_type": "vit"}), on_disk)
    assert sorted(spelling.canonical.values()) == sorted(model.state_dict())
    assert spelling.renamed and not spelling.derived


def _tiny_models():
    """(id, builder) of every supported class: what transformers writes for each must read back."""
    import transformers as tf

    llama = lambda kind, cls=None, **kw: lambda: H.build(cls or H.llama_family(kind)[0], H.llama_family(kind, **kw)[1])  # noqa: E731
    qwen3 = tf.Qwen3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, intermediate_size=38, vocab_size=H.VOCAB)
    return {
        "gpt2-lm": lambda: H.build(tf.GPT2LMHeadModel, H.gpt2_config()),
        "gpt2-base": lambda: H.build(tf.GPT2Model, H.gpt2_config()),
        "bert-base": lambda: H.build(tf.BertModel, H.bert_config()),
        "bert-mlm": lambda: H.build(tf.BertForMaskedLM, H.bert_config()),
        "bert-classifier": lambda: H.build(tf.BertForSequenceClassification, H.bert_config(num_labels=3)),
        "vit-base": lambda: H.build(tf.ViTModel, H.vit_config()),
        "vit-classifier": lambda: H.build(tf.ViTForImageClassification, H.vit_config()),
        "llama": llama("gqa"), "mistral": llama("mistral"), "qwen2": llama("qwen2"),
        "llama-classifier": llama("gqa", tf.LlamaForSequenceClassification, num_labels=3, pad_token_id=0),
        "qwen3": lambda: H.build(tf.Qwen3ForCausalLM, qwen3),
    }


@pytest.mark.parametrize("case", sorted(_tiny_models()))
def test_save_pretrained_names_read_back_to_the_model_names(case, tmp_path):
    """transformers' save_pretrained applies its conversion mapping in reverse (older spellings
    for ViT, etc.): our tables must read whatever it writes as the names its model holds, with
    nothing derived and nothing unknown; and the plan covers every stored tensor."""
    model = _tiny_models()[case]()
    on_disk = _saved_names(model, tmp_path)
    arch = find_architecture(model.config.to_dict())
    spelling = SourceSpelling(arch, on_disk)
    read_as = set(spelling.canonical.values())
    assert read_as <= set(model.state_dict()), sorted(read_as - set(model.state_dict()))
    not_saved = set(model.state_dict()) - read_as  # tied copies save_pretrained drops
    assert not_saved <= {"lm_head.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}, not_saved
    assert not spelling.derived
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    plan = lemon_ext.plan_expansion(model.config, source_shapes=shapes, hidden_size=64)
    plan.check_source(shapes)


def test_pre_v5_vit_expands_bitwise_like_v5_names_and_keeps_its_spelling(tmp_path):
    import transformers as tf
    from safetensors.torch import load_file

    model = H.build(tf.ViTForImageClassification, H.vit_config())
    _saved_names(model, tmp_path)
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    kw = dict(hidden_size=64, intermediate_size=80, num_hidden_layers=3)
    sd_legacy, _ = lemon_ext.expand_state_dict(on_disk, model.config, **kw)
    sd_v5, cfg_t = lemon_ext.expand_state_dict(dict(model.state_dict()), model.config, **kw)
    spelling = SourceSpelling(find_architecture({"model_type": "vit"}), sd_legacy)
    assert spelling.renamed  # the output keeps the source's spelling, new layer 2 included
    assert "vit.encoder.layer.2.attention.attention.query.weight" in sd_legacy
    by_table_name = {spelling.canonical[n]: t for n, t in sd_legacy.items()}
    assert by_table_name.keys() == sd_v5.keys()
    for name, t in sd_v5.items():  # same noise keys whatever the spelling
        assert torch.equal(by_table_name[name], t), name
    # and transformers loads the legacy-spelled output into the expanded class
    target = tf.ViTForImageClassification(cfg_t).double().eval()
    tf_state = {spelling.canonical[n]: t for n, t in sd_legacy.items()}
    target.load_state_dict(tf_state, strict=True)
    x = H.image_batch()
    assert H.relative_error(model(x).logits, target(x).logits) < 1e-10


def test_legacy_gamma_beta_names(tmp_path):
    """bert-base-uncased's pytorch_model.bin stores LayerNorm.gamma / .beta (transformers'
    'legacy' renames): read, expanded, written back as gamma / beta."""
    import transformers as tf

    model = H.build(tf.BertModel, H.bert_config())
    sd = {n.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): t
          for n, t in model.state_dict().items()}
    sd_t, _ = lemon_ext.expand_state_dict(sd, model.config, hidden_size=64, num_hidden_layers=3)
    assert "encoder.layer.2.output.LayerNorm.gamma" in sd_t
    assert not any(n.endswith("LayerNorm.weight") for n in sd_t)


def test_two_spellings_of_one_tensor_are_refused():
    import transformers as tf

    model = H.build(tf.BertModel, H.bert_config())
    sd = dict(model.state_dict())
    sd["embeddings.LayerNorm.gamma"] = sd["embeddings.LayerNorm.weight"]
    with pytest.raises(lemon_ext.LemonError, match="two spellings"):
        lemon_ext.expand_state_dict(sd, model.config, hidden_size=64)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_rotary_inv_freq_buffers_are_dropped_and_listed(kind):
    import transformers as tf

    cls, cfg = H.llama_family(kind if kind != "llama" else "gqa")
    model = H.build(cls, cfg)
    sd = dict(model.state_dict())
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    for i in range(cfg.num_hidden_layers):  # transformers < 4.31 saved one per layer
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq
    plan = lemon_ext.plan_expansion(cfg, source_shapes={n: t.shape for n, t in sd.items()}, hidden_size=64)
    assert [n for n, _ in plan.dropped] == [f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(2)]
    assert "dropped: model.layers.{i}.self_attn.rotary_emb.inv_freq (x2)" in str(plan)
    sd_t, cfg_t = lemon_ext.expand_state_dict(sd, cfg, hidden_size=64)
    assert not any("inv_freq" in n for n in sd_t)
    target = cls(cfg_t).double().eval()
    target.load_state_dict(sd_t, strict=True)
    x = H.token_batch()
    assert H.relative_error(model(x).logits, target(x).logits) < 1e-6
    assert isinstance(tf.PreTrainedModel, type)


def test_gpt2_as_openai_community_stores_it():
    """Prefix-less names, attn.bias / attn.masked_bias buffers, no lm_head, config.json without
    the tie flag or n_inner: the LM's function is kept (its tied head needs the 1/k final norm)."""
    import transformers as tf

    cfg = H.gpt2_config(n_inner=None)
    model = H.build(tf.GPT2LMHeadModel, cfg)
    sd = {n[len("transformer."):]: t for n, t in model.state_dict().items() if n.startswith("transformer.")}
    n = cfg.n_positions
    for i in range(cfg.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    cfg_json = {k: v for k, v in cfg.to_dict().items() if k not in ("tie_word_embeddings", "n_inner")}
    cfg_json["architectures"] = ["GPT2LMHeadModel"]
    sd_t, cfg_t = lemon_ext.expand_state_dict(sd, cfg_json, hidden_size=64, num_hidden_layers=3)
    weights = {n for n in sd if not n.endswith((".attn.bias", ".attn.masked_bias"))}
    assert set(sd_t) == weights | {n.replace("h.1.", "h.2.") for n in weights if n.startswith("h.1.")}
    assert "tie_word_embeddings" not in cfg_t and cfg_t["n_inner"] == 4 * 32  # FFN kept at 128
    target = tf.GPT2LMHeadModel(tf.GPT2Config(**cfg_t)).double().eval()
    info = target.load_state_dict({"transformer." + k: v for k, v in sd_t.items()}, strict=False)
    assert info.missing_keys == ["lm_head.weight"] and not info.unexpected_keys
    target.tie_weights()
    x = H.token_batch()
    assert H.relative_error(model(x).logits, target(x).logits) < 1e-10


def test_unknown_tensor_is_still_refused_by_name():
    import transformers as tf

    model = H.build(tf.GPT2Model, H.gpt2_config())
    sd = dict(model.state_dict())
    sd["h.0.attn.c_atn.weight"] = sd.pop("h.0.attn.c_attn.weight")
    with pytest.raises(lemon_ext.LemonError, match=r"'h\.0\.attn\.c_atn\.weight'"):
        lemon_ext.expand_state_dict(sd, model.config, hidden_size=64)


@pytest.mark.parametrize("tie", [False, True])
def test_llama_sequence_classification(tie):
    """The classifier layout (score.weight) is chosen by the checkpoint's names, also when the
    config's tie flag is set (a tied LM head is absent and must not win)."""
    import transformers as tf

    _, cfg = H.llama_family("gqa", num_labels=3, pad_token_id=0, tie_word_embeddings=tie)
    source = H.build(tf.LlamaForSequenceClassification, cfg)
    target = lemon_ext.expand_model(source, hidden_size=64, num_hidden_layers=3).double().eval()
    x = H.token_batch()
    assert H.relative_error(source(x).logits, target(x).logits) < 1e-10


def test_verify_default_tolerance_allows_the_noted_rounding(tmp_path):
    """--verify on a bf16 checkpoint grown to an indivisible width: the plan notes one rounding of
    the eta-scaled gains, and the default tolerance accounts for it (an integer width keeps 1e-3)."""
    import hub_forms as HF
    from lemon_ext.checkpoint import expand_checkpoint

    form = HF.make_tinyllama(str(tmp_path / "src"))
    report = expand_checkpoint(form.path, str(tmp_path / "x15"), hidden_size=48, num_attention_heads=6,
                               num_key_value_heads=3, verify=True, progress=False)
    v = report["verification"]
    assert v["passed"] and v["tolerance"] == 5e-2 and v["max_rel_error"] > 1e-3  # the rounding is real
    report = expand_checkpoint(form.path, str(tmp_path / "x2"), hidden_size=64, verify=True, progress=False)
    assert report["verification"]["passed"] and report["verification"]["tolerance"] == 1e-3
