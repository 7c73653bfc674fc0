"""plan_expansion: turn a source config and target sizes into one TensorSpec per target tensor."""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch

from ..arch import find_architecture
from ..arch.tables import Architecture, Layout
from ..errors import LemonError
from ..ops import ZERO
from . import axes
from .config import config_to_dict, rewrite_config
from .depth import TargetLayer, layer_sources, target_layers
from .sizes import Sizes, source_sizes, target_sizes
from .spec import TensorSpec

SYMMETRY_BREAKING = ("lemon", "projection", "equal")
OUTPUT_ROLES = ("o_weight", "o_bias", "down_weight", "down_bias")


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
        tied = {name for name, _ in self.layout.tied}
        for name in shapes:
            if name not in expected and name not in tied:
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
        return "\n".join(head + lines + [f"  note: {n}" for n in self.notes])


def _template(name: str) -> str:
    parts = name.split(".")
    return ".".join("{i}" if p.isdigit() else p for p in parts)


def _choose_layout(arch: Architecture, cfg: dict, names: set[str] | None) -> Layout:
    """The model class layout: by the checkpoint's tensor names, else by config.architectures.

    Layouts differ by backbone prefix ("model.", "transformer.", "bert.", "vit." or none), so the
    first embedding's name decides. A tied head may be absent (save_pretrained drops it).
    """
    if names is not None:
        tie = bool(cfg.get(arch.tie_field, False))
        for layout in arch.layouts:
            if layout.prefix + arch.embeddings[0][0].rstrip("?") not in names:
                continue
            tied = dict(layout.tied) if tie else {}
            missing = [n for n, _ in layout.head if not n.endswith("?") and n not in names and n not in tied]
            if missing:
                raise LemonError(f"tensor {missing[0]!r} is missing from the source ({arch.family} {layout.name})")
            return layout
        raise LemonError(
            f"the source tensors do not match any {arch.family} layout (expected one of "
            f"{[layout.prefix + arch.embeddings[0][0] for layout in arch.layouts]})"
        )
    wanted = (cfg.get("architectures") or [None])[0]
    for layout in arch.layouts:
        if wanted in layout.architectures:
            return layout
    return arch.layouts[0]


def _optional_default(arch: Architecture, layout: Layout, cfg: dict, template: str) -> bool:
    """Whether an optional tensor exists when only the config is known."""
    if arch.family == "llama":
        if "mlp." in template:
            return bool(cfg.get("mlp_bias"))
        if "o_proj" in template:
            return bool(cfg.get("attention_bias"))
        return bool(cfg.get("attention_bias")) or cfg.get("model_type") == "qwen2"
    if "pooler" in template:
        return layout.name == "base"
    if "mask_token" in template:
        return False
    if arch.family == "vit" and "_proj.bias" in template:
        return bool(cfg.get("qkv_bias", True))
    return True


