"""lemon_ext: lossless LEMON expansion of pretrained transformers, and training after it.

Expansion: ``expand_state_dict``, ``expand_model``, ``plan_expansion`` (engine), ``expand_checkpoint``
(streaming, ``lemon-expand``). Training: ``lemon_schedule``, ``lemon_total_steps``,
``expand_optimizer_state``, ``carry_schedule`` (growth mid-run), and the loop ``lemon_ext.train.train``
(``lemon_ext.train`` is importable as an attribute after ``import lemon_ext``).
"""
from . import gloo_exit
from .engine import ExpansionPlan, TensorSpec, expand_model, expand_state_dict, plan_expansion
from .errors import LemonError
from .ops import backends
from .optim_state import expand_optimizer_state
from .schedule import carry_schedule, lemon_schedule, lemon_total_steps

__version__ = "0.1.0"

gloo_exit.install()  # torch 2.13 DDP-over-gloo processes can abort at exit; see gloo_exit
__all__ = [
    "ExpansionPlan", "LemonError", "TensorSpec", "backends", "carry_schedule", "expand_checkpoint", "expand_model",
    "expand_optimizer_state", "expand_state_dict", "lemon_schedule", "lemon_total_steps",
    "plan_expansion", "__version__",
]


def __getattr__(name):
    # The checkpoint package pulls safetensors/tqdm: import it on first use, not with the package.
    if name == "expand_checkpoint":
        from .checkpoint import expand_checkpoint

        return expand_checkpoint
    if name == "train":
        # the loop pulls numpy and tqdm: loaded on first use too (``lemon_ext.train.train``)
        import importlib

        return importlib.import_module(".train", __name__)
    raise AttributeError(f"module 'lemon_ext' has no attribute {name!r}")
