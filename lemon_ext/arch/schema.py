"""The vocabulary of the architecture tables: what a family, a model-class layout and a tensor
role are, as data. The engine reads these; nothing outside ``lemon_ext/arch`` knows a family.

Size symbols (usable in role shapes, table shapes and expressions; see ``evaluate``):
    hidden, ffn, heads, kv_heads, head_dim, layers, attn (= heads * head_dim),
    kv_attn (= kv_heads * head_dim), experts, expert_ffn, shared_ffn (MoE), plus every config
    field (after the table's ``defaults``) and ``num_labels`` (len(id2label), as transformers
    defines it).

Axis rules (``Role.rows`` / ``Role.cols``; a tuple concatenates segments, each with its own
source offset: fused [q|k|v] or [gate|up] tensors):
    stream       writes the residual stream: k copies, tail V_avg (LayerNorm) / V_zero (RMSNorm)
    stream_in    reads the normalised stream: k copies (fan-in split), tail FREE (random)
    stream_circ  V_circ of the hidden axis (norm gains, replicated pooler units)
    stream_zero  k copies then zeros (LayerNorm beta)
    q_heads      whole query heads replicated circularly (head_dim fixed)
    kv_heads     whole key/value heads replicated circularly
    ffn          FFN neurons replicated circularly
    expert_ffn   one MoE expert's neurons replicated circularly (each expert its own groups)
    shared_ffn   the shared expert's neurons (Qwen2-MoE)
    heads_qkv    per-head interleaved [q k v] blocks (GPT-NeoX query_key_value): whole heads of
                 3 * head_dim replicated circularly
    keep         the axis does not grow (vocabulary, positions, labels, channels, experts)
A tuple starting with "experts" repeats the rest once per expert (fused (E, R, C) tensors viewed
with ``view="stacked"``), each repetition offset by the expert's source rows.

Name templates: ``{i}`` is the layer index, ``{e}`` the expert index (the entry is repeated for
each of the source's experts).
"""
from __future__ import annotations

import ast
import functools
import operator
import re
from dataclasses import dataclass, field

from ..errors import LemonError


@dataclass(frozen=True)
class Role:
    """What a tensor role means: how each axis of the tensor's 2-D view maps source -> target.

    view: "rows" (shape[0] rows, the rest flattened into columns: weights (out, in), convs),
        "cols" (the last axis is the hidden axis: embeddings (N, D), (1, P, D)), "vector" (1-D:
        one row, the vector's axis is ``cols``), "stacked" ((E, R, C) expert stacks viewed as
        (E * R, C)), "auto" ("vector" for 1-D tensors, else "rows").
    shape: the source shape in size symbols (None: from the family table's ``shapes`` or the
        checkpoint, for embeddings and heads whose vocabulary / geometry is not a size).
    split: the columns are a fan-in of replicated units: split (LEMON / projection / equal).
    writes_stream: a branch output (attention out, FFN down): exactly zero in new layers.
    gain / shift: a norm's gain (scaled by eta, and by 1/k before a tied head) / bias (1/k there).
    qk_norm_input: q or k projection feeding a q/k norm: rows scaled by eta when eta != 1 (the
        config's one eps becomes eta^2 eps, LEMON_SPEC section 10).
    integer_heads: exact only when every head is replicated the same number of times (q/k norms
        over the whole projection, OLMo 2): other head counts are refused.
    embed_scaled: an embedding the model multiplies by the family's ``embed_scale`` (Gemma).
    branch_norm: a norm applied to a branch output before the residual add (OLMo 2's and
        Gemma's post-attention / post-feedforward norms); where the family's ``new_layer_zero`` is
        "branch_norms", a new layer stores it with zero gain (w = -norm_offset).
    stored_transposed: stored (in, out) when the family has ``conv1d`` (GPT-2's Conv1D).
    rule / what: the plan's rule column; ``what`` describes the rows (formatted with the sizes).
    """

    view: str
    rows: str | tuple[str, ...] = "keep"
    cols: str | tuple[str, ...] = "keep"
    shape: tuple[str, ...] | None = None
    split: bool = False
    writes_stream: bool = False
    gain: bool = False
    shift: bool = False
    stored_transposed: bool = False
    qk_norm_input: bool = False
    integer_heads: bool = False
    embed_scaled: bool = False
    branch_norm: bool = False
    rule: str = ""
    what: str = ""


