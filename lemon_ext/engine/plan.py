"""plan_expansion: turn a source config and target sizes into one TensorSpec per target tensor."""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch

from ..arch import ROLES, Architecture, Layout, SourceSpelling, condition_holds, evaluate, find_architecture
from ..errors import LemonError
from . import axes
from .builder import SpecBuilder
from .config import config_to_dict, rewrite_config
from .depth import TargetLayer, layer_sources, target_layers
from .sizes import Sizes, size_argument, source_sizes, target_sizes
from .spec import TensorSpec

SYMMETRY_BREAKING = ("lemon", "projection", "equal")
ROUNDING = "one rounding in low precision"  # the marker of notes on rescaled stored values


@dataclass
class ExpansionPlan:
    """Every target tensor's spec, in target order, plus the configs and sizes."""

    architecture: Architecture
    layout: Layout
    source_sizes: Sizes
    target_sizes: Sizes
    layers: list[TargetLayer]
    specs: list[TensorSpec]
    source_config: object
    target_config: object
    symmetry_breaking: str
    notes: list[str] = field(default_factory=list)
    spelling: SourceSpelling | None = None  # the checkpoint's names (None: planned from the config)

    @property
    def rounds_in_low_precision(self) -> bool:
        """Whether some stored values are rescaled (eta, a 1/k that is not a power of two, an
        embedding scale, (1 + w) gains): one rounding each in bf16 / fp16 storage (the notes say which)."""
        return any(ROUNDING in note for note in self.notes)

    @property
    def dropped(self) -> list[tuple[str, str]]:
        """[(source name, reason)]: derived buffers of the source left out of the target."""
        return list(self.spelling.derived) if self.spelling is not None else []

    @property
    def source_names(self) -> set[str]:
        return {s.source for s in self.specs if s.source is not None}

    @property
    def num_parameters_target(self) -> int:
        return sum(s.numel for s in self.specs)

    @property
    def num_parameters_source(self) -> int:
        shapes = {s.source: s.source_shape for s in self.specs if s.source is not None}
        return sum(math.prod(shape) for shape in shapes.values())

    def expected_source_shapes(self) -> dict[str, tuple[int, ...]]:
        return {s.source: s.source_shape for s in self.specs if s.source is not None}

    def check_source(self, shapes: dict[str, Sequence[int]]) -> None:
        """Raise LemonError naming the first missing or unexpected tensor or wrong shape."""
        expected = self.expected_source_shapes()
        spelling = SourceSpelling(self.architecture, shapes)  # these names' renames and buffers
        tied = {spelling.source_name(name) for name, _ in self.layout.tied}
        derived = {name for name, _ in spelling.derived}
        for name in shapes:
            if name not in expected and name not in tied and name not in derived:
                raise LemonError(
                    f"unexpected tensor {name!r} in the source: not part of a "
                    f"{self.architecture.family} {self.layout.name} model with this config"
                )
        for name, shape in expected.items():
            if name not in shapes:
                raise LemonError(f"tensor {name!r} is missing from the source")
            if tuple(shapes[name]) != tuple(shape):
                raise LemonError(
                    f"tensor {name!r} has shape {tuple(shapes[name])}, the config implies {tuple(shape)}"
                )

    def __str__(self) -> str:
        s, t = self.source_sizes, self.target_sizes
        head = [
            f"lemon_ext plan: {self.architecture.family} ({self.layout.name}), symmetry_breaking={self.symmetry_breaking}",
            f"  hidden {s.hidden}->{t.hidden}, ffn {s.ffn}->{t.ffn}, heads {s.heads}->{t.heads} "
            f"(kv {s.kv_heads}->{t.kv_heads}, head_dim {s.head_dim}), layers {s.layers}->{t.layers}",
            *([f"  experts {s.experts} (kept), expert ffn {s.expert_ffn}->{t.expert_ffn}"
               + (f", shared expert ffn {s.shared_ffn}->{t.shared_ffn}" if s.shared_ffn else "")] if s.experts else []),
            f"  target layers <- source: {[l.source for l in self.layers]} (new, zero-output: "
            f"{[l.index for l in self.layers if l.new]})",
            f"  parameters {self.num_parameters_source:,} -> {self.num_parameters_target:,}",
        ]
        rows, seen = [], {}
        for spec in self.specs:
            key = (_template(spec.name), spec.role, spec.source_shape, spec.target_shape, spec.rule)
            if key in seen:
                seen[key] += 1
                continue
            seen[key] = 1
            rows.append(key)
        width = max((len(r[0]) for r in rows), default=10)
        lines = [f"  {'tensor'.ljust(width)}  {'role':<12}  {'source -> target shape':<30}  rule"]
        for key in rows:
            name, role, src_shape, tgt_shape, rule = key
            count = f" (x{seen[key]})" if seen[key] > 1 else ""
            shapes = f"{list(src_shape)} -> {list(tgt_shape)}"
            lines.append(f"  {name.ljust(width)}  {role:<12}  {shapes:<30}  {rule}{count}")
        dropped: dict[tuple[str, str], int] = {}
        for name, reason in self.dropped:
            dropped[(_template(name), reason)] = dropped.get((_template(name), reason), 0) + 1
        lines += [f"  dropped: {name}{f' (x{n})' if n > 1 else ''}: {reason} (derived buffer, not written)"
                  for (name, reason), n in dropped.items()]
        return "\n".join(head + lines + [f"  note: {n}" for n in self.notes])


