"""lemon_ext: lossless LEMON expansion of pretrained transformers, and training after it."""
from .engine import ExpansionPlan, TensorSpec, expand_model, expand_state_dict, plan_expansion
from .errors import LemonError
from .ops import backends

__version__ = "0.1.0"
__all__ = [
    "ExpansionPlan", "LemonError", "TensorSpec", "backends", "expand_model", "expand_state_dict",
    "plan_expansion", "__version__",
]
