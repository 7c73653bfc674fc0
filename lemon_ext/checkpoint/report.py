"""The non-weight files of the output: config, copied tokenizer/generation files, model card, report."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil

import torch

from .errors import CheckpointError
from .hashing import DEFAULT_ALGORITHM, SHA256
from .writer import os_error_line

#: Files never copied from the source: weights, indexes, and files we write ourselves.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_OWN_FILES = {"config.json", "README.md", "lemon_expansion.json", "model.safetensors.index.json",
              "pytorch_model.bin.index.json"}


def copy_aux_files(src: str, dst: str) -> list[str]:
    """Copy tokenizer, generation config and other small top-level non-weight files; return names.

    Sub-directories are not copied (sentence-transformers pooling configs etc. describe the
    source's width and would be stale).
    """
    copied = []
    for name in sorted(os.listdir(src)):
        full = os.path.join(src, name)
        if (not os.path.isfile(full) or name in _OWN_FILES or name.startswith(".")
                or name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json")):
            continue
        try:
            shutil.copyfile(full, os.path.join(dst, name))
        except OSError as e:
            raise CheckpointError(os_error_line(os.path.join(dst, name), e)) from None
        copied.append(name)
    return copied


def versions() -> dict:
    """Versions that determine the output bytes (recorded in the report)."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        from .. import __version__ as lemon_version
        out["lemon_ext"] = lemon_version
    except ImportError:  # pragma: no cover
        pass
    # Installed versions from package metadata, not by importing: importing transformers for its
    # version took 1.2 s of a 6.3 s lemon-expand run (0.4 -> 1.89 GB, 2-core dev VM).
    for dist in ("safetensors", "transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def shard_hash_fields(algorithm: str, digest: str) -> dict:
    """A shard's digest as the report (``lemon_expansion.json``) lists it:
    ``{"hash": {"algorithm": ..., "digest": ...}}``, plus the older ``"sha256": digest`` key when the
    algorithm is sha256, so tools that read that key keep working."""
    fields = {"hash": {"algorithm": algorithm, "digest": digest}}
    if algorithm == SHA256:
        fields["sha256"] = digest
    return fields


def plan_rows(plan, dtypes: dict) -> list[dict]:
    """One JSON row per target tensor: name, source, shapes, dtype, role, rule."""
    return [{"name": s.name, "source": s.source, "source_shape": list(s.source_shape),
             "target_shape": list(s.target_shape), "dtype": str(dtypes[s.name]).replace("torch.", ""),
             "role": s.role, "rule": s.rule} for s in plan.specs]


def model_card(report: dict) -> str:
    """README.md for the expanded model: what it is, how it was made, how to check it."""
    p = report["plan_summary"]
    ver = report.get("verification") or {}
    vline = (f"Verified: {ver.get('passed')} (max relative error {ver.get('max_rel_error'):.3g} on "
             f"{ver.get('compared')})" if ver else "Not verified at expansion time: run `lemon-verify SRC DST`.")
    algorithm = report["options"].get("hash_algorithm", DEFAULT_ALGORITHM)
    digest_line = (f"the {algorithm} digest of every shard (the one the Hugging Face Hub shows for the file)"
                   if algorithm == SHA256 else
                   f"the {algorithm} digest of every shard (`lemon-expand --hash sha256` gives the one the "
                   f"Hugging Face Hub shows)")
    return f"""---
tags:
- lemon
- model-expansion
---

# Expanded with lemon_ext (LEMON, lossless model expansion)

This model was grown from `{report['source']['path']}` with `lemon-expand` (LEMON: Lossless Model
Expansion, Wang et al., ICLR 2024). Its outputs equal the source model's (see the tolerance notes in
`lemon_expansion.json`) until it is trained further; train it with the LEMON schedule (same peak
learning rate and warmup as training from scratch, decay compressed to the shorter budget).

| | source | target |
|---|---|---|
| parameters | {p['num_parameters_source']:,} | {p['num_parameters_target']:,} |
| hidden size | {p['hidden'][0]} | {p['hidden'][1]} |
| intermediate size | {p['ffn'][0]} | {p['ffn'][1]} |
| attention heads | {p['heads'][0]} | {p['heads'][1]} |
| key/value heads | {p['kv_heads'][0]} | {p['kv_heads'][1]} |
| layers | {p['layers'][0]} | {p['layers'][1]} |

Seed {report['seed']}, symmetry breaking `{report['options'].get('symmetry_breaking')}`, depth placement
`{report['options'].get('depth_placement')}`. {vline}

The full plan (each tensor's source, shapes and rule), versions and {digest_line} are in
`lemon_expansion.json`.
"""


def write_text(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise CheckpointError(os_error_line(path, e)) from None


def write_config(path: str, cfg: dict) -> None:
    """config.json the way transformers writes it (sorted keys, indent 2)."""
    write_text(path, json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
