"""sentence-transformers directories (``modules.json`` present): the module folders, widths rewritten.

A SentenceTransformer directory is a Hugging Face model at the root (the ``Transformer`` module,
path ``""``: the weights ``expand_checkpoint`` writes) plus one folder per further module listed in
``modules.json`` (``1_Pooling``, ``2_Dense``, ``3_Normalize``, ...). The top-level files
(``modules.json``, ``sentence_bert_config.json``, ``config_sentence_transformers.json``) hold no
width and are copied by ``report.copy_aux_files``; this module copies the folders, with the width
fields rewritten, so that ``SentenceTransformer(dst)`` loads and embeds like the source.

What the expansion does to the token embeddings (the transformer's last hidden state, already
through its last LayerNorm/RMSNorm): inside the model the residual stream is V_avg (k copies of x,
then r = D' - kD coordinates holding mean(x)), but the last norm maps that stream to
``E(y) = [y, ..., y (k copies), 0 (r zeros)]``: the tail is centred to exactly zero and its beta
is zero, and eta (the norm-gain factor) cancels the changed variance. Measured in float64: copies
equal y to 1e-15, tail |.| <= 2e-16, GPT-2 and Llama at 64 -> 96 and BERT at 64 -> 128
(tests/test_sentence_transformers.py checks it end to end at 64 -> 96). Hence:

* every pooling mode is per coordinate and maps 0 to 0, so pooled' = E(pooled) exactly:
  cls, mean, mean_sqrt_len_tokens, weightedmean, lasttoken **and max** (max over tokens of a
  zero coordinate is zero), at integer and indivisible widths alike; several modes concatenate
  one E-block each;
* Normalize: ||E(p)|| = sqrt(k)||p||, so the embedding is E(p)/(sqrt(k)||p||): its first D
  coordinates (of each block) are the source's embedding up to the factor 1/sqrt(k), and cosine
  similarity between two sentences is unchanged at every width; dot product and Euclidean
  distance of unnormalised embeddings scale by k and sqrt(k), Manhattan by k (sqrt(k) after
  Normalize): rankings unchanged, values not -> warned when ``similarity_fn_name`` is one of them;
* Dense reading an expanded embedding: its input columns become k copies of W/k and zero columns
  on the tail, so W'E(p) = Wp: output (width and values) unchanged, every later module untouched.
  Only for a bare encoder checkpoint (``architectures`` = ``*Model``): with a tied LM head the
  engine scales the final norm by 1/k. A Dense with an identity residual (in == out) is refused;
* ``truncate_dim`` keeps the first coordinates, i.e. the source's truncated embedding (scaled).

All of this assumes the transformer expansion itself is lossless; a Post-LN (BERT) model at an
indivisible width needs ``allow_lossy`` in the engine and then nothing is exact (the plan's notes
say so). Modules other than Transformer (at the root), Pooling, Dense, Normalize and Dropout
(LayerNorm, WordEmbeddings, CNN, LSTM, WeightedLayerPooling, Router, custom code, ...) are refused
before anything is written, with one line naming the folder and type.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

import torch

from .errors import CheckpointError
from .writer import os_error_line

log = logging.getLogger("lemon_ext.checkpoint")

MODULES_JSON = "modules.json"
#: Pooling modes of sentence_transformers (6.x names); all commute with E (see the docstring).
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
#: Legacy boolean keys (sentence-transformers < 5.x configs, e.g. all-MiniLM-L6-v2) -> mode.
_LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
#: Width fields of the Pooling config: old name, new name (both accepted by sentence-transformers).
_POOLING_WIDTH_KEYS = ("word_embedding_dimension", "embedding_dimension")
_SUPPORTED = ("Transformer", "Pooling", "Dense", "Normalize", "Dropout")
_DENSE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def is_sentence_transformers(src_dir) -> bool:
    """A sentence-transformers directory: ``modules.json`` beside the model."""
    return os.path.isfile(os.path.join(os.fspath(src_dir), MODULES_JSON))


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _write_json(path: str, data) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
    except OSError as e:
        raise CheckpointError(os_error_line(path, e)) from None


def _modules(src: str) -> list[dict]:
    path = os.path.join(src, MODULES_JSON)
    mods = _read_json(path)
    if not isinstance(mods, list) or not all(isinstance(m, dict) and isinstance(m.get("path"), str)
                                             and isinstance(m.get("type"), str) for m in mods):
        raise CheckpointError(f"{path}: expected a list of {{\"path\": ..., \"type\": ...}} entries")
    for m in mods:
        p = m["path"]
        if os.path.isabs(p) or ".." in p.replace("\\", "/").split("/"):
            raise CheckpointError(f"{path}: module path {p!r} is not a folder inside the model directory")
    return mods


def _kind(type_ref: str) -> str | None:
    """'sentence_transformers.models.Pooling' (or the 6.x module path) -> 'Pooling'; None for
    anything else, custom code included."""
    if not type_ref.startswith("sentence_transformers."):
        return None
    name = type_ref.rsplit(".", 1)[-1]
    return name if name in _SUPPORTED else None


def _pooling_modes(cfg: dict, where: str) -> tuple[str, ...]:
    """Active modes, the way sentence_transformers' Pooling.load_config reads them."""
    if "pooling_mode" in cfg:
        mode = cfg["pooling_mode"]
        modes = (mode,) if isinstance(mode, str) else tuple(mode or ())
    else:
        modes = tuple(m for key, m in _LEGACY_POOLING.items() if cfg.get(key, False)) or ("mean",)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad or not modes:
        raise CheckpointError(f"{where}: unknown pooling mode {bad[0] if bad else modes!r}")
    return modes


