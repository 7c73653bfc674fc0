"""expand_state_dict through the bounded pipeline: for host state dicts of many GB on a GPU.

``expand_state_dict_pipelined(sd, cfg, device="cuda", ...)`` gives the same tensors as
``lemon_ext.expand_state_dict`` (same seed, same dtype rule) but runs the specs through
``run_specs``: on CUDA, sources are staged through pinned buffers and read, host-to-device copy,
kernel and device-to-host copy of different tensors overlap (not yet run on a GPU; its
orchestration is tested on CPU against a stand-in for the CUDA calls,
tests/test_checkpoint_cuda_pipeline.py). On CPU it is the plain loop with a reader and a writer
thread.
"""
from __future__ import annotations

import torch

from .pipeline import run_specs


def expand_state_dict_pipelined(sd_s: dict, cfg_s, *, seed: int = 0, dtype=None, device="auto",
                                backend: str = "auto", output_device="cpu", **sizes_and_options):
    """(sd_t, cfg_t) like ``expand_state_dict``; tensors land on ``output_device`` (host by default)."""
    from ..engine import plan_expansion
    from ..engine.api import synthetic_dtype
    from .expand import resolve_dtype

    shapes = {n: tuple(t.shape) for n, t in sd_s.items()}
    plan = plan_expansion(cfg_s, seed=seed, source_shapes=shapes, **sizes_and_options)
    plan.check_source(shapes)
    out_dtype = resolve_dtype(dtype)
    synthetic = synthetic_dtype(t.dtype for t in sd_s.values())  # expand_state_dict's rule
    dtypes = {s.name: out_dtype or (sd_s[s.source].dtype if s.source is not None else synthetic) for s in plan.specs}
    sd_t: dict = {}
    run_specs(plan.specs, sd_s.__getitem__, lambda spec, t: sd_t.__setitem__(spec.name, t), device=device,
              seed=seed, dtype=dtypes, backend=backend, copy_out=True, output_device=output_device,
              source_dtypes={n: t.dtype for n, t in sd_s.items()})
    return sd_t, plan.target_config
