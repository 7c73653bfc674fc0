"""Architecture registry: model_type -> declarative family table (all family knowledge lives here)."""
from __future__ import annotations

from ..errors import LemonError
from .roles import ROLES
from .schema import Architecture, Layout, Role, condition_holds, evaluate
from .spelling import SourceSpelling
from .tables import ARCHITECTURES

SUPPORTED_MODEL_TYPES = tuple(t for arch in ARCHITECTURES for t in arch.model_types)

__all__ = ["ARCHITECTURES", "Architecture", "Layout", "ROLES", "Role", "SUPPORTED_MODEL_TYPES", "SourceSpelling",
           "condition_holds", "evaluate", "find_architecture"]


def find_architecture(cfg: dict) -> Architecture:
    """The table for ``cfg['model_type']``; LemonError listing the supported types otherwise."""
    model_type = cfg.get("model_type")
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise LemonError(
        f"unknown model_type {model_type!r} (config field 'model_type'); supported: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}"
    )
