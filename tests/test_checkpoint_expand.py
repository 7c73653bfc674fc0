"""expand_checkpoint end to end on tiny Hugging Face models (in process: fast).

Inputs in every format (single safetensors, sharded safetensors, .bin, sharded .bin), tied and
untied heads; outputs compared byte for byte with ``expand_state_dict`` (same seed), loaded with
``from_pretrained`` and checked against the source in float64; every bad input gives one line.
"""
from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lemon_ext.checkpoint import CheckpointError, expand_checkpoint, verify_checkpoints
from lemon_ext.checkpoint.source import SourceCheckpoint
from lemon_ext.checkpoint.testing import make_tiny_llama
from lemon_ext.cli import main, verify_main
from lemon_ext.engine import expand_state_dict

SIZES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=3)
ARGS = ["--hidden-size", "64", "--intermediate-size", "128", "--num-attention-heads", "8",
        "--num-key-value-heads", "4", "--num-hidden-layers", "3", "--quiet"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tiny Llama checkpoints: same weights per tie setting, saved in each format."""
    root = tmp_path_factory.mktemp("src")
    out = {}
    for tied in (False, True):
        for fmt in ("safetensors", "sharded", "bin", "sharded_bin"):
            p = str(root / f"{fmt}-{'tied' if tied else 'untied'}")
            make_tiny_llama(p, fmt, tied=tied, seed=1)
            out[(fmt, tied)] = p
    return out


def read_output(path: str) -> dict:
    """All tensors of an output directory (any sharding)."""
    sd = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            sd.update(load_file(os.path.join(path, name)))
    return sd


def reference(src: str, seed: int = 0, **sizes):
    """expand_state_dict on the source tensors. A tied head that the checkpoint does not store is
    handed to the engine as the embedding (engine 80a2501 needs it) and dropped from the result."""
    with SourceCheckpoint(src) as s:
        sd = {n: s.get(n) for n in s.weight_map}
        cfg = s.config
    if cfg.get("tie_word_embeddings") and "lm_head.weight" not in sd:
        sd_t, cfg_t = expand_state_dict({**sd, "lm_head.weight": sd["model.embed_tokens.weight"]}, cfg,
                                        seed=seed, **sizes)
        del sd_t["lm_head.weight"]
        return sd_t, cfg_t
    return expand_state_dict(sd, cfg, seed=seed, **sizes)


@pytest.mark.parametrize("fmt,tied", [("safetensors", False), ("sharded", True), ("bin", False),
                                      ("sharded_bin", True), ("safetensors", True)])
def test_output_equals_expand_state_dict(sources, tmp_path, fmt, tied):
    src = sources[(fmt, tied)]
    dst = str(tmp_path / "dst")
    rep = expand_checkpoint(src, dst, **SIZES, seed=5, max_shard_size="60KB", progress=False)
    sd_ref, cfg_ref = reference(src, seed=5, **SIZES)
    got = read_output(dst)
    assert list(sorted(got)) == sorted(sd_ref)
    for k, v in sd_ref.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k].view(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
    assert ("lm_head.weight" in got) == (not tied)  # a tied head stays unstored, as in the source
    files = sorted(os.listdir(dst))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.load(open(os.path.join(dst, "model.safetensors.index.json")))
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in sd_ref.values()) == rep["total_size"]
    assert set(index["weight_map"]) == set(sd_ref)
    assert json.load(open(os.path.join(dst, "config.json"))) == json.loads(json.dumps(cfg_ref))
    assert {"generation_config.json", "README.md", "lemon_expansion.json"} <= set(files)
    assert not any(f.startswith(".") for f in os.listdir(tmp_path)), "temporary directory left behind"
    report = json.load(open(os.path.join(dst, "lemon_expansion.json")))
    from lemon_ext.checkpoint.hashing import hash_file
    assert {s["file"]: s["hash"]["digest"] for s in report["shards"]} == {
        s["file"]: hash_file(os.path.join(dst, s["file"]), s["hash"]["algorithm"]) for s in report["shards"]}
    assert sorted(s["file"] for s in report["shards"]) == shards
    assert {s["hash"]["algorithm"] for s in report["shards"]} == {"xxh3_128"}  # the default
    assert not any("sha256" in s for s in report["shards"]) and report["options"]["hash_algorithm"] == "xxh3_128"
    assert report["seed"] == 5 and report["source"]["format"] == ("bin" if "bin" in fmt else "safetensors")
    assert len(report["plan"]) == len(sd_ref) and "torch" in report["versions"]


def test_hash_sha256_gives_the_files_sha256_and_keeps_the_old_key(sources, tmp_path):
    """--hash sha256: each shard's report digest is hashlib.sha256 of the file (what the Hub shows),
    also under the older "sha256" key; same bytes as the default run; the model card names it."""
    import hashlib

    src = sources[("safetensors", False)]
    dst = str(tmp_path / "dst")
    assert main([src, dst, *ARGS, "--max-shard-size", "60KB", "--hash", "sha256"]) == 0
    report = json.load(open(os.path.join(dst, "lemon_expansion.json")))
    assert len(report["shards"]) > 1 and report["options"]["hash_algorithm"] == "sha256"
    for s in report["shards"]:
        sha = hashlib.sha256(open(os.path.join(dst, s["file"]), "rb").read()).hexdigest()
        assert s["hash"] == {"algorithm": "sha256", "digest": sha} and s["sha256"] == sha, s["file"]
    assert "sha256 digest of every shard" in open(os.path.join(dst, "README.md")).read()
    default = str(tmp_path / "default")
    expand_checkpoint(src, default, **SIZES, max_shard_size="60KB", progress=False)
    for s in report["shards"]:
        assert open(os.path.join(dst, s["file"]), "rb").read() == open(os.path.join(default, s["file"]), "rb").read()
    with pytest.raises(CheckpointError, match="hash algorithm 'md5'"):
        expand_checkpoint(src, str(tmp_path / "md5"), **SIZES, progress=False, hash_algorithm="md5")
    assert not os.path.exists(tmp_path / "md5")


def test_hash_option_choices_are_the_algorithms(capsys):
    """--hash spells out hashing.ALGORITHMS (cli.py imports nothing heavy for --help); default first."""
    from lemon_ext.checkpoint.hashing import ALGORITHMS, DEFAULT_ALGORITHM
    from lemon_ext.cli import _parser

    action = next(a for a in _parser()._actions if "--hash" in a.option_strings)
    assert tuple(action.choices) == ALGORITHMS and action.default == DEFAULT_ALGORITHM == "xxh3_128"
    assert "Hugging Face Hub" in action.help and "core-second per 2 GB" in action.help
    with pytest.raises(SystemExit) as e:
        main(["src", "dst", "--hash", "md5"])
    assert e.value.code == 2 and "invalid choice: 'md5'" in capsys.readouterr().err


@pytest.mark.parametrize("tied", [False, True])
def test_output_loads_and_reproduces_source_in_float64(sources, tmp_path, tied):
    src, dst = sources[("safetensors", tied)], str(tmp_path / "dst")
    expand_checkpoint(src, dst, **SIZES, progress=False)
    res = verify_checkpoints(src, dst, dtype=torch.float64)
    assert res["passed"] and res["compared"] == "logits" and res["max_rel_error"] < 1e-12, res
    assert verify_main([src, dst, "--dtype", "fp64", "--quiet"]) == 0


def test_verify_flag_records_result_and_bad_output_fails(sources, tmp_path, capsys):
    src, dst = sources[("safetensors", False)], str(tmp_path / "dst")
    assert main([src, dst, *ARGS, "--verify"]) == 0
    rep = json.load(open(os.path.join(dst, "lemon_expansion.json")))
    assert rep["verification"]["passed"] and rep["verification"]["max_rel_error"] < 1e-4
    # Damage one tensor of the output: lemon-verify exits 3 with one line.
    p = os.path.join(dst, "model.safetensors")
    sd = load_file(p)
    sd["model.layers.0.mlp.down_proj.weight"] += 0.5
    save_file(sd, p, metadata={"format": "pt"})
    capsys.readouterr()
    assert verify_main([src, dst]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("lemon-verify: error:") and "outputs differ" in err and "\n" not in err


def test_identical_bytes_across_shard_sizes_and_overwrite(sources, tmp_path):
    src = sources[("safetensors", False)]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    expand_checkpoint(src, a, **SIZES, max_shard_size="30KB", progress=False)
    expand_checkpoint(src, b, **SIZES, max_shard_size="5GB", progress=False)
    ta, tb = read_output(a), read_output(b)
    assert sorted(os.listdir(b)).count("model.safetensors") == 1
    assert set(ta) == set(tb) and all(torch.equal(ta[k].view(torch.uint8), tb[k].view(torch.uint8)) for k in ta)
    # Overwrite replaces the directory only when the new one is complete.
    with pytest.raises(Exception, match="already exists"):
        expand_checkpoint(src, b, **SIZES, progress=False)
    expand_checkpoint(src, b, **SIZES, max_shard_size="30KB", overwrite=True, progress=False)
    assert "model.safetensors" not in os.listdir(b)


@pytest.mark.parametrize("first_hash,resume_hash", [("xxh3_128", "xxh3_128"), ("sha256", "xxh3_128")])
def test_resume_after_interrupted_run(sources, tmp_path, monkeypatch, first_hash, resume_hash):
    """Finished shards are kept when their digest (with the record's own algorithm) matches; a
    resume with another --hash reports every shard, kept or rebuilt, in the algorithm it asks for."""
    from lemon_ext.checkpoint import writer as writer_mod
    from lemon_ext.checkpoint.hashing import hash_file

    src, dst = sources[("safetensors", False)], str(tmp_path / "dst")
    fresh = str(tmp_path / "fresh")
    expand_checkpoint(src, fresh, **SIZES, max_shard_size="30KB", progress=False)
    n_shards = len([f for f in os.listdir(fresh) if f.endswith(".safetensors")])
    closes = {"n": 0}
    real_close = writer_mod.ShardWriter.close

    def dying_close(self):
        out = real_close(self)
        closes["n"] += 1
        if closes["n"] == 3:
            raise KeyboardInterrupt  # killed right after the third shard was renamed into place
        return out

    monkeypatch.setattr(writer_mod.ShardWriter, "close", dying_close)
    with pytest.raises(KeyboardInterrupt):
        expand_checkpoint(src, dst, **SIZES, max_shard_size="30KB", progress=False, hash_algorithm=first_hash)
    assert not os.path.exists(dst)
    monkeypatch.setattr(writer_mod.ShardWriter, "close", real_close)
    tmp = os.path.join(str(tmp_path), ".dst.lemon-partial")
    done = sorted(f for f in os.listdir(tmp) if f.endswith(".safetensors"))
    assert len(done) == 3
    with open(os.path.join(tmp, done[1]), "r+b") as f:  # damage one finished shard
        f.seek(200)
        f.write(b"\xff\xff")
    opened = []
    real_init = writer_mod.ShardWriter.__init__

    def counting_init(self, directory, shard, *a, **k):
        opened.append(shard.filename)
        real_init(self, directory, shard, *a, **k)

    monkeypatch.setattr(writer_mod.ShardWriter, "__init__", counting_init)
    rep = expand_checkpoint(src, dst, **SIZES, max_shard_size="30KB", resume=True, progress=False,
                            hash_algorithm=resume_hash)
    # Shard 1 is kept; shard 2 (damaged) is rebuilt; shard 3 was renamed but its record was never
    # written (killed in between), so it is rebuilt too.
    assert done[0] not in opened and done[1] in opened and done[2] in opened
    assert len(opened) == n_shards - 1
    assert sum(s["resumed"] for s in rep["shards"]) == 1
    for s in rep["shards"]:
        assert s["hash"] == {"algorithm": resume_hash, "digest": hash_file(os.path.join(dst, s["file"]), resume_hash)}
        assert ("sha256" in s) == (resume_hash == "sha256")
    for f in os.listdir(fresh):
        if f.endswith(".safetensors") or f in ("model.safetensors.index.json", "config.json"):
            assert open(os.path.join(fresh, f), "rb").read() == open(os.path.join(dst, f), "rb").read(), f


def _break(kind: str, src: str, tmp_path) -> tuple[str, list, str]:
    """Copy ``src`` and damage it; return (broken dir, extra CLI args, text the error must name)."""
    d = str(tmp_path / f"bad-{kind}")
    shutil.copytree(src, d)
    args: list = []
    st = os.path.join(d, "model.safetensors")
    if kind == "truncated":
        with open(st, "r+b") as f:
            f.truncate(os.path.getsize(st) - 100)
        return d, args, "model.safetensors: truncated"
    if kind == "corrupt_header":
        with open(st, "r+b") as f:
            f.seek(8)
            f.write(b"\x00garbage")
        return d, args, "corrupt safetensors header"
    if kind == "index_missing_file":
        os.remove(os.path.join(d, sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[-1]))
        return d, args, "index names missing file"
    if kind in ("missing_tensor", "unexpected_tensor", "shape"):
        sd = load_file(st)
        if kind == "missing_tensor":
            del sd["model.layers.1.mlp.up_proj.weight"]
            name = "model.layers.1.mlp.up_proj.weight"
        elif kind == "unexpected_tensor":
            sd["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
            name = "model.layers.0.mlp.extra.weight"
        else:
            sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(65, 32)
            name = "model.layers.1.mlp.up_proj.weight"
        save_file(sd, st, metadata={"format": "pt"})
        return d, args, name
    if kind == "config_disagrees":
        cfg = json.load(open(os.path.join(d, "config.json")))
        cfg["intermediate_size"] = 80
        json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
        return d, args, "the config implies"
    if kind == "unsupported_arch":
        cfg = json.load(open(os.path.join(d, "config.json")))
        cfg["model_type"], cfg["architectures"] = "t5", ["T5Model"]
        json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
        return d, args, "unknown model_type 't5'"
    if kind == "impossible_size":
        return d, ["--hidden-size", "16"], "hidden"
    if kind == "bad_bin":
        os.remove(st)
        with open(os.path.join(d, "pytorch_model.bin"), "wb") as f:
            f.write(b"PK\x03\x04garbage")
        return d, args, "pytorch_model.bin: cannot load"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated", "corrupt_header", "index_missing_file", "missing_tensor",
                                  "unexpected_tensor", "shape", "config_disagrees", "impossible_size", "bad_bin",
                                  "unsupported_arch"])
def test_bad_input_is_one_line_and_no_output(sources, tmp_path, capsys, kind):
    src = sources[("sharded" if kind == "index_missing_file" else "safetensors", False)]
    bad, extra, must_name = _break(kind, src, tmp_path)
    dst = str(tmp_path / "dst")
    args = [bad, dst, *ARGS]
    if extra:
        args = [bad, dst, *extra, "--quiet"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lemon-expand: error:") and "\n" not in err and "Traceback" not in err, err
    assert must_name in err, err
    assert not os.path.exists(dst) and not os.path.exists(os.path.join(str(tmp_path), ".dst.lemon-partial"))


def test_disk_full_is_one_line_and_no_output(sources, tmp_path, capsys, monkeypatch):
    from lemon_ext.checkpoint import writer as writer_mod

    src, dst = sources[("safetensors", False)], str(tmp_path / "dst")
    real = writer_mod.ShardWriter._emit
    state = {"n": 0}

    def filling(self, buf):
        state["n"] += 1
        if state["n"] > 6:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, buf)

    monkeypatch.setattr(writer_mod.ShardWriter, "_emit", filling)
    assert main([src, dst, *ARGS, "--max-shard-size", "30KB"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no space left on device" in err and "model-0000" in err and "\n" not in err
    assert not os.path.exists(dst)
    tmp = os.path.join(str(tmp_path), ".dst.lemon-partial")
    assert not [f for f in os.listdir(tmp) if f.endswith(".partial")]  # the half-written shard is gone
    assert "config.json" not in os.listdir(tmp)  # nothing there looks like a finished model


def test_existing_dst_and_dst_inside_src_refused(sources, tmp_path, capsys):
    src = sources[("safetensors", False)]
    dst = tmp_path / "dst"
    dst.mkdir()
    assert main([src, str(dst), *ARGS]) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    assert main([src, os.path.join(src, "out"), *ARGS]) == 2
    assert "must not be the source" in capsys.readouterr().err


def test_dry_run_reads_no_weights_and_lists_every_error(sources, tmp_path, capsys, monkeypatch):
    from lemon_ext.checkpoint import safetensors_format, source

    def no_reads(*a, **k):
        raise AssertionError("a weight was read during --dry-run")

    monkeypatch.setattr(safetensors_format, "read_into", no_reads)
    monkeypatch.setattr(source, "read_into", no_reads)
    monkeypatch.setattr(source, "read_tensor", no_reads)
    src = sources[("sharded", True)]
    capsys.readouterr()
    assert main([src, str(tmp_path / "dst"), *ARGS, "--dry-run", "--max-shard-size", "100KB"]) == 0
    out = capsys.readouterr().out
    for text in ("model.embed_tokens.weight", "layers 2->3", "bytes to write", "shard(s)", "peak host RSS",
                 "time: about", "parameters"):
        assert text in out, text
    # Several problems at once: all are reported, nothing is written.
    bad, _, _ = _break("missing_tensor", sources[("safetensors", False)], tmp_path)
    (tmp_path / "exists").mkdir()
    assert main([bad, str(tmp_path / "exists"), "--hidden-size", "64", "--dry-run", "--dtype", "int3"]) == 2
    err = capsys.readouterr().err
    assert "int3" in err and "missing from the source" in err and "already exists" in err
    assert os.listdir(tmp_path / "exists") == []


@pytest.mark.parametrize("family", ["bert_base", "gpt2_tied"])
def test_other_families_load_and_reproduce(tmp_path, family):
    """A base model (BertModel, Post-LN: last_hidden_state[..., :D_S] + pooler compared) and GPT-2
    (Conv1D weights stored (in, out), tied head): reload with transformers, equal in float64."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if family == "bert_base":
        model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32))
        sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4)
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                           bos_token_id=0, eos_token_id=0))
        sizes = dict(hidden_size=64, num_hidden_layers=3)
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    model.eval().save_pretrained(src)
    expand_checkpoint(src, dst, **sizes, progress=False)
    res = verify_checkpoints(src, dst, dtype=torch.float64)
    assert res["passed"] and res["max_rel_error"] < 1e-12, res
    assert res["compared"].startswith("last_hidden_state" if family == "bert_base" else "logits")