class _SpecBuilder:
    """Builds the TensorSpec of each role for one plan."""

    def __init__(self, arch, src: Sizes, tgt: Sizes, mode: str, noise_std: float, tied_factor: float):
        self.arch, self.src, self.tgt = arch, src, tgt
        self.mode, self.noise_std = mode, noise_std
        self.tied_factor = tied_factor
        self.eta = axes.eta(src.hidden, tgt.hidden)
        self.k = tgt.hidden // src.hidden

    def _split(self, new_output: bool) -> str:
        if new_output:
            return "cancel_equal" if self.mode == "equal" else "cancel"
        return self.mode

    def build(self, name, source, role, source_shape, *, new_output=False, final_norm=False,
              key_name="", fill=None) -> TensorSpec:
        s, t, norm = self.src, self.tgt, self.arch.norm
        transpose = self.arch.conv1d and role in ("qkv_weight", "o_weight", "up_weight", "down_weight")
        stream_in = axes.stream_input(s.hidden, t.hidden)
        split_name = self._split(new_output)
        k_desc = f"k={self.k}" + (f", r={t.hidden % s.hidden}" if t.hidden % s.hidden else "")
        view, row_factor, col_factor, split = "rows", None, None, "none"
        extra = self.tied_factor if final_norm else 1.0

        def qkv_map() -> torch.Tensor:
            q = axes.heads(s.heads, t.heads, s.head_dim)
            return torch.cat([q, s.attn + q, 2 * s.attn + q])

        if role == "embed":
            view = "cols"
            rows = axes.keep(math.prod(source_shape[:-1]))
            cols = axes.stream(s.hidden, t.hidden, norm)
            rule = f"hidden axis -> {'V_avg' if norm == 'layernorm' else 'V_zero'} ({k_desc})"
        elif role in ("embed_conv",):
            rows = axes.stream(s.hidden, t.hidden, norm)
            cols = axes.keep(math.prod(source_shape[1:]))
            rule = f"out channels -> stream type ({k_desc})"
        elif role in ("embed_bias", "o_bias", "down_bias", "writer_bias"):
            view, rows = "vector", axes.keep(1)
            cols = axes.stream(s.hidden, t.hidden, norm)
            rule = f"writes the stream ({k_desc})"
            if new_output:
                cols = torch.full((t.hidden,), ZERO, dtype=torch.int64)
                rule = "zero (new layer output bias)"
        elif role == "norm_weight":
            view, rows = "vector", axes.keep(1)
            cols = axes.circular(s.hidden, t.hidden)
            factor = self.eta * extra
            col_factor = torch.full((t.hidden,), factor, dtype=torch.float64) if factor != 1.0 else None
            rule = f"eta*V_circ(gamma), eta={self.eta:.6g}" + (f", x1/{self.k} (tied head)" if extra != 1.0 else "")
        elif role == "norm_bias":
            view, rows = "vector", axes.keep(1)
            cols = axes.zero_tail(s.hidden, t.hidden)
            col_factor = torch.full((t.hidden,), extra, dtype=torch.float64) if extra != 1.0 else None
            rule = "V_zero(beta)" + (f", x1/{self.k} (tied head)" if extra != 1.0 else "")
        elif role in ("q_weight", "kv_weight", "qkv_weight", "up_weight", "pooler_weight", "writer_weight", "head"):
            if role == "q_weight":
                rows, what = axes.heads(s.heads, t.heads, s.head_dim), f"query heads {s.heads}->{t.heads}"
            elif role == "kv_weight":
                rows, what = axes.heads(s.kv_heads, t.kv_heads, s.head_dim), f"kv heads {s.kv_heads}->{t.kv_heads}"
            elif role == "qkv_weight":
                rows, what = qkv_map(), f"[q|k|v] heads {s.heads}->{t.heads} per segment"
            elif role == "up_weight":
                rows, what = axes.circular(s.ffn, t.ffn), f"neurons {s.ffn}->{t.ffn} circular"
            elif role == "pooler_weight":
                rows, what = axes.circular(s.hidden, t.hidden), "pooler units V_circ"
            elif role == "writer_weight":
                rows, what = axes.stream(s.hidden, t.hidden, norm), "writes a stream into a LayerNorm"
            else:
                rows, what = axes.keep(source_shape[0] if not transpose else source_shape[1]), "rows kept"
            cols, split = stream_in, split_name
            tail = ", tail random" if t.hidden % s.hidden else ""
            rule = f"rows: {what}; cols: fan-in split of the stream ({k_desc}{tail}), {split}"
        elif role in ("q_bias", "kv_bias", "qkv_bias", "up_bias", "pooler_bias"):
            view, rows = "vector", axes.keep(1)
            cols = {
                "q_bias": lambda: axes.heads(s.heads, t.heads, s.head_dim),
                "kv_bias": lambda: axes.heads(s.kv_heads, t.kv_heads, s.head_dim),
                "qkv_bias": qkv_map,
                "up_bias": lambda: axes.circular(s.ffn, t.ffn),
                "pooler_bias": lambda: axes.circular(s.hidden, t.hidden),
            }[role]()
            rule = "V_circ (replicated units)"
        elif role == "o_weight":
            rows = axes.stream(s.hidden, t.hidden, norm)
            cols, split = axes.heads(s.heads, t.heads, s.head_dim), split_name
            rule = f"rows write the stream ({k_desc}); cols: split per replicated head, {split}"
        elif role == "down_weight":
            rows = axes.stream(s.hidden, t.hidden, norm)
            cols, split = axes.circular(s.ffn, t.ffn), split_name
            rule = f"rows write the stream ({k_desc}); cols: split per neuron group, {split}"
        elif role == "keep":
            view = "vector" if len(source_shape) == 1 else "rows"
            rows = axes.keep(1 if view == "vector" else source_shape[0])
            cols = axes.keep(source_shape[0] if view == "vector" else math.prod(source_shape[1:]))
            rule = "copied"
        else:
            raise LemonError(f"internal: unknown role {role!r} for tensor {name!r}")

        target_shape = self._target_shape(source_shape, view, transpose, rows.numel(), cols.numel())
        noise = self.noise_std if split != "none" or bool((cols == -3).any()) else 0.0
        return TensorSpec(
            name=name, source=source, source_shape=tuple(source_shape), target_shape=target_shape,
            role=role, rule=rule, row_map=rows, col_map=cols, view=view, transpose=transpose,
            row_factor=row_factor, col_factor=col_factor, split=split, noise_std=noise,
            key_name=key_name or name, fill=fill,
        )

    @staticmethod
    def _target_shape(source_shape, view, transpose, num_rows, num_cols) -> tuple[int, ...]:
        if view == "vector":
            return (num_cols,)
        if view == "cols":
            return tuple(source_shape[:-1]) + (num_cols,)
        if transpose:
            return (num_cols, num_rows)
        rest = tuple(source_shape[1:])
        if len(rest) > 1:
            if math.prod(rest) != num_cols:
                raise LemonError(f"internal: cannot reshape {num_cols} columns to {rest}")
            return (num_rows,) + rest
        return (num_rows, num_cols)