def _template(name: str) -> str:
    """The name with its layer index as ``{i}`` and a later index (an expert's) as ``{e}``."""
    parts, out = name.split("."), []
    for p in parts:
        out.append(("{e}" if "{i}" in out else "{i}") if p.isdigit() else p)
    return ".".join(out)


def _choose_layout(arch: Architecture, cfg: dict, names: set[str] | None) -> Layout:
    """The model class layout: by the checkpoint's tensor names, else by config.architectures.

    Layouts differ by backbone prefix ("model.", "transformer.", "bert.", "vit." or none), so the
    first embedding's name narrows them down; among layouts with the same prefix, the one whose
    head tensors the checkpoint has (a tied head may be absent: save_pretrained drops it), the
    config's class first. Names are the table's (after renames).
    """
    wanted = (cfg.get("architectures") or [None])[0]
    if names is None:
        return next((layout for layout in arch.layouts if wanted in layout.architectures), arch.layouts[0])
    tie = bool(cfg.get(arch.tie_field, False))
    candidates = [layout for layout in arch.layouts if layout.prefix + _bare(arch.embeddings[0][0]) in names]
    if not candidates:
        raise LemonError(
            f"the source tensors do not match any {arch.family} layout (expected one of "
            f"{[layout.prefix + _bare(arch.embeddings[0][0]) for layout in arch.layouts]})"
        )
    complete, first_missing = [], None
    for layout in candidates:
        tied = dict(layout.tied) if tie else {}
        missing = [entry[0] for entry in layout.head
                   if not entry[0].endswith("?") and entry[0] not in names and entry[0] not in tied]
        if not missing:
            complete.append(layout)
        first_missing = first_missing or (missing[0] if missing else None, layout)
    if complete:
        # The config's class first, then the layout whose head explains most of the checkpoint
        # (a tied LM head is absent, so a classifier head must not lose to it).
        stored = lambda lo: sum(_bare(e[0]) in names for e in lo.head)  # noqa: E731
        best = max(complete, key=lambda lo: (wanted in lo.architectures, stored(lo)))
        return _rerooted(arch, best, wanted, tie)
    name, layout = first_missing
    raise LemonError(f"tensor {name!r} is missing from the source ({arch.family} {layout.name})")


def _rerooted(arch: Architecture, layout: Layout, wanted: str | None, tie: bool) -> Layout:
    """A backbone-only key set under an LM class whose head is tied (openai-community/gpt2: no
    ``transformer.`` prefix, no ``lm_head``): the LM layout under the backbone's names, so the
    tied head's final-norm rule still applies (transformers adds the prefix on load)."""
    if layout.prefix or not tie:
        return layout
    for lm in arch.layouts:
        required = [e[0] for e in lm.head if not e[0].endswith("?")]
        tied = dict(lm.tied)
        if wanted in lm.architectures and lm.prefix and tied and all(n in tied for n in required):
            strip = len(lm.prefix)
            return replace(lm, name=f"{lm.name}, backbone names", prefix="",
                           tied=tuple((n, partner[strip:]) for n, partner in lm.tied),
                           final_norm=tuple(n[strip:] for n in lm.final_norm))
    return layout


def _any_expert(names: set[str]) -> set[str]:
    """The names plus each name with its second index (an expert's) read as 0: a ``stored:``
    condition (``{e}`` = 0) then holds when any expert of the layer is stored."""
    out = set(names)
    for name in names:
        parts = name.split(".")
        indices = [k for k, p in enumerate(parts) if p.isdigit()]
        if len(indices) > 1:
            parts[indices[1]] = "0"
            out.add(".".join(parts))
    return out


def _bare(template: str) -> str:
    return template.rstrip("?")


