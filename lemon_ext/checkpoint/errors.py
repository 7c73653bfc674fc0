"""Errors of the checkpoint tool: one line each, naming the file or tensor at fault."""
from __future__ import annotations

from ..errors import LemonError


class CheckpointError(LemonError):
    """A bad input checkpoint, output path or environment (disk full): the message is one line.

    The CLI prints ``lemon-expand: error: <message>`` and exits 2 (no traceback). Library callers
    catch it as :class:`lemon_ext.LemonError` (a ``ValueError``).
    """


class VerificationError(CheckpointError):
    """The expanded model's outputs differ from the source's beyond the tolerance."""