def _source_shape(arch: Architecture, src: Sizes, cfg: dict, template: str, role: str) -> tuple[int, ...] | None:
    """Shape a source tensor must have, from the config (None where only the checkpoint knows)."""
    d, f = src.hidden, src.ffn
    shapes = {
        "norm_weight": (d,), "norm_bias": (d,), "embed_bias": (d,), "o_bias": (d,), "down_bias": (d,),
        "writer_bias": (d,), "writer_weight": (d, d), "pooler_bias": (d,), "pooler_weight": (d, d),
        "q_weight": (src.attn, d), "q_bias": (src.attn,), "kv_weight": (src.kv_attn, d), "kv_bias": (src.kv_attn,),
        "qkv_weight": (3 * src.attn, d), "qkv_bias": (3 * src.attn,), "o_weight": (d, src.attn),
        "up_weight": (f, d), "up_bias": (f,), "down_weight": (d, f),
    }
    shape = shapes.get(role)
    if shape is not None and arch.conv1d and len(shape) == 2:
        shape = (shape[1], shape[0])
    if role == "embed" and arch.family == "llama":
        return (int(cfg["vocab_size"]), d)
    return shape


def plan_expansion(
    cfg_s,
    *,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    num_hidden_layers: int | None = None,
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
    cfg = config_to_dict(cfg_s)
    arch = find_architecture(cfg)
    src = source_sizes(arch, cfg)
    if source_shapes is not None:
        source_names = list(source_shapes)
    names = set(source_names) if source_names is not None else None
    layout = _choose_layout(arch, cfg, names)

    if isinstance(depth_placement, str):
        num_layers = src.layers if num_hidden_layers is None else int(num_hidden_layers)
        if num_layers < src.layers:
            raise LemonError(f"num_hidden_layers={num_layers} is smaller than the source's {src.layers}: lemon_ext only grows models")
        order = layer_sources(src.layers, num_layers, depth_placement)
    else:
        num_layers = len(depth_placement) if num_hidden_layers is None else int(num_hidden_layers)
        order = layer_sources(src.layers, num_layers, depth_placement)
    tgt = target_sizes(
        arch, src, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        num_hidden_layers=len(order),
    )
    notes = _check_family_rules(arch, cfg, src, tgt, allow_lossy)
    tied = bool(cfg.get(arch.tie_field, False)) and bool(layout.tied)
    k = tgt.hidden // src.hidden
    tied_factor = 1.0 / k if tied else 1.0
    if tied and k & (k - 1):
        notes.append(f"tied head: final norm scaled by 1/{k}, not a power of two: one rounding in low precision")
    if tgt.hidden % src.hidden:
        notes.append(f"indivisible width: norm gains scaled by eta={axes.eta(src.hidden, tgt.hidden):.6g} (one rounding in low precision)")
    noise_std = float(cfg.get("initializer_range", 0.02)) if symmetry_breaking != "equal" else 0.0
    builder = _SpecBuilder(arch, src, tgt, symmetry_breaking, noise_std, tied_factor)
    layers = target_layers(order, arch.post_ln)

    def present(full_name: str, optional: bool, template: str) -> bool:
        if not optional:
            return True
        if names is not None:
            return full_name in names
        return _optional_default(arch, layout, cfg, template)

    specs: list[TensorSpec] = []
    prefix = layout.prefix
    final_norms = set(layout.final_norm) if tied else set()

    def add_static(entries, pfx):
        for template, role in entries:
            optional = template.endswith("?")
            template = template.rstrip("?")
            name = pfx + template
            if not present(name, optional, template):
                continue
            shape = _shape_of(name, template, role)
            specs.append(builder.build(name, name, role, shape, final_norm=name in final_norms))

    def _shape_of(name, template, role):
        shape = _source_shape(arch, src, cfg, template, role)
        given = tuple(source_shapes[name]) if source_shapes is not None and name in source_shapes else None
        if shape is None:
            # Embeddings and heads: the checkpoint is the authority on vocabulary/positions, but the
            # hidden axis must still agree with the config.
            shape = given or _config_shape(arch, cfg, src, template)
            hidden_axis = 0 if role == "embed_conv" else -1
            if role != "keep" and shape[hidden_axis] != src.hidden:
                raise LemonError(f"tensor {name!r} has shape {tuple(shape)}, but the config's hidden size is {src.hidden}")
        elif given is not None and given != tuple(shape):
            raise LemonError(f"tensor {name!r} has shape {given}, the config implies {tuple(shape)}")
        return tuple(shape)

    add_static(arch.embeddings, prefix)
    for layer in layers:
        for template, role in arch.layer:
            optional = template.endswith("?")
            template = template.rstrip("?")
            src_name = prefix + template.format(i=layer.source)
            tgt_name = prefix + template.format(i=layer.index)
            if not present(src_name, optional, template):
                continue
            shape = _shape_of(src_name, template, role)
            position = arch.post_ln_positions.get(template)
            source, fill = src_name, None
            if position is not None:
                choice = layer.ln_attn if position == "ln_attn" else layer.ln_out
                if choice == "identity":
                    source, fill = None, (1.0 if role == "norm_weight" else 0.0)
                elif isinstance(choice, int):
                    source = prefix + template.format(i=choice)
            spec = builder.build(
                tgt_name, source, role, shape, new_output=layer.new and role in OUTPUT_ROLES, fill=fill,
            )
            if fill is not None:
                spec = _with_rule(spec, f"identity affine (Post-LN depth chain); {spec.rule}")
            elif source != src_name:
                spec = _with_rule(spec, f"carries {source} (Post-LN depth chain); {spec.rule}")
            specs.append(spec)
    add_static(arch.final, prefix)
    tied_names = dict(layout.tied) if tied else {}
    for template, role in layout.head:
        optional = template.endswith("?")
        name = template.rstrip("?")
        if name in tied_names:
            if names is not None and name not in names:
                continue  # tied head not stored (safetensors deduplicates it): keep it that way
            partner = next(s for s in specs if s.name == tied_names[name])
            specs.append(_tied_copy(partner, name))
            continue
        if not present(name, optional, name):
            continue
        shape = _shape_of(name, name, role)
        if shape is None:
            raise LemonError(f"cannot infer the shape of {name!r} from the config; pass source_shapes")
        specs.append(builder.build(name, name, role, shape, final_norm=name in final_norms))

    cfg_t = rewrite_config(cfg_s, cfg, arch, src, tgt, order)
    return ExpansionPlan(arch, layout, src, tgt, layers, specs, cfg_s, cfg_t, symmetry_breaking, notes)


def _with_rule(spec: TensorSpec, rule: str) -> TensorSpec:
    return replace(spec, rule=rule)


def _tied_copy(partner: TensorSpec, name: str) -> TensorSpec:
    """A tied head: the same tensor as its partner (same maps, same noise key)."""
    return replace(partner, name=name, rule=f"tied to {partner.name} (kept tied); {partner.rule}",
                   key_name=partner.key_name)


def _config_shape(arch: Architecture, cfg: dict, src: Sizes, template: str) -> tuple[int, ...]:
    """Shapes of embeddings and heads, which depend on vocabulary, positions, image geometry."""
    d = src.hidden
    t = template
    if arch.family == "gpt2":
        return {"wte.weight": (cfg["vocab_size"], d), "wpe.weight": (cfg["n_positions"], d),
                "lm_head.weight": (cfg["vocab_size"], d)}[t]
    if arch.family == "bert":
        table = {
            "embeddings.word_embeddings.weight": (cfg["vocab_size"], d),
            "embeddings.position_embeddings.weight": (cfg["max_position_embeddings"], d),
            "embeddings.token_type_embeddings.weight": (cfg.get("type_vocab_size", 2), d),
            "cls.predictions.decoder.weight": (cfg["vocab_size"], d),
            "cls.predictions.decoder.bias": (cfg["vocab_size"],),
            "cls.predictions.bias": (cfg["vocab_size"],),
        }
        return table[t]
    if arch.family == "vit":
        patches = (cfg["image_size"] // cfg["patch_size"]) ** 2
        channels = cfg.get("num_channels", 3)
        labels = len(cfg.get("id2label") or {}) or cfg.get("num_labels", 2)
        table = {
            "embeddings.cls_token": (1, 1, d), "embeddings.mask_token": (1, 1, d),
            "embeddings.position_embeddings": (1, patches + 1, d),
            "embeddings.patch_embeddings.projection.weight": (d, channels, cfg["patch_size"], cfg["patch_size"]),
            "classifier.weight": (labels, d), "classifier.bias": (labels,),
        }
        return table[t]
    if arch.family == "llama" and t == "lm_head.weight":
        return (cfg["vocab_size"], d)
    raise LemonError(f"cannot infer the shape of {template!r} from the config")


def _check_family_rules(arch: Architecture, cfg: dict, src: Sizes, tgt: Sizes, allow_lossy: bool) -> list[str]:
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
    if arch.family == "gpt2" and cfg.get("scale_attn_by_inverse_layer_idx") and tgt.layers != src.layers:
        raise LemonError("config field 'scale_attn_by_inverse_layer_idx' makes attention depend on the layer index: depth growth would change the function")
    if arch.family == "llama" and cfg.get("model_type") not in arch.model_types:
        raise LemonError(f"model_type {cfg.get('model_type')!r} is not supported")
    return notes
