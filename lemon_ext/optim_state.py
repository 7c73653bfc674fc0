"""Grow Adam/AdamW state with the weights, so an expansion can happen mid-run (LEMON_SPEC section 8).

For a target tensor built from source tensor W by a spec (gather by row/column maps, factors,
then a split of each source entry into parts), every target entry t that copies source entry
g(t) is ``W_T[t] = kappa[t] * W[g(t)]`` (+ noise that does not depend on W), where kappa is the
product of the spec's factors (eta, the tied-head 1/k) and the split coefficient of the part
(the LEMON tree fractions, +-e of a cancelling pair, 1/n for equal splits). The moments follow
the same maps::

    exp_avg_T[t]    = kappa[t]   * exp_avg[g(t)]
    exp_avg_sq_T[t] = kappa[t]^2 * exp_avg_sq[g(t)]
    step_T          = step                         (bias corrections continue, not restart)

Appended mean rows (V_avg residual writers) gather the row mean of the moment, like the weight.

kappa is measured, not re-derived: ``spec.execute`` is affine in its source (noise is drawn from
coordinates, never from values), so in float64

    kappa  = execute(1) - execute(0)                       (split as planned)
    G(x)   = (execute_none(x) - execute_none(0)) / (execute_none(1) - execute_none(0))

where ``execute_none`` is the same spec with ``split="none"`` (the un-split gathered tensor) and
G is the pure gather (factors divided out). This equals the lead's suggested
``alpha = W_T / W_gathered`` wherever W_gathered != 0, without its 0/0 at zero weights.

Entries that copy no source entry (random-init free columns, zero tails) get exp_avg = 0 and
exp_avg_sq = the mean of the tensor's mapped exp_avg_sq: with exp_avg_sq = 0 and a carried step
count (bias corrections ~1) their first AdamW update would be (1-b1)/sqrt(1-b2) ~ 3.2 x lr
(b=(0.9,0.999)) instead of ~1 x lr.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import nn

from .errors import LemonError

__all__ = ["expand_optimizer_state", "expand_adam_state", "moment_maps"]

_MOMENTS = ("exp_avg", "exp_avg_sq")


def moment_maps(spec, *, seed: int) -> tuple[callable, torch.Tensor, torch.Tensor]:
    """(G, kappa, mapped) for one spec, all float64 on CPU.

    G(x: source-shaped tensor) -> target-shaped gather of x (no factors, no split);
    kappa: target-shaped coefficient (factors x split part); mapped: bool, entries copying a source entry.
    """
    # Moments are linear in the weight, so a (offset + w) norm's offset does not apply to them
    # (adding 1 to a 1e-12 moment would keep only 4 of its digits).
    spec = replace(spec, offset=0.0)
    shape = spec.source_shape
    zeros = torch.zeros(shape, dtype=torch.float64)
    ones = torch.ones(shape, dtype=torch.float64)

    def run(x, split=None):
        return spec.execute(x, seed=seed, dtype=torch.float64, device="cpu", backend="torch", split=split)

    base_none = run(zeros, "none")
    gather_ones = run(ones, "none") - base_none  # = factors on mapped entries, 0 elsewhere
    kappa = run(ones) - run(zeros)
    mapped = gather_ones != 0

    def gather(x: torch.Tensor) -> torch.Tensor:
        g = run(x.detach().to("cpu", torch.float64), "none") - base_none
        return torch.where(mapped, g / torch.where(mapped, gather_ones, 1.0), 0.0)

    return gather, kappa, mapped


def expand_adam_state(state_s: Mapping[str, Mapping], cfg_s, *, seed: int = 0, source_shapes=None,
                      **expansion_kwargs) -> dict[str, dict]:
    """Name-keyed Adam/AdamW state of the source -> name-keyed state of the target.

    Args:
        state_s: ``{source tensor name: {"step": Tensor[] or number, "exp_avg": Tensor[shape],
            "exp_avg_sq": Tensor[shape], ...}}`` (e.g. ``optimizer.state[p]`` per parameter name);
            names without state are simply absent. ``max_exp_avg_sq`` (amsgrad) follows exp_avg_sq.
        cfg_s: the source config, as given to ``lemon_ext.plan_expansion``.
        seed, **expansion_kwargs: exactly those given to ``expand_model`` / ``expand_state_dict``
            (hidden_size, ..., symmetry_breaking): the moments must follow the same splits.
        source_shapes: the source state dict's ``{name: shape}`` (picks the same layout and tied
            tensors as ``expand_state_dict``); default: inferred from the plan.
    Returns:
        ``{target tensor name: state}`` with moments in the source moments' dtype and device.
    """
    from .engine import plan_expansion

    plan = plan_expansion(cfg_s, seed=seed, source_shapes=source_shapes, **expansion_kwargs)
    return _grow(plan, state_s, seed=seed)


def _grow(plan, state_s: Mapping[str, Mapping], *, seed: int, weights_s=None, weights_t=None) -> dict[str, dict]:
    """``expand_adam_state`` on a plan. With ``weights_s``/``weights_t`` (state dicts), each grown
    tensor's weights are first checked to be the expansion of the source's under this plan and
    seed: moments grown with other splits than the weights' would be silently wrong."""
    out = {}
    for spec in plan.specs:
        st = state_s.get(spec.source) if spec.source is not None else None
        if not st or "exp_avg" not in st:
            continue  # no state yet (never stepped, frozen) or a synthetic tensor: AdamW starts fresh
        if weights_t is not None and spec.name in weights_t:
            _check_weights(spec, weights_s[spec.source], weights_t[spec.name], seed)
        gather, kappa, mapped = moment_maps(spec, seed=seed)
        new = {}
        for key, value in st.items():
            if key == "exp_avg":
                new[key] = (kappa * gather(value)).to(value.dtype).to(value.device)
            elif key in ("exp_avg_sq", "max_exp_avg_sq"):
                v = kappa.square() * gather(value)
                fill = v[mapped].mean() if mapped.any() else torch.zeros((), dtype=torch.float64)
                new[key] = torch.where(mapped, v, fill).to(value.dtype).to(value.device)
            elif isinstance(value, torch.Tensor) and value.ndim > 0:
                raise LemonError(f"optimizer state {key!r} of {spec.source!r} has shape {tuple(value.shape)}: "
                                 "only Adam/AdamW state (step, exp_avg, exp_avg_sq, max_exp_avg_sq) can be grown")
            else:
                new[key] = value.clone() if isinstance(value, torch.Tensor) else value  # step: kept
        out[spec.name] = new
    return out


