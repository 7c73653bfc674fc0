"""Streaming checkpoint expansion: Hugging Face directory in, expanded directory out.

Public API: :func:`expand_checkpoint`, :func:`run_specs` (the bounded read/compute/write pipeline),
:func:`expand_state_dict_pipelined` (``expand_state_dict`` through that pipeline, for host state
dicts of many GB on a GPU), :func:`verify_checkpoints`.
Modules: ``safetensors_format`` (header I/O), ``source`` (readers), ``shards`` (shard plan),
``writer`` (streaming shard writer), ``outdir`` (atomic output + resume), ``pipeline``,
``distributed`` (torchrun), ``report``, ``verify``, ``expand`` (orchestration).
"""
from .errors import CheckpointError, VerificationError
from .expand import expand_checkpoint
from .pipeline import run_specs
from .state_dict import expand_state_dict_pipelined
from .verify import verify_checkpoints

__all__ = ["CheckpointError", "VerificationError", "expand_checkpoint", "expand_state_dict_pipelined",
           "run_specs", "verify_checkpoints"]
