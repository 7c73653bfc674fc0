"""Layers point down only: ``errors``, ``ops`` <- ``execution`` <- ``engine`` <- ``checkpoint``.

Importing the engine, and expanding a state dict on any device (the host-to-GPU route included),
never imports ``lemon_ext.checkpoint``; the engine's errors are the engine's (not the CLI's
``--dtype`` wording).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lemon_ext.errors import LemonError

transformers = pytest.importorskip("transformers")

PKG = Path(__file__).resolve().parents[1] / "lemon_ext"

#: package -> packages it must never import (at module level or lazily inside a function)
FORBIDDEN = {
    "lemon_ext.errors": ("lemon_ext.checkpoint", "lemon_ext.engine", "lemon_ext.execution"),
    "lemon_ext.ops": ("lemon_ext.checkpoint", "lemon_ext.engine", "lemon_ext.execution"),
    "lemon_ext.arch": ("lemon_ext.checkpoint",),
    "lemon_ext.execution": ("lemon_ext.checkpoint", "lemon_ext.engine"),
    "lemon_ext.engine": ("lemon_ext.checkpoint",),
}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, root: Path = PKG) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in the file, nested ones included."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            found.append((node.lineno, mod))
            found += [(node.lineno, f"{mod}.{a.name}") for a in node.names]  # from .. import checkpoint
    return found


def _files(package: str) -> list[Path]:
    path = PKG.parent.joinpath(*package.split("."))
    return sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_a_layer_above(package):
    files = _files(package)
    assert files and all(f.exists() for f in files), package
    bad = [f"{f.relative_to(PKG.parent)}:{line}: imports {mod}" for f in files for line, mod in _imports(f)
           if any(mod == up or mod.startswith(up + ".") for up in FORBIDDEN[package])]
    assert not bad, "\n".join(bad)


def test_the_static_check_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "lemon_ext" / "engine"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("def f():\n    from ..checkpoint.state_dict import g\n    from .. import checkpoint\n")
    mods = [m for _, m in _imports(pkg / "x.py", tmp_path / "lemon_ext")]
    assert "lemon_ext.checkpoint.state_dict" in mods and "lemon_ext.checkpoint" in mods


_SUBPROCESS = r"""
import sys

import torch
import transformers

import lemon_ext.engine
from lemon_ext.engine import api, expand_state_dict
from lemon_ext.errors import LemonError

assert "lemon_ext.checkpoint" not in sys.modules, "import lemon_ext.engine"
transformers.logging.set_verbosity_error()
torch.manual_seed(0)
models = {
    "gpt2": (transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)),
        dict(hidden_size=32, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2)),
    "llama": (transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=1, tie_word_embeddings=False)),
        dict(hidden_size=32, intermediate_size=64, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=2)),
}
routed = []
real_run_specs = api.run_specs


def run_specs_here(specs, fetch, sink, **kw):
    # without a GPU the host-to-GPU route runs the same pipeline with its kernels on CPU
    routed.append(kw["device"])
    if not torch.cuda.is_available():
        kw["device"] = "cpu"
    return real_run_specs(specs, fetch, sink, **kw)


api.run_specs = run_specs_here
for arch, (model, sizes) in models.items():
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    cfg = model.config.to_dict()
    ref, cfg_ref = expand_state_dict(sd, cfg, seed=3, **sizes)
    for how in ("device=None", "device='cpu'", "device='cuda'", "pipelined cpu"):
        n = len(routed)
        if how == "pipelined cpu":
            got, cfg_got = api.expand_state_dict_pipelined(sd, cfg, seed=3, device="cpu", **sizes)
        else:
            got, cfg_got = expand_state_dict(sd, cfg, seed=3, device=eval(how.split("=")[1]), **sizes)
        assert len(routed) == n + (how in ("device='cuda'", "pipelined cpu")), (arch, how, routed)
        assert list(got) == list(ref) and cfg_got == cfg_ref, (arch, how)
        for k in ref:
            assert got[k].device.type == "cpu" and torch.equal(got[k], ref[k]), (arch, how, k)
        assert "lemon_ext.checkpoint" not in sys.modules, (arch, how)
    try:
        expand_state_dict(sd, cfg, device="cuda", dtype="int3", **sizes)
    except LemonError as e:
        assert str(e).startswith("dtype='int3': use one of "), e
    else:
        raise AssertionError("dtype='int3' accepted")
assert "lemon_ext.checkpoint" not in sys.modules, "an error path"
print("ok", sorted(m for m in sys.modules if m.startswith("lemon_ext.")))
"""


def test_engine_never_imports_the_checkpoint_tool():
    res = subprocess.run([sys.executable, "-c", _SUBPROCESS], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert res.stdout.startswith("ok") and "lemon_ext.execution.pipeline" in res.stdout, res.stdout


@pytest.fixture(scope="module")
def tiny_llama():
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=1))
    return {k: v.detach() for k, v in model.state_dict().items()}, model.config.to_dict()


@pytest.mark.parametrize("device", [None, "cpu", "cuda"])
def test_engine_dtype_error_is_the_engines_on_every_route(tiny_llama, device):
    """device="cuda" on a host state dict takes the pipelined route: still the engine's wording."""
    from lemon_ext.engine import expand_state_dict

    sd, cfg = tiny_llama
    with pytest.raises(LemonError, match=r"^dtype='int3': use one of .*bf16") as info:
        expand_state_dict(sd, cfg, device=device, dtype="int3", hidden_size=32)
    assert "--dtype" not in str(info.value) and type(info.value) is LemonError


def test_pipelined_route_dtype_error_and_cli_wording(tiny_llama):
    from lemon_ext.checkpoint.errors import CheckpointError
    from lemon_ext.checkpoint.expand import resolve_dtype as cli_resolve_dtype
    from lemon_ext.engine.api import expand_state_dict_pipelined

    sd, cfg = tiny_llama
    with pytest.raises(LemonError, match=r"^dtype='int3': use one of ") as info:
        expand_state_dict_pipelined(sd, cfg, device="cpu", dtype="int3", hidden_size=32)
    assert type(info.value) is LemonError
    with pytest.raises(CheckpointError, match=r"^--dtype int3: use one of "):  # the command line's
        cli_resolve_dtype("int3")
    assert expand_state_dict_pipelined(sd, cfg, device="cpu", dtype="bf16", hidden_size=32)[0]["lm_head.weight"].dtype \
        == torch.bfloat16