def _entries(entries):
    """Table entries as (template without '?', role, optional, when)."""
    for entry in entries:
        template, role = entry[0], entry[1]
        yield _bare(template), role, template.endswith("?"), entry[2] if len(entry) > 2 else None


def _per_expert(entries, experts: int):
    """Layer entries with ``{e}`` repeated for each expert: (template, role, optional, when, e)."""
    for template, role, optional, when in entries:
        for e in (range(experts) if "{e}" in template else (None,)):
            yield template, role, optional, when, e


def _embed_factor(arch: Architecture, cfg: dict, src: Sizes, tgt: Sizes, notes: list) -> float:
    """factor_S / factor_T for families that multiply embeddings by a size-dependent scale
    (Gemma: sqrt(hidden)), each factor rounded to the activation dtype as transformers does
    (``torch.tensor(factor, dtype=...)``; the config's dtype field, float32 if absent)."""
    if arch.embed_scale is None:
        return 1.0
    dtype_name = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")
    dtype = getattr(torch, dtype_name, torch.float32)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        dtype = torch.float32

    def factor(sizes: Sizes) -> float:
        value = evaluate(arch.embed_scale, {**cfg, "hidden": sizes.hidden})
        return float(torch.tensor(float(value), dtype=dtype))

    f_s, f_t = factor(src), factor(tgt)
    if f_s != f_t:
        notes.append(f"embedding scale {arch.embed_scale} in {dtype_name}: {f_s:g} -> {f_t:g}; embeddings scaled by "
                     f"{f_s / f_t:.6g} ({ROUNDING})")
    return f_s / f_t


def _names(cfg: dict, src: Sizes) -> dict:
    """Symbols for table expressions: config fields (with the table's defaults) and sizes."""
    labels = cfg.get("id2label")
    return {**cfg, "num_labels": len(labels) if labels else cfg.get("num_labels", 2),
            "hidden": src.hidden, "ffn": src.ffn, "heads": src.heads, "kv_heads": src.kv_heads,
            "head_dim": src.head_dim, "layers": src.layers, "attn": src.attn, "kv_attn": src.kv_attn,
            "experts": src.experts, "expert_ffn": src.expert_ffn, "shared_ffn": src.shared_ffn}


def _source_shape(arch: Architecture, builder: SpecBuilder, names: dict, template: str, role: str,
                  given: tuple | None, name: str) -> tuple[int, ...]:
    """The shape a source tensor must have: from its role's sizes, else from the table's shapes
    (vocabulary, positions, image geometry), else the checkpoint's own (whose hidden axis must
    still agree with the config)."""
    role_shape = ROLES[role].shape
    if role_shape is not None:
        shape = tuple(evaluate(d, names) for d in role_shape)
        if builder.transposed(role):
            shape = shape[::-1]
    elif template in arch.shapes:
        shape = tuple(evaluate(d, names) for d in arch.shapes[template])
    elif given is not None:
        shape = given
        hidden_axis = 0 if role == "embed_conv" else -1
        if role != "keep" and shape[hidden_axis] != names["hidden"]:
            raise LemonError(f"tensor {name!r} has shape {tuple(shape)}, but the config's hidden size is {names['hidden']}")
    else:
        raise LemonError(f"cannot infer the shape of {name!r} from the config; pass source_shapes")
    if given is not None and given != tuple(shape):
        raise LemonError(f"tensor {name!r} has shape {given}, the config implies {tuple(shape)}")
    return tuple(shape)