@dataclass(frozen=True)
class Layout:
    """One model class's tensor naming: a prefix for the backbone plus head tensors."""

    name: str  # e.g. "causal_lm"
    prefix: str  # backbone prefix, e.g. "model."
    head: tuple[tuple[str, ...], ...] = ()  # (name, role[, when]) outside the backbone
    tied: tuple[tuple[str, str], ...] = ()  # (tied name, name it copies) when tie flag is set
    final_norm: tuple[str, ...] = ()  # norms feeding a tied head (scaled by 1/k)
    architectures: tuple[str, ...] = ()  # config.architectures values that select this layout


@dataclass(frozen=True)
class Architecture:
    """Tensor table and config semantics of one model family.

    Tensor entries are ``(template, role)`` or ``(template, role, when)``: ``{i}`` is the layer
    index; a template ending in ``?`` is optional. With the checkpoint's names known, an optional
    tensor exists if the checkpoint has it; from a config alone, if ``when`` holds (see
    ``condition_holds``; no ``when``: it exists). A required entry with a ``when`` exists exactly
    where the condition holds, names known or not (then it must be in the checkpoint, and it is
    refused as unexpected where the condition fails): per-layer kinds (Qwen-MoE's dense and sparse
    layers) and alternative forms chosen by ``stored:`` (experts one tensor each or fused).
    """

    family: str
    model_types: tuple[str, ...]
    norm: str  # "layernorm" (stream V_avg) or "rmsnorm" (stream V_zero)
    post_ln: bool  # Post-LN blocks (BERT): depth by the LayerNorm-chain rule
    fields: dict[str, str]  # generic size name -> config field
    embeddings: tuple[tuple[str, ...], ...]
    layer: tuple[tuple[str, ...], ...]
    final: tuple[tuple[str, ...], ...]
    layouts: tuple[Layout, ...]
    conv1d: bool = False  # weights of roles with stored_transposed are stored (in, out)
    post_ln_positions: dict[str, str] = field(default_factory=dict)  # template -> ln_attn/ln_out
    explicit_head_dim: bool = False  # config may fix head_dim independently of hidden_size
    tie_field: str = "tie_word_embeddings"
    #: config fields transformers fills in when config.json omits them (its config class defaults)
    defaults: dict[str, object] = field(default_factory=dict)
    #: the FFN width when its config field is absent or null (an expression in size symbols)
    ffn_default: str | None = None
    #: source shapes of tensors whose shape is not a size (embeddings, heads): template -> dims
    shapes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: config fields holding the hidden size that follow it when equal to it
    hidden_followers: tuple[str, ...] = ()
    #: config lists with one entry per layer (remapped to the target layer order)
    layer_lists: tuple[str, ...] = ("layer_types",)
    #: config fields counting the first N layers (recounted over the target layer order)
    layer_thresholds: tuple[str, ...] = ()
    #: config flags that make a growth change the function: field -> (growth, reason)
    refusals: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: tensors that are derived buffers, not weights (rebuilt by transformers on load), relative to
    #: the backbone prefix or, starting with "/", absolute: template -> reason
    derived: dict[str, str] = field(default_factory=dict)
    #: older spellings transformers renames on load, in order: (regex on the old name, new text)
    renames: tuple[tuple[str, str], ...] = ()
    #: config lists of layer indices (Qwen3-MoE ``mlp_only_layers``): remapped to target indices
    layer_index_lists: tuple[str, ...] = ()
    #: q/k norms in attention ("head_dim": per head, Qwen3 / Gemma 3; "projection": over the whole
    #: projection, OLMo 2); with eta != 1 the q/k rows are scaled by eta (see Role.qk_norm_input)
    qk_norm: str | None = None
    #: norms compute x * (offset + w) (Gemma: 1): a gain factor f gives w' = f (offset + w) - offset
    norm_offset: float = 0.0
    #: the embedding output is multiplied by this (Gemma: "hidden ** 0.5", computed in the
    #: activation dtype, the config's dtype field): expressions in size symbols
    embed_scale: str | None = None
    #: how a new layer's output is made exactly zero: "writers" (its branch output projections
    #: get cancelling +e/-e fan-out parts over paired units) or "branch_norms" (every branch ends
    #: in a norm before the residual add, OLMo 2 / Gemma: those norms get zero gain, so the layer
    #: adds exactly 0 in every dtype whatever its branch computes; the rest of the layer is a
    #: plain width-expanded copy of its source layer). A norm of a near-zero cancelled output
    #: would amplify its rounding by up to 1/sqrt(eps) (~1e3), and to O(1) once the rounding
    #: exceeds sqrt(eps) (bf16 activations): zero gains avoid that.
    new_layer_zero: str = "writers"
    #: config keys a config class maps to another field (its ``attribute_map``; Qwen3-MoE's
    #: config.json says num_experts, its ``to_dict()`` num_local_experts): {key: table's field},
    #: read as the table's field when the config does not give that field itself
    aliases: dict[str, str] = field(default_factory=dict)
    #: config fields that select every n-th layer ((index + 1) % n == 0; Qwen-MoE's
    #: decoder_sparse_step) -> the index list naming the other layers (``mlp_only_layers``): once
    #: the layer order changes, written as that explicit list with the step set to 1
    layer_steps: dict[str, str] = field(default_factory=dict)
    #: per-layer config lists the config class fills in by a rule when config.json omits them
    #: (older Gemma uploads have no ``layer_types``): list field -> ((value, when), ...), layer i
    #: taking the value of the first alternative whose condition holds for it (``condition_holds``
    #: with ``layer=i`` on the config with the table's defaults; None: always). When the layer order
    #: changes, the target config gets the explicit list (each new layer its source layer's entry)
    layer_list_defaults: dict[str, tuple[tuple[str, str | None], ...]] = field(default_factory=dict)


