"""Streaming checkpoint expansion: Hugging Face directory in, expanded directory out.

Public API: :func:`expand_checkpoint`, :func:`verify_checkpoints`.
Modules: ``safetensors_format`` (header I/O), ``source`` (readers), ``shards`` (shard plan),
``writer`` (streaming shard writer), ``direct_io`` (its O_DIRECT file), ``hashing`` (shard digests),
``outdir`` (atomic output + resume), ``device`` (device check), ``distributed`` (torchrun),
``report``, ``verify``, ``heap`` (the CLI's malloc setting), ``expand`` (orchestration). The specs run
through ``lemon_ext.execution.run_specs`` (the bounded read/compute/write pipeline, shared with
the engine's ``expand_state_dict(sd, cfg, device="cuda")``).
"""
from .errors import CheckpointError, VerificationError
from .expand import expand_checkpoint
from .verify import verify_checkpoints

__all__ = ["CheckpointError", "VerificationError", "expand_checkpoint", "verify_checkpoints"]
