"""Table pieces shared by several families."""
from __future__ import annotations

#: Renames transformers applies to every checkpoint it loads (its "legacy" conversion mapping).
LEGACY_RENAMES = ((r"LayerNorm\.gamma", "LayerNorm.weight"), (r"LayerNorm\.beta", "LayerNorm.bias"))