def _dense_weights(folder: str) -> str | None:
    for name in _DENSE_WEIGHTS:
        if os.path.isfile(os.path.join(folder, name)):
            return name
    return None


def _weight_shapes(path: str) -> dict | None:
    """Tensor shapes from a safetensors header (None for .bin: read when copying)."""
    if not path.endswith(".safetensors"):
        return None
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file
        raise CheckpointError(f"{path}: cannot read safetensors header ({e})") from None


def _bare_encoder(src: str) -> str | None:
    """None when config.json names only bare ``*Model`` classes, else the class at fault."""
    try:
        archs = _read_json(os.path.join(src, "config.json")).get("architectures") or []
    except (CheckpointError, AttributeError):
        archs = []
    if not archs:
        return "(no 'architectures' in config.json)"
    for a in archs:
        if not a.endswith("Model") or a.endswith("LMHeadModel"):
            return a
    return None


def _plan(src: str, d_s: int, d_t: int) -> tuple[list[dict], list[str]]:
    """One action per module of modules.json and the notes; CheckpointError on refusal.

    Follows the features dict through the pipeline: ``expanded[name]`` = number of E-blocks of
    width D that feature holds (token_embeddings: 1; Pooling's sentence_embedding: one per mode).
    """
    k, r = d_t // d_s, d_t % d_s
    mods = _modules(src)
    mj = os.path.join(src, MODULES_JSON)
    expanded: dict[str, int] = {}
    normalized: dict[str, bool] = {}
    actions: list[dict] = []
    names: list[str] = []
    for i, m in enumerate(mods):
        path, type_ref = m["path"], m["type"]
        kind = _kind(type_ref)
        folder = os.path.join(src, path)
        label = f"{os.path.join(src, path) if path else src} ({type_ref})"
        if kind is None:
            raise CheckpointError(
                f"{label}: sentence-transformers module not supported by lemon-expand (its width cannot be "
                f"rewritten; supported: Transformer at the root, Pooling, Dense, Normalize, Dropout)")
        if kind == "Transformer":
            if path != "" or i != 0:
                raise CheckpointError(
                    f"{label}: the Transformer module must be the first module, at the root (path \"\"), whose "
                    f"weights lemon-expand writes; here it is in {path!r}: expand that folder on its own")
            sb = os.path.join(src, "sentence_bert_config.json")
            out_name = "token_embeddings"
            if os.path.isfile(sb):
                out_name = _read_json(sb).get("module_output_name") or out_name
            expanded[out_name], normalized[out_name] = 1, False
            actions.append({"path": path, "kind": kind})
            names.append("Transformer")
            continue
        if path == "":
            raise CheckpointError(f"{label}: only the Transformer module may live at the root")
        if i == 0:
            raise CheckpointError(f"{mj}: the first module must be the Transformer at the root, not {type_ref}")
        present = os.path.isdir(folder)
        act = {"path": path, "kind": kind, "present": present}
        if kind == "Pooling" and "token_embeddings" not in expanded:  # after a per-token Dense: not widened
            expanded.pop("sentence_embedding", None)
            names.append("Pooling(unchanged)")
        elif kind == "Pooling":
            cfg_path = os.path.join(folder, "config.json")
            cfg = _read_json(cfg_path) if os.path.isfile(cfg_path) else None
            if cfg is None:
                raise CheckpointError(f"{cfg_path}: missing (the Pooling module's width and modes)")
            keys = [key for key in _POOLING_WIDTH_KEYS if key in cfg]
            if not keys:
                raise CheckpointError(f"{cfg_path}: no {' or '.join(_POOLING_WIDTH_KEYS)}")
            for key in keys:
                if cfg[key] != d_s:
                    raise CheckpointError(f"{cfg_path}: {key} is {cfg[key]}, the model's hidden_size is {d_s}")
            modes = _pooling_modes(cfg, cfg_path)
            act.update(config=cfg_path, width_keys=keys, modes=modes)
            expanded["sentence_embedding"], normalized["sentence_embedding"] = len(modes), False
            names.append(f"Pooling({'+'.join(modes)})")
        elif kind == "Dense":
            cfg_path = os.path.join(folder, "config.json")
            cfg = _read_json(cfg_path) if os.path.isfile(cfg_path) else None
            if cfg is None:
                raise CheckpointError(f"{cfg_path}: missing (the Dense module's in_features)")
            src_key = cfg.get("module_input_name") or "sentence_embedding"
            dst_key = cfg.get("module_output_name") or src_key
            blocks = expanded.get(src_key)
            if blocks:
                if cfg.get("in_features") != blocks * d_s:
                    raise CheckpointError(f"{cfg_path}: in_features is {cfg.get('in_features')}, its input "
                                          f"'{src_key}' has {blocks} x {d_s} = {blocks * d_s} features")
                if cfg.get("use_residual") and cfg.get("in_features") == cfg.get("out_features"):
                    raise CheckpointError(f"{cfg_path}: Dense with an identity residual (use_residual, in_features == "
                                          f"out_features) adds its {d_s}-wide input to its output: cannot be widened")
                bad = _bare_encoder(src)
                if bad is not None:
                    raise CheckpointError(
                        f"{cfg_path}: widening this Dense's input needs the scale of the transformer's last hidden "
                        f"state, known only for a bare encoder checkpoint (*Model), not {bad}")
                wname = _dense_weights(folder)
                if wname is None:
                    raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin for the Dense weights")
                shapes = _weight_shapes(os.path.join(folder, wname))
                if shapes is not None:
                    want = {"linear.weight": (cfg.get("out_features"), blocks * d_s)}
                    for name, shape in want.items():
                        if shapes.get(name) != shape:
                            raise CheckpointError(f"{os.path.join(folder, wname)}: '{name}' has shape "
                                                  f"{shapes.get(name)}, config.json implies {shape}")
                act.update(config=cfg_path, blocks=blocks, weights=wname)
                names.append(f"Dense({blocks * d_s}->{cfg.get('out_features')}, input widened)")
            else:
                names.append("Dense(unchanged)")
            expanded.pop(dst_key, None)
            normalized[dst_key] = False
        elif kind == "Normalize":
            cfg_path = os.path.join(folder, "config.json")
            cfg = _read_json(cfg_path) if os.path.isfile(cfg_path) else {}
            src_key = cfg.get("module_input_name") or "sentence_embedding"
            dst_key = cfg.get("module_output_name") or src_key
            if src_key in expanded:
                expanded[dst_key] = expanded[src_key]
            else:
                expanded.pop(dst_key, None)
            normalized[dst_key] = True
            names.append("Normalize")
        else:  # Dropout: the same width in and out
            names.append(kind)
        actions.append(act)
    if not actions or actions[0]["kind"] != "Transformer":
        raise CheckpointError(f"{mj}: no Transformer module at the root")

    notes = []
    blocks = expanded.get("sentence_embedding")
    chain = " -> ".join(names)
    width = f"{d_s} -> {d_t} (k={k}" + (f", r={r})" if r else ")")
    if blocks:
        notes.append(
            f"sentence-transformers {chain}: embedding width {blocks * d_s} -> {blocks * d_t}; "
            f"token embeddings are [y]*{k}" + (f" + {r} zeros" if r else "") + f" at {width}, every pooling "
            f"mode commutes: each block's first {d_s} coordinates are the source embedding"
            + (" / sqrt(k)" if normalized.get("sentence_embedding") and k > 1 else "")
            + "; cosine similarity unchanged (exact when the transformer expansion is lossless)")
    else:
        notes.append(f"sentence-transformers {chain}: embedding width unchanged, values equal the source's "
                     f"(exact up to rounding when the transformer expansion is lossless)")
    cst = os.path.join(src, "config_sentence_transformers.json")
    sim = (_read_json(cst).get("similarity_fn_name") if os.path.isfile(cst) else None) or "cosine"
    if blocks and k > 1 and sim != "cosine":
        norm = normalized.get("sentence_embedding", False)
        factor = {"dot": None if norm else "k", "euclidean": None if norm else "sqrt(k)",
                  "manhattan": "sqrt(k)" if norm else "k"}.get(sim, "?")
        if factor is not None:
            msg = (f"{cst}: similarity_fn_name '{sim}' on the widened embedding: scores are multiplied by "
                   f"{factor} = {k if factor == 'k' else round(k ** 0.5, 6)} (ranking unchanged, values not)")
            log.warning("%s", msg)
            notes.append("WARNING: " + msg)
    return actions, notes


