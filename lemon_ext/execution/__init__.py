"""Spec execution: the layer below both the engine and the checkpoint tool.

:func:`run_specs` runs a list of expansion specs (``lemon_ext.engine.TensorSpec``-like objects)
as a bounded read -> (host-to-device) -> kernel -> (device-to-host) -> sink pipeline on CPU or
CUDA (module ``pipeline``). The engine uses it for a host state dict expanded on a GPU
(``expand_state_dict(sd, cfg, device="cuda")``), the checkpoint tool to stream shards.

Layering: ``errors``, ``ops`` <- ``execution`` <- ``engine`` <- ``checkpoint``. Nothing here
imports the engine or the checkpoint tool (tests/test_layering.py checks it).
"""
from .pipeline import pinned_plan, resolve_device, run_specs

__all__ = ["pinned_plan", "resolve_device", "run_specs"]