def _check_weights(spec, w_s: torch.Tensor, w_t: torch.Tensor, seed: int) -> None:
    if tuple(w_t.shape) != tuple(spec.target_shape):
        raise LemonError(f"model_t tensor {spec.name!r} has shape {tuple(w_t.shape)}, the expansion arguments give "
                         f"{tuple(spec.target_shape)}: pass the arguments given to expand_model")
    # float64 replay of the expansion; a storage-dtype expansion differs from it by rounding only
    # (a few ulps of w_t's dtype), a different seed or split by the split fractions (~10%).
    want = spec.execute(w_s.detach().to("cpu", torch.float64), seed=seed, dtype=torch.float64, device="cpu",
                        backend="torch")
    got = w_t.detach().to("cpu", torch.float64)
    # an (offset + w) norm gain is rounded as offset + w': its error scales with the offset too
    scale = got.norm() + abs(float(getattr(spec, "offset", 0.0) or 0.0)) * got.numel() ** 0.5
    err = (want - got).norm() / scale.clamp_min(1e-30)
    if err > 16 * torch.finfo(w_t.dtype).eps:
        raise LemonError(f"seed: model_t's {spec.name!r} is not the expansion of model_s's {spec.source!r} with "
                         f"seed={seed} (relative difference {float(err):.2g}): pass the seed (and symmetry_breaking, "
                         "depth_placement) given to expand_model, before training model_t")


def _bare_model(model):
    """A ``torch.compile``d module's original (its names carry no ``_orig_mod.`` prefix)."""
    return getattr(model, "_orig_mod", model)


def _check_target_config(plan, model_t) -> None:
    cfg_t = getattr(model_t, "config", None)
    want = plan.target_config
    for generic in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                    "num_hidden_layers"):
        name = plan.architecture.fields.get(generic)
        if name is None or cfg_t is None:
            continue
        a = want.get(name) if isinstance(want, dict) else getattr(want, name, None)
        b = getattr(cfg_t, name, None)
        if a != b:
            raise LemonError(f"{generic}: the expansion arguments give {a}, model_t has {b}; pass "
                             "expand_optimizer_state the arguments given to expand_model")