def check_sentence_transformers(src_dir, src_hidden: int, tgt_hidden: int, allow_lossy: bool = False) -> list[str]:
    """Pre-flight (config files only, before any weight is written): the notes for the report, or
    CheckpointError (one line naming the module folder or file) for a directory whose modules
    cannot be carried to the new width. [] for a plain Hugging Face directory.

    ``allow_lossy`` is accepted for symmetry with the engine: no module refusal depends on it
    (every supported module stays exact when the transformer expansion is).
    """
    src = os.fspath(src_dir)
    if not is_sentence_transformers(src):
        return []
    _, notes = _plan(src, int(src_hidden), int(tgt_hidden))
    if allow_lossy and tgt_hidden % src_hidden:
        notes.append("sentence-transformers: allow_lossy at an indivisible width: exact only if the "
                     "transformer expansion is (not for Post-LN BERT)")
    return notes


def _widen_columns(w: torch.Tensor, blocks: int, d_s: int, d_t: int) -> torch.Tensor:
    """(out, blocks*d_s) -> (out, blocks*d_t): per block, k copies of W/k then r zero columns, so
    W' E(p) = W p for E(p) = [p]*k + zeros."""
    k = d_t // d_s
    parts = []
    for b in range(blocks):
        wb = w[:, b * d_s:(b + 1) * d_s].to(torch.float64) / k
        tail = torch.zeros(w.shape[0], d_t - k * d_s, dtype=torch.float64)
        parts.append(torch.cat([wb] * k + [tail], dim=1))
    return torch.cat(parts, dim=1).to(w.dtype).contiguous()


