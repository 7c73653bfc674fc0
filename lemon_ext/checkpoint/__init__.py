"""Streaming checkpoint expansion: Hugging Face directory in, expanded directory out.

Public API: :func:`expand_checkpoint`, :func:`run_specs` (the bounded read/compute/write pipeline,
also usable by the engine for large in-memory state dicts), :func:`verify_checkpoints`.
Modules: ``safetensors_format`` (header I/O), ``source`` (readers), ``shards`` (shard plan),
``writer`` (streaming shard writer), ``outdir`` (atomic output + resume), ``pipeline``,
``distributed`` (torchrun), ``report``, ``verify``, ``expand`` (orchestration).
"""
from .errors import CheckpointError, VerificationError
from .expand import expand_checkpoint
from .pipeline import run_specs
from .verify import verify_checkpoints

__all__ = ["CheckpointError", "VerificationError", "expand_checkpoint", "run_specs", "verify_checkpoints"]
