"""expand_state_dict / expand_model: the public entry points of the engine."""
from __future__ import annotations

from collections import Counter

import torch

from ..errors import LemonError
from ..execution import run_specs
from .plan import plan_expansion


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}


def resolve_dtype(dtype) -> torch.dtype | None:
    """None, a torch.dtype, or a name ('bf16', 'float32', 'torch.bfloat16', ...)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "").lower()
    if key not in DTYPES:
        raise LemonError(f"dtype={dtype!r}: use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[key]


def expand_state_dict(
    sd_s: dict[str, torch.Tensor],
    cfg_s,
    *,
    seed: int = 0,
    backend: str = "auto",
    dtype=None,
    device=None,
    **sizes_and_options,
):
    """Expand a source state dict losslessly (LEMON). The inputs are never modified.

    Args:
        sd_s: source tensors by name (the model's ``state_dict()`` or a checkpoint's tensors).
        cfg_s: transformers config or config.json dict.
        seed: noise seed (same seed -> identical tensors on every backend).
        backend: "auto", "torch", "cpu", "cuda" or "triton" (see ``lemon_ext.ops.backends()``).
        dtype: output dtype (default: each source tensor's own).
        device: where to compute (default: each source tensor's device). A host state dict with
            ``device="cuda"`` streams through the GPU and comes back to the host, so a 7B model
            never needs to fit on the GPU; otherwise tensors are returned on ``device``.
        **sizes_and_options: hidden_size, intermediate_size, num_attention_heads,
            num_key_value_heads, num_hidden_layers, moe_intermediate_size,
            shared_expert_intermediate_size, symmetry_breaking, depth_placement,
            allow_lossy (see ``plan_expansion``).
    Returns:
        (sd_t, cfg_t): target tensors (target order) and the target config (same type as cfg_s).
    """
    if not isinstance(sd_s, dict):
        raise LemonError(f"expand_state_dict takes a dict of tensors, got {type(sd_s).__name__}")
    if _host_to_gpu(sd_s, device):
        # Many GB on the host, computed on a GPU: tensors go up, expand and come back through
        # pinned buffers while the next one loads (the streaming pipeline, lemon_ext.execution).
        return expand_state_dict_pipelined(sd_s, cfg_s, seed=seed, dtype=dtype, device=device,
                                           backend=backend, output_device="cpu", **sizes_and_options)
    shapes = {name: tuple(t.shape) for name, t in sd_s.items()}
    plan = plan_expansion(cfg_s, seed=seed, source_shapes=shapes, **sizes_and_options)
    plan.check_source(shapes)
    out_dtype = resolve_dtype(dtype)
    sd_t = {}
    for spec in plan.specs:
        source = sd_s[spec.source] if spec.source is not None else None
        sd_t[spec.name] = spec.execute(source, seed=seed, dtype=out_dtype or _dtype_of(source, sd_s),
                                       device=device, backend=backend)
    return sd_t, plan.target_config


def expand_state_dict_pipelined(sd_s: dict, cfg_s, *, seed: int = 0, dtype=None, device="auto",
                                backend: str = "auto", output_device="cpu", **sizes_and_options):
    """``expand_state_dict`` through the bounded pipeline (``lemon_ext.execution.run_specs``), for
    host state dicts of many GB on a GPU; ``expand_state_dict(sd, cfg, device="cuda")`` on a host
    state dict comes here.

    Same tensors as ``expand_state_dict`` (same seed, same dtype rule), returned on
    ``output_device`` (host by default). On CUDA, sources are staged through pinned buffers and
    read, host-to-device copy, kernel and device-to-host copy of different tensors overlap (its
    orchestration is tested on CPU against a stand-in for the CUDA calls,
    tests/test_checkpoint_cuda_pipeline.py). On CPU it is the plain loop with a reader and a
    writer thread. ``device="auto"``: the current CUDA device when one is present, else CPU.
    Returns (sd_t, cfg_t).
    """
    if not isinstance(sd_s, dict):
        raise LemonError(f"expand_state_dict takes a dict of tensors, got {type(sd_s).__name__}")
    shapes = {n: tuple(t.shape) for n, t in sd_s.items()}
    plan = plan_expansion(cfg_s, seed=seed, source_shapes=shapes, **sizes_and_options)
    plan.check_source(shapes)
    out_dtype = resolve_dtype(dtype)
    synthetic = synthetic_dtype(t.dtype for t in sd_s.values())  # expand_state_dict's rule (_dtype_of)
    dtypes = {s.name: out_dtype or (sd_s[s.source].dtype if s.source is not None else synthetic) for s in plan.specs}
    sd_t: dict = {}
    run_specs(plan.specs, sd_s.__getitem__, lambda spec, t: sd_t.__setitem__(spec.name, t), device=device,
              seed=seed, dtype=dtypes, backend=backend, copy_out=True, output_device=output_device,
              source_dtypes={n: t.dtype for n, t in sd_s.items()})
    return sd_t, plan.target_config


def _host_to_gpu(sd_s: dict, device) -> bool:
    if device is None or torch.device(device).type != "cuda":
        return False
    return all(t.device.type == "cpu" for t in sd_s.values())


def synthetic_dtype(dtypes) -> torch.dtype:
    """dtype of tensors built from constants (Post-LN identity norms): the checkpoint's most
    common float dtype (float32 if it has none)."""
    floats = [d for d in dtypes if d.is_floating_point]
    return Counter(floats).most_common(1)[0][0] if floats else torch.float32


def _dtype_of(source, sd_s) -> torch.dtype:
    if source is not None:
        return source.dtype
    return synthetic_dtype(t.dtype for t in sd_s.values())


def expand_model(model_s, **kwargs):
    """Expand a Hugging Face model: same class out, weights loaded strictly, source untouched.

    A ``torch.compile``d model is expanded through its original module (its state-dict names
    carry a ``_orig_mod.`` prefix); the result is not compiled: compile it again.
    """
    model_s = getattr(model_s, "_orig_mod", model_s)
    config = getattr(model_s, "config", None)
    if config is None:
        raise LemonError("expand_model takes a transformers PreTrainedModel (it has no .config)")
    sd_s = {k: v.detach() for k, v in model_s.state_dict().items()}
    sd_t, cfg_t = expand_state_dict(sd_s, config, **kwargs)
    from transformers.initialization import no_init_weights

    dtype = next(iter(sd_t.values())).dtype
    for attr in ("_attn_implementation", "_experts_implementation"):  # keep the source's kernels (config
        value = getattr(config, attr, None)  # dicts drop them; grouped_mm MoE experts have no float64)
        if value is not None and hasattr(cfg_t, attr):
            setattr(cfg_t, attr, value)
    with no_init_weights():
        model_t = type(model_s)(cfg_t)
    model_t.to(dtype)
    model_t.load_state_dict(sd_t, strict=True)
    if hasattr(model_t, "tie_weights"):
        model_t.tie_weights()
    model_t.train(model_s.training)
    return model_t