def _widen_dense(folder_src: str, folder_dst: str, act: dict, d_s: int, d_t: int) -> list[str]:
    """Rewrite the copied Dense folder: config in_features and weights (model.safetensors)."""
    from safetensors.torch import load_file, save_file
    blocks, wname = act["blocks"], act["weights"]
    wpath = os.path.join(folder_src, wname)
    try:
        sd = load_file(wpath) if wname.endswith(".safetensors") else torch.load(wpath, map_location="cpu",
                                                                                weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt weights: one line
        raise CheckpointError(f"{wpath}: cannot load the Dense weights ({str(e).splitlines()[0][:200]})") from None
    cfg = _read_json(act["config"])
    out = {}
    for name, t in sd.items():
        if name in ("linear.weight", "residual.weight"):
            if t.dim() != 2 or t.shape[1] != blocks * d_s:
                raise CheckpointError(f"{wpath}: '{name}' has shape {tuple(t.shape)}, expected (*, {blocks * d_s})")
            t = _widen_columns(t, blocks, d_s, d_t)
        out[name] = t.contiguous()
    if "linear.weight" not in out:
        raise CheckpointError(f"{wpath}: no 'linear.weight'")
    cfg["in_features"] = blocks * d_t
    for name in _DENSE_WEIGHTS:  # the widened weights replace whichever file the source had
        p = os.path.join(folder_dst, name)
        if os.path.lexists(p):
            os.remove(p)
    try:
        save_file(out, os.path.join(folder_dst, "model.safetensors"), metadata={"format": "pt"})
    except OSError as e:
        raise CheckpointError(os_error_line(os.path.join(folder_dst, "model.safetensors"), e)) from None
    _write_json(os.path.join(folder_dst, "config.json"), cfg)
    return ["config.json", "model.safetensors"]


def copy_sentence_transformers_modules(src_dir, dst_tmp_dir, src_hidden: int, tgt_hidden: int) -> list[str]:
    """Copy every module folder of ``modules.json`` (not the root Transformer: its files are the
    weights and configs written already) into ``dst_tmp_dir``, widths rewritten (Pooling's
    ``word_embedding_dimension``/``embedding_dimension``, Dense's ``in_features`` and weights).
    Returns the copied files as paths relative to the directory. The source is only read; a
    folder listed but absent in the source (``2_Normalize`` often is: it holds no file) stays
    absent. [] for a plain Hugging Face directory."""
    src, dst = os.fspath(src_dir), os.fspath(dst_tmp_dir)
    if not is_sentence_transformers(src):
        return []
    d_s, d_t = int(src_hidden), int(tgt_hidden)
    actions, _ = _plan(src, d_s, d_t)
    copied: list[str] = []
    for act in actions:
        if act["kind"] == "Transformer" or not act["present"]:
            continue
        fsrc, fdst = os.path.join(src, act["path"]), os.path.join(dst, act["path"])
        try:
            if os.path.lexists(fdst):  # a resumed run's earlier copy
                shutil.rmtree(fdst)
            shutil.copytree(fsrc, fdst, symlinks=False)  # follow links (Hub cache blobs)
        except OSError as e:
            raise CheckpointError(os_error_line(fdst, e)) from None
        if act["kind"] == "Pooling" and "width_keys" in act:
            cfg = _read_json(act["config"])
            for key in act["width_keys"]:
                cfg[key] = d_t
            _write_json(os.path.join(fdst, "config.json"), cfg)
        elif act["kind"] == "Dense" and "blocks" in act:
            _widen_dense(fsrc, fdst, act, d_s, d_t)
        for root, _, files in os.walk(fdst):
            for f in files:
                copied.append(os.path.relpath(os.path.join(root, f), dst).replace(os.sep, "/"))
    return sorted(copied)