# -- conditions and expressions -------------------------------------------------------------------

def condition_holds(when: str | None, cfg: dict, layout: Layout, layer: int | None = None,
                    names: set[str] | frozenset[str] | None = None) -> bool:
    """Evaluate a presence condition: alternatives joined by ``|``, each a conjunction joined by
    ``&`` of atoms, each optionally negated by ``!``: ``field`` (truthy), ``field=value`` (config
    value equals, as a string), ``layout=name``, ``never``, and for layer tensors
    ``layer_in:field`` (the layer index is in that config list), ``layer_step:field``
    ((index + 1) % value == 0, a missing or null field counting as 1; ``layer_step:2``: a
    number given directly), ``layer_below:field`` (index < value) and ``stored:template``
    (the checkpoint's table-spelled ``names`` are known and hold the template under the layout's
    prefix, ``{i}`` this layer, ``{e}`` 0: the planner adds every stored name with its expert
    index read as 0, so any stored expert counts; false from a config alone)."""
    if when is None:
        return True

    def atom(text: str) -> bool:
        if text.startswith("!"):
            return not atom(text[1:])
        if text == "never":
            return False
        if text.startswith("stored:"):
            return names is not None and layout.prefix + text[7:].format(i=layer, e=0) in names
        if text.startswith("layer_in:"):
            return layer is not None and layer in (cfg.get(text[9:]) or ())
        if text.startswith("layer_below:"):  # index < the field's value (Qwen2's max_window_layers)
            return layer is not None and cfg.get(text[12:]) is not None and layer < int(cfg[text[12:]])
        if text.startswith("layer_step:"):
            key = text[11:]
            step = int(key) if key.isdigit() else int(cfg.get(key) or 1)  # a field or a number
            return layer is not None and (layer + 1) % step == 0
        if "=" in text:
            key, value = text.split("=", 1)
            return str(layout.name if key == "layout" else cfg.get(key)) == value
        return bool(cfg.get(text))

    return any(all(atom(a.strip()) for a in alt.split("&")) for alt in when.split("|"))


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow}


def evaluate(expr: str | int, names: dict):
    """An expression in size symbols and config fields (``+ - * / // **``, parentheses): an int
    for integer operands (shapes), a float where a float constant or ``/`` enters (scales).

    Raises LemonError naming the config field when a symbol is missing.
    """
    if isinstance(expr, int):
        return expr

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.Name):
            value = names.get(node.id)
            if value is None:
                raise LemonError(f"config field {node.id!r} is missing")
            return value if isinstance(value, float) else int(value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](walk(node.left), walk(node.right))
        raise LemonError(f"internal: unsupported table expression {expr!r}")

    return walk(_parse(str(expr)))


@functools.lru_cache(maxsize=None)
def _parse(expr: str) -> ast.Expression:
    """The parsed expression (tables hold a few hundred; parsing each per tensor cost ~1 ms a plan)."""
    return ast.parse(expr, mode="eval")


def template_regex(template: str) -> re.Pattern:
    """A regex matching a name template with ``{i}`` / ``{e}`` standing for any integer."""
    parts = re.split(r"(\{[a-z]\})", template)
    return re.compile("".join(r"\d+" if re.fullmatch(r"\{[a-z]\}", p) else re.escape(p) for p in parts) + r"\Z")