def expand_optimizer_state(optimizer_s: torch.optim.Optimizer, model_s: nn.Module, model_t: nn.Module, *,
                           optimizer_t: torch.optim.Optimizer | None = None, seed: int = 0,
                           **expansion_kwargs) -> torch.optim.Optimizer:
    """Grow an Adam/AdamW optimizer with its model: returns an optimizer over ``model_t`` whose
    state is the source state expanded like the weights (see the module doc).

    Args:
        optimizer_s: the source model's optimizer (Adam or AdamW, any param groups; accelerate's
            ``AcceleratedOptimizer`` is unwrapped: prepare the returned optimizer again).
        model_s: the source HF model (its ``config`` and state-dict names are used; a
            ``torch.compile``d model is unwrapped).
        model_t: ``lemon_ext.expand_model(model_s, seed=seed, **expansion_kwargs)``, not yet trained.
        optimizer_t: an optimizer already built over ``model_t``'s parameters to fill; default:
            a new one of ``optimizer_s``'s class where each target parameter joins the param group
            (lr, weight decay, ...) of its source parameter (weight-decay grouping is preserved).
        seed, **expansion_kwargs: exactly those given to ``expand_model``.

    Checks (``LemonError`` naming the field): the target sizes of the arguments against
    ``model_t.config``, and every grown tensor's weights against the expansion of the source's
    with this seed (a different seed would give moments that do not follow the weights' splits).

    Example (growth mid-run; ``carry_schedule`` continues the running LR schedule)::

        kw = dict(hidden_size=1536, num_hidden_layers=24, seed=0)
        big = lemon_ext.expand_model(model, **kw)
        opt = expand_optimizer_state(opt, model, big, **kw)
        sched = lemon_ext.carry_schedule(sched, opt)

    Params that are new or whose source had no state start with empty (fresh) state. The new
    groups keep the old ones' current ``lr`` and hyperparameters but not ``initial_lr``: the
    schedule's peak is carried by ``carry_schedule``.
    """
    from .schedule import _plain_optimizer

    optimizer_s = _plain_optimizer(optimizer_s, "optimizer_s")
    if not isinstance(optimizer_s, (torch.optim.Adam, torch.optim.AdamW)):
        raise LemonError(f"optimizer_s must be torch.optim.Adam or AdamW, got {type(optimizer_s).__name__}")
    if optimizer_t is not None:
        optimizer_t = _plain_optimizer(optimizer_t, "optimizer_t")
    model_s, model_t = _bare_model(model_s), _bare_model(model_t)
    cfg_s = getattr(model_s, "config", None)
    if cfg_s is None:
        raise LemonError("model_s must be a transformers model (it has no .config)")
    from .engine import plan_expansion

    names_s = dict(model_s.named_parameters(remove_duplicate=False))
    state_s = {name: optimizer_s.state[p] for name, p in names_s.items() if p in optimizer_s.state}
    weights_s = model_s.state_dict()
    shapes = {k: tuple(v.shape) for k, v in weights_s.items()}
    plan = plan_expansion(cfg_s, seed=seed, source_shapes=shapes, **expansion_kwargs)
    _check_target_config(plan, model_t)
    grown = _grow(plan, state_s, seed=seed, weights_s=weights_s, weights_t=model_t.state_dict())

    params_t = dict(model_t.named_parameters(remove_duplicate=False))
    missing = sorted(set(grown) - set(params_t) - set(model_t.state_dict()))
    if missing:
        raise LemonError(f"model_t has no parameter {missing[0]!r}: was it expanded with the same arguments?")
    if optimizer_t is None:
        group_of = {id(p): i for i, g in enumerate(optimizer_s.param_groups) for p in g["params"]}
        # the source of each target parameter is the same-named source parameter (or its spec's)
        source_of = {s.name: s.source for s in plan.specs}
        buckets: dict[int, list] = {}
        seen = set()
        for name, p in params_t.items():
            if id(p) in seen:
                continue  # tied: listed once
            seen.add(id(p))
            src = names_s.get(source_of.get(name) or "", None)
            buckets.setdefault(group_of.get(id(src), 0) if src is not None else 0, []).append(p)
        groups = []
        for i, g in enumerate(optimizer_s.param_groups):
            # initial_lr is a scheduler's record of the peak: copied, a fresh lemon_schedule on the
            # new optimizer would jump back to the old peak instead of starting from the current lr
            hyper = {k: v for k, v in g.items() if k not in ("params", "initial_lr")}
            groups.append({**hyper, "params": buckets.get(i, [])})
        optimizer_t = type(optimizer_s)(groups)  # every hyperparameter rides in its group
    in_opt = {p for g in optimizer_t.param_groups for p in g["params"]}
    for name, st in grown.items():
        p = params_t.get(name)
        if p is None or p not in in_opt or optimizer_t.state.get(p):
            continue  # buffer, frozen, or the tied partner already filled
        if p.dtype != st["exp_avg"].dtype or p.device != st["exp_avg"].device:
            st = {k: v.to(p.device) if isinstance(v, torch.Tensor) and v.ndim > 0 else v for k, v in st.items()}
        optimizer_t.state[p] = st
    return optimizer_t