def test_failed_verification_exits_3_and_leaves_no_dst(sources, tmp_path, capsys, monkeypatch):
    from lemon_ext.checkpoint import verify as verify_mod

    monkeypatch.setattr(verify_mod, "verify_checkpoints", lambda *a, **k: {
        "passed": False, "max_rel_error": 0.5, "tolerance": 1e-3, "compared": "logits"})
    dst = str(tmp_path / "dst")
    assert main([sources[("safetensors", False)], dst, *ARGS, "--verify"]) == 3
    err = capsys.readouterr().err.strip()
    assert "verification failed" in err and "\n" not in err
    assert not os.path.exists(dst)


def test_dtype_option_casts_and_rewrites_config(sources, tmp_path):
    src, dst = sources[("safetensors", False)], str(tmp_path / "dst")
    expand_checkpoint(src, dst, **SIZES, dtype="bf16", progress=False)
    with SourceCheckpoint(src) as s:
        sd = {n: s.get(n) for n in s.weight_map}
    ref, _ = expand_state_dict(sd, s.config, dtype=torch.bfloat16, **SIZES)
    got = read_output(dst)
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], ref[k]) for k in ref)
    assert json.load(open(os.path.join(dst, "config.json")))["dtype"] == "bfloat16"


@pytest.mark.parametrize("tied", [False, True])
def test_pipelined_state_dict_equals_expand_state_dict(tied):
    """The pipeline entry point for in-memory state dicts (the engine's large-sd/GPU path)."""
    from transformers import LlamaForCausalLM

    from lemon_ext.checkpoint.testing import tiny_llama_config
    from lemon_ext.engine.api import expand_state_dict_pipelined

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tied=tied))
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    ref, cfg_ref = expand_state_dict(sd, model.config.to_dict(), seed=3, **SIZES)
    got, cfg_got = expand_state_dict_pipelined(sd, model.config.to_dict(), seed=3, device="cpu", **SIZES)
    assert list(got) == list(ref) and all(torch.equal(got[k], ref[k]) for k in ref) and cfg_got == cfg_ref
