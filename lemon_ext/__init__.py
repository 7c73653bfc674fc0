"""lemon_ext: lossless LEMON expansion of pretrained transformers, and training after it.

Expansion: ``expand_state_dict``, ``expand_model``, ``plan_expansion`` (engine), ``expand_checkpoint``
(streaming, ``lemon-expand``). Training: ``lemon_schedule``, ``lemon_total_steps``,
``expand_optimizer_state``, and the loop ``lemon_ext.train.train``.
"""
from .engine import ExpansionPlan, TensorSpec, expand_model, expand_state_dict, plan_expansion
from .errors import LemonError
from .ops import backends
from .optim_state import expand_optimizer_state
from .schedule import lemon_schedule, lemon_total_steps

__version__ = "0.1.0"
__all__ = [
    "ExpansionPlan", "LemonError", "TensorSpec", "backends", "expand_checkpoint", "expand_model",
    "expand_optimizer_state", "expand_state_dict", "lemon_schedule", "lemon_total_steps",
    "plan_expansion", "__version__",
]


def __getattr__(name):
    # The checkpoint package pulls safetensors/tqdm: import it on first use, not with the package.
    if name == "expand_checkpoint":
        from .checkpoint import expand_checkpoint

        return expand_checkpoint
    raise AttributeError(f"module 'lemon_ext' has no attribute {name!r}")
