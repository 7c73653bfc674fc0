"""Tensor roles as data: the meaning of each role a family table may give a tensor.

The rules are those of ../shared/LEMON_SPEC.md sections 2-6: units that read the normalised
stream split their fan-in over the copies; units that write the stream follow its type (V_avg for
LayerNorm, V_zero for RMSNorm); replicated units (heads, neurons) are copied whole; branch outputs
of new layers are exactly zero. Axis rule names are listed in ``lemon_ext.arch.schema``.

Rule templates are formatted with: ``k`` ("k=2" or "k=1, r=16"), ``tail`` (", tail random" at
indivisible widths), ``split`` (the split mode), ``stream_type`` (V_avg / V_zero), ``eta``,
``tied`` (", x1/k (tied head)" before a tied head), ``what`` (the role's own row description,
formatted with ``hs``/``ht`` (heads), ``kvs``/``kvt``, ``fs``/``ft`` (FFN) source/target).
"""
from __future__ import annotations

from .schema import Role

_FAN_IN = "rows: {what}; cols: fan-in split of the stream ({k}{tail}), {split}"
_WRITES = "writes the stream ({k})"
_REPLICATED = "V_circ (replicated units)"

ROLES: dict[str, Role] = {
    # Embeddings: the hidden axis becomes the stream.
    "embed": Role("cols", cols="stream", rule="hidden axis -> {stream_type} ({k})"),
    "embed_conv": Role("rows", rows="stream", rule="out channels -> stream type ({k})"),
    "embed_bias": Role("vector", cols="stream", shape=("hidden",), rule=_WRITES),
    # Norms over the hidden axis.
    "norm_weight": Role("vector", cols="stream_circ", shape=("hidden",), gain=True,
                        rule="eta*V_circ(gamma), eta={eta}{tied}"),
    "norm_bias": Role("vector", cols="stream_zero", shape=("hidden",), shift=True, rule="V_zero(beta){tied}"),
    # Attention.
    "q_weight": Role("rows", rows="q_heads", cols="stream_in", shape=("attn", "hidden"), split=True,
                     rule=_FAN_IN, what="query heads {hs}->{ht}"),
    "q_bias": Role("vector", cols="q_heads", shape=("attn",), rule=_REPLICATED),
    "kv_weight": Role("rows", rows="kv_heads", cols="stream_in", shape=("kv_attn", "hidden"), split=True,
                      rule=_FAN_IN, what="kv heads {kvs}->{kvt}"),
    "kv_bias": Role("vector", cols="kv_heads", shape=("kv_attn",), rule=_REPLICATED),
    "qkv_weight": Role("rows", rows=("q_heads", "kv_heads", "kv_heads"), cols="stream_in",
                       shape=("attn + 2 * kv_attn", "hidden"), split=True, stored_transposed=True,
                       rule=_FAN_IN, what="[q|k|v] heads {hs}->{ht} per segment"),
    "qkv_bias": Role("vector", cols=("q_heads", "kv_heads", "kv_heads"), shape=("attn + 2 * kv_attn",),
                     rule=_REPLICATED),
    "o_weight": Role("rows", rows="stream", cols="q_heads", shape=("hidden", "attn"), split=True,
                     writes_stream=True, stored_transposed=True,
                     rule="rows write the stream ({k}); cols: split per replicated head, {split}"),
    "o_bias": Role("vector", cols="stream", shape=("hidden",), writes_stream=True, rule=_WRITES),
    # Feed-forward.
    "up_weight": Role("rows", rows="ffn", cols="stream_in", shape=("ffn", "hidden"), split=True,
                      stored_transposed=True, rule=_FAN_IN, what="neurons {fs}->{ft} circular"),
    "up_bias": Role("vector", cols="ffn", shape=("ffn",), rule=_REPLICATED),
    "down_weight": Role("rows", rows="stream", cols="ffn", shape=("hidden", "ffn"), split=True,
                        writes_stream=True, stored_transposed=True,
                        rule="rows write the stream ({k}); cols: split per neuron group, {split}"),
    "down_bias": Role("vector", cols="stream", shape=("hidden",), writes_stream=True, rule=_WRITES),
    # Heads and poolers.
    "head": Role("rows", rows="keep", cols="stream_in", split=True, rule=_FAN_IN, what="rows kept"),
    # A head reading the pooler's output (V_circ, not the stream): BERT's NSP and classifier heads.
    "pooled_head": Role("rows", rows="keep", cols="stream_circ", split=True, rule=_FAN_IN.replace("stream", "pooled units"),
                        what="rows kept"),
    "pooler_weight": Role("rows", rows="stream_circ", cols="stream_in", shape=("hidden", "hidden"), split=True,
                          rule=_FAN_IN, what="pooler units V_circ"),
    "pooler_bias": Role("vector", cols="stream_circ", shape=("hidden",), rule=_REPLICATED),
    "writer_weight": Role("rows", rows="stream", cols="stream_in", shape=("hidden", "hidden"), split=True,
                          rule=_FAN_IN, what="writes a stream into a LayerNorm"),
    "writer_bias": Role("vector", cols="stream", shape=("hidden",), rule=_WRITES),
    "keep": Role("auto", rule="copied"),
}