def plan_expansion(
    cfg_s,
    *,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    num_hidden_layers: int | None = None,
    moe_intermediate_size: int | None = None,
    shared_expert_intermediate_size: int | None = None,
    seed: int = 0,
    symmetry_breaking: str = "lemon",
    depth_placement: str | Sequence[int] = "interleave",
    allow_lossy: bool = False,
    source_names: Iterable[str] | None = None,
    source_shapes: dict[str, Sequence[int]] | None = None,
    **ignored,
) -> ExpansionPlan:
    """Plan a LEMON expansion: one TensorSpec per target tensor (printable dry run).

    Args:
        cfg_s: transformers config or config.json dict of the source model.
        hidden_size ... num_hidden_layers: target sizes (generic Hugging Face names); None keeps
            the source's, and num_attention_heads defaults to keeping head_dim.
        moe_intermediate_size / shared_expert_intermediate_size: MoE expert widths (the config's
            own field names; Mixtral's experts follow intermediate_size). The expert count stays.
        symmetry_breaking: "lemon" (unequal splits exact in the storage dtype), "projection"
            (projected random init, exact in fp32 and wider) or "equal" (Net2Net/bert2BERT-FPI).
        depth_placement: "interleave", "stack" or a list of source layer indices.
        allow_lossy: accept Post-LN indivisible width (not exact).
        source_names / source_shapes: the source checkpoint's tensor names (and shapes), to pick
            the model layout, the optional tensors and tied heads stored or not.
    """
    for key in ignored:
        if key not in ("backend", "dtype", "device"):
            raise LemonError(f"unknown argument {key!r}")
    if symmetry_breaking not in SYMMETRY_BREAKING:
        raise LemonError(f"symmetry_breaking={symmetry_breaking!r}: choose one of {SYMMETRY_BREAKING}")
    cfg_given = config_to_dict(cfg_s)
    arch = find_architecture(cfg_given)
    cfg = {**arch.defaults, **cfg_given}  # what transformers fills in for fields config.json omits
    cfg.update({f: cfg_given[key] for key, f in arch.aliases.items() if key in cfg_given and f not in cfg_given})
    src = source_sizes(arch, cfg)
    if source_shapes is not None:
        source_names = list(source_shapes)
    spelling = SourceSpelling(arch, source_names) if source_names is not None else None
    names = set(spelling.canonical.values()) if spelling is not None else None
    stored = _any_expert(names) if names is not None else None  # for ``stored:`` conditions
    shapes = spelling.table_shapes(dict(source_shapes)) if source_shapes is not None else {}
    layout = _choose_layout(arch, cfg, names)

    num_hidden_layers = size_argument("num_hidden_layers", num_hidden_layers)
    if isinstance(depth_placement, str):
        num_layers = src.layers if num_hidden_layers is None else num_hidden_layers
        if num_layers < src.layers:
            raise LemonError(f"num_hidden_layers={num_layers} is smaller than the source's {src.layers}: lemon_ext only grows models")
        order = layer_sources(src.layers, num_layers, depth_placement)
    else:
        num_layers = len(depth_placement) if num_hidden_layers is None else num_hidden_layers
        order = layer_sources(src.layers, num_layers, depth_placement)
    tgt = target_sizes(
        arch, src, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        num_hidden_layers=len(order), moe_intermediate_size=moe_intermediate_size,
        shared_expert_intermediate_size=shared_expert_intermediate_size,
    )
    notes = _check_rules(arch, cfg, src, tgt, allow_lossy)
    tied = bool(cfg.get(arch.tie_field, False)) and bool(layout.tied)
    k = tgt.hidden // src.hidden
    embed_factor = _embed_factor(arch, cfg, src, tgt, notes)
    tied_factor = 1.0 / (k * embed_factor) if tied else 1.0
    if tied and k & (k - 1):
        notes.append(f"tied head: final norm scaled by 1/{k}, not a power of two: {ROUNDING}")
    if tied and embed_factor != 1.0:
        notes.append(f"tied head: it reads the scaled embedding (x{embed_factor:.6g}) k={k} times: final norm gain scaled "
                     f"by 1/({k} x {embed_factor:.6g}) = {tied_factor:.6g} ({ROUNDING})")
    if tgt.hidden % src.hidden:
        notes.append(f"indivisible width: norm gains scaled by eta={axes.eta(src.hidden, tgt.hidden):.6g} ({ROUNDING})")
        if arch.qk_norm:
            notes.append(f"q/k norms ({arch.qk_norm}): q and k projections scaled by eta too, so their eps (the config's "
                         f"one eps, scaled by eta^2) stays exact ({ROUNDING})")
    noise_std = float(cfg.get("initializer_range", 0.02)) if symmetry_breaking != "equal" else 0.0
    if arch.norm_offset and (tied_factor != 1.0 or tgt.hidden % src.hidden):
        notes.append(f"norms compute x * ({arch.norm_offset:g} + w): scaled gains are stored as w' = f ({arch.norm_offset:g} + w) "
                     f"- {arch.norm_offset:g} ({ROUNDING})")
    if src.experts:
        notes.append("MoE: router logits are kept (fan-in split); in low precision a near-tie between experts "
                     "can pick a different top-k expert")
    builder = SpecBuilder(arch, src, tgt, symmetry_breaking, noise_std, tied_factor, embed_factor)
    symbols = _names(cfg, src)
    layers = target_layers(order, arch.post_ln)

    def present(full_name: str, optional: bool, when: str | None, layer: int | None = None) -> bool:
        if not optional:  # required; with a condition, exactly where it holds (checked against the names)
            return condition_holds(when, cfg, layout, layer, stored)
        if names is not None:
            return full_name in names
        return condition_holds(when, cfg, layout, layer)

    def shape_of(name: str, template: str, role: str) -> tuple[int, ...]:
        given = tuple(shapes[name]) if name in shapes else None
        return _source_shape(arch, builder, symbols, template, role, given, name)

    specs: list[TensorSpec] = []
    prefix = layout.prefix
    final_norms = set(layout.final_norm) if tied else set()

    def add_static(entries):
        for template, role, optional, when in _entries(entries):
            name = prefix + template
            if present(name, optional, when):
                specs.append(builder.build(name, name, role, shape_of(name, template, role),
                                           final_norm=name in final_norms))

    add_static(arch.embeddings)
    for layer in layers:
        for template, role, optional, when, e in _per_expert(_entries(arch.layer), src.experts):
            src_name = prefix + template.format(i=layer.source, e=e)
            tgt_name = prefix + template.format(i=layer.index, e=e)
            if not present(src_name, optional, when, layer.source):
                continue
            shape = shape_of(src_name, template, role)
            position = arch.post_ln_positions.get(template)
            source, fill = src_name, None
            if position is not None:
                choice = layer.ln_attn if position == "ln_attn" else layer.ln_out
                if choice == "identity":
                    source, fill = None, (1.0 if role == "norm_weight" else 0.0)
                elif isinstance(choice, int):
                    source = prefix + template.format(i=choice)
            spec = builder.build(tgt_name, source, role, shape, new_output=layer.new, fill=fill)
            if fill is not None:
                spec = _with_rule(spec, f"identity affine (Post-LN depth chain); {spec.rule}")
            elif source != src_name:
                spec = _with_rule(spec, f"carries {source} (Post-LN depth chain); {spec.rule}")
            specs.append(spec)
    add_static(arch.final)
    tied_names = dict(layout.tied) if tied else {}
    for name, role, optional, when in _entries(layout.head):
        if name in tied_names:
            if names is not None and name not in names:
                continue  # tied head not stored (safetensors deduplicates it): keep it that way
            partner = next(s for s in specs if s.name == tied_names[name])
            specs.append(_tied_copy(partner, name))
            continue
        if present(name, optional, when):
            specs.append(builder.build(name, name, role, shape_of(name, name, role), final_norm=name in final_norms))

    if spelling is not None:
        specs = [_spelled(spec, spelling) for spec in specs]
    cfg_t = rewrite_config(cfg_s, cfg_given, arch, src, tgt, order)
    return ExpansionPlan(arch, layout, src, tgt, layers, specs, cfg_s, cfg_t, symmetry_breaking, notes,
                         spelling=spelling)


