"""How a checkpoint on disk spells its tensors, against the names the tables use.

Real checkpoints differ from a model's in-memory ``state_dict()`` in two ways (both recognised by
rule, from the family table):
- *older spellings* that transformers renames on load (ViT's pre-v5 ``encoder.layer.N.attention.
  attention.query``, ``LayerNorm.gamma``): read through the table's ``renames`` to the table's
  (canonical) names; the output is written back in the source's own spelling, so it drops into the
  same toolchain as the source;
- *derived buffers* that are not weights (``position_ids``, ``rotary_emb.inv_freq``, GPT-2's
  ``attn.bias`` mask): matched by the table's ``derived`` templates, left out of the output
  (transformers rebuilds them) and listed in the plan.
Anything else unknown stays unknown: the planner refuses it by name.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import LemonError
from .schema import Architecture, template_regex

_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)")


def _template(name: str) -> tuple[str, list[str]]:
    """``layers.3.mlp`` -> (``layers.#.mlp``, ["3"]): the name with its index components lifted."""
    numbers = _NUMBER.findall(name)
    return _NUMBER.sub("#", name), numbers


def _fill(template: str, numbers: list[str]) -> str:
    parts = template.split("#")
    out = [parts[0]]
    for number, rest in zip(numbers, parts[1:]):
        out += [number, rest]
    return "".join(out)


class SourceSpelling:
    """A checkpoint's names mapped to the table's, its derived buffers, and the way back.

    Attributes:
        canonical: {source name: table name} for every tensor that is not a derived buffer.
        derived: [(source name, reason)] for the derived buffers (dropped from the output).
        renamed: whether any name was read through a rename (the source has an older spelling).
    """

    def __init__(self, arch: Architecture, names: Iterable[str]):
        self.canonical: dict[str, str] = {}
        self.derived: list[tuple[str, str]] = []
        self._back: dict[str, str] = {}  # table template -> source template
        derived_rules = [(template_regex(p + t), reason) for t, reason in arch.derived.items()
                         for p in dict.fromkeys(layout.prefix for layout in arch.layouts)]
        seen: dict[str, str] = {}
        for name in names:
            table_name = name
            for pattern, replacement in arch.renames:
                table_name = re.sub(pattern, replacement, table_name)
            reason = next((r for rx, r in derived_rules if rx.match(table_name)), None)
            if reason is not None:
                self.derived.append((name, reason))
                continue
            if table_name in seen:
                raise LemonError(f"tensors {seen[table_name]!r} and {name!r} are two spellings of one tensor "
                                 f"({table_name!r}); keep one")
            seen[table_name] = name
            self.canonical[name] = table_name
            if table_name != name:
                self._back[_template(table_name)[0]] = _template(name)[0]
        self.renamed = bool(self._back)
        self._source_of = seen

    def table_shapes(self, shapes: dict) -> dict:
        """{table name: shape} of the non-derived tensors."""
        return {self.canonical[n]: s for n, s in shapes.items() if n in self.canonical}

    def source_name(self, table_name: str) -> str:
        """The name the source uses (or would use, for a new layer's tensor) for ``table_name``."""
        if table_name in self._source_of:
            return self._source_of[table_name]
        template, numbers = _template(table_name)
        back = self._back.get(template)
        return table_name if back is None else _fill(back, numbers)
