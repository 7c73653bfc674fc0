"""Check an expanded model against its source: load both with transformers, compare on probes.

What is compared (the rule that holds whatever the head):
- ``logits`` when the model has a head (LM, masked LM, classifier): target equals source.
- otherwise ``last_hidden_state``: the target's first D_S channels equal the source's up to one
  scalar (a tied-head expansion scales the final norm by 1/k), fitted by least squares; and
  ``pooler_output[..., :D_S]`` when present (replicated pooler units: equal).
Error = max |t - c*s| / max |s| (relative to the output's scale).
"""
from __future__ import annotations

import json
import logging
import os

import torch

from .errors import CheckpointError

log = logging.getLogger("lemon_ext.checkpoint")

#: fp32 default: lossless splits agree to fp32 rounding (~1e-6 measured on tiny models); an
#: indivisible width or a 1/k tied scale in bf16 storage adds one rounding of the norm gains (2^-8).
DEFAULT_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-9}


def _model_class(path: str):
    import transformers

    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    for name in cfg.get("architectures") or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def load_model(path: str, dtype: torch.dtype = torch.float32):
    """from_pretrained with the config's architecture class, in ``dtype``, eval mode, on CPU."""
    from transformers.utils import logging as hf_logging

    cls = _model_class(path)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its per-load bars would break the one-line output
    try:
        try:
            model = cls.from_pretrained(path, dtype=dtype)
        except TypeError:  # transformers < 4.56 calls it torch_dtype
            model = cls.from_pretrained(path, torch_dtype=dtype)
    except Exception as e:  # noqa: BLE001 - any loader failure is one line
        raise CheckpointError(f"{path}: transformers cannot load the model ({str(e).splitlines()[0][:200]})") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model.eval()


def probe_inputs(model, batch: int = 2, seq: int = 16, seed: int = 0) -> dict:
    """Deterministic probe inputs for the model's main input (token ids or pixels)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    name = getattr(model, "main_input_name", "input_ids")
    if name == "pixel_values":
        size, ch = cfg.image_size, getattr(cfg, "num_channels", 3)
        return {"pixel_values": torch.randn(batch, ch, size, size, generator=g).to(model.dtype)}
    vocab = int(getattr(cfg, "vocab_size", 1000))
    seq = min(seq, int(getattr(cfg, "max_position_embeddings", seq) or seq))
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _rel(t: torch.Tensor, s: torch.Tensor, fit_scale: bool) -> tuple[float, float]:
    t, s = t.double(), s.double()
    c = 1.0
    if fit_scale:
        denom = float((s * s).sum())
        c = float((t * s).sum()) / denom if denom > 0 else 1.0
    err = float((t - c * s).abs().max()) if t.numel() else 0.0
    return err / max(float(s.abs().max()) if s.numel() else 0.0, 1e-30), c


def compare(out_s, out_t, d_s: int) -> tuple[float, str, float]:
    """(relative error, what was compared, fitted scale) for two model outputs."""
    logits_s = getattr(out_s, "logits", None)
    if logits_s is not None:
        err, _ = _rel(out_t.logits, logits_s, fit_scale=False)
        return err, "logits", 1.0
    err, c = _rel(out_t.last_hidden_state[..., :d_s], out_s.last_hidden_state, fit_scale=True)
    what = "last_hidden_state[..., :D_S] (scale fitted)"
    pooled_s = getattr(out_s, "pooler_output", None)
    if pooled_s is not None and getattr(out_t, "pooler_output", None) is not None:
        perr, _ = _rel(out_t.pooler_output[..., : pooled_s.shape[-1]], pooled_s, fit_scale=False)
        err = max(err, perr)
        what += " + pooler_output[..., :D_S]"
    return err, what, c


def verify_checkpoints(src: str, dst: str, *, tolerance: float | None = None,
                       dtype: torch.dtype = torch.float32, batch: int = 2, seq: int = 16, seed: int = 0) -> dict:
    """Load both models in ``dtype``, run the same probe inputs, return the comparison record.

    Returns {"passed", "max_rel_error", "tolerance", "compared", "scale", "dtype", "inputs"}.
    """
    tol = DEFAULT_TOLERANCE.get(dtype, 1e-3) if tolerance is None else float(tolerance)
    model_s = load_model(src, dtype)
    model_t = load_model(dst, dtype)
    inputs = probe_inputs(model_s, batch, seq, seed)
    with torch.no_grad():
        out_s = model_s(**inputs)
        out_t = model_t(**inputs)
    d_s = int(getattr(model_s.config, "hidden_size", 0) or getattr(model_s.config, "n_embd", 0))
    err, what, scale = compare(out_s, out_t, d_s)
    return {"passed": bool(err <= tol), "max_rel_error": err, "tolerance": tol, "compared": what,
            "scale": scale, "dtype": str(dtype).replace("torch.", ""),
            "inputs": {k: list(v.shape) for k, v in inputs.items()}}
