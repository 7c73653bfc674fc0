"""The checkpoint tool's device check: ``execution.resolve_device`` with its error as a
:class:`CheckpointError` (the tool's documented error for an environment it cannot use)."""
from __future__ import annotations

import torch

from ..errors import LemonError
from ..execution import resolve_device as _resolve_device
from .errors import CheckpointError


def resolve_device(device) -> torch.device:
    """'auto' -> the current CUDA device when one is present, else CPU; CheckpointError when a
    CUDA device is requested without CUDA."""
    try:
        return _resolve_device(device)
    except LemonError as e:
        raise CheckpointError(str(e)) from None