def _spelled(spec: TensorSpec, spelling: SourceSpelling) -> TensorSpec:
    """The spec under the source's own names (its noise key stays the table name, so every
    spelling of one checkpoint gives the same bytes)."""
    name = spelling.source_name(spec.name)
    source = spelling.source_name(spec.source) if spec.source is not None else None
    if name == spec.name and source == spec.source:
        return spec
    return replace(spec, name=name, source=source, key_name=spec.key_name or spec.name)


def _with_rule(spec: TensorSpec, rule: str) -> TensorSpec:
    return replace(spec, rule=rule)


def _tied_copy(partner: TensorSpec, name: str) -> TensorSpec:
    """A tied head: the same tensor as its partner (same maps, same noise key)."""
    return replace(partner, name=name, rule=f"tied to {partner.name} (kept tied); {partner.rule}",
                   key_name=partner.key_name)


def _check_rules(arch: Architecture, cfg: dict, src: Sizes, tgt: Sizes, allow_lossy: bool) -> list[str]:
    notes = []
    if arch.post_ln and tgt.hidden % src.hidden:
        if not allow_lossy:
            raise LemonError(
                f"hidden_size={tgt.hidden} is not a multiple of {src.hidden}: a Post-LN model "
                f"({arch.family}) is exact only for integer width multiples; pass allow_lossy=True to accept a lossy result"
            )
        notes.append("Post-LN indivisible width: NOT lossless (allow_lossy=True)")
    if arch.post_ln and tgt.layers > src.layers:
        eps = cfg.get(arch.fields["eps"])
        notes.append(f"Post-LN depth: exact up to LayerNorm eps ({eps}), the new layers re-normalise a normalised stream")
    grows = {"depth": tgt.layers != src.layers, "width": tgt.hidden != src.hidden or tgt.ffn != src.ffn}
    for field_name, (growth, reason) in arch.refusals.items():
        if cfg.get(field_name) and grows[growth]:
            raise LemonError(f"config field {field_name!r} {reason}")
    return notes
