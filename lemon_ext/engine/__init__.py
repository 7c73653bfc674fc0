"""The LEMON expansion engine: plan (one spec per target tensor), then execute the specs."""
from .api import expand_model, expand_state_dict
from .plan import ExpansionPlan, plan_expansion
from .spec import TensorSpec

__all__ = ["ExpansionPlan", "TensorSpec", "expand_model", "expand_state_dict", "plan_expansion"]
