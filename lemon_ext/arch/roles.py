"""Tensor roles as data: the meaning of each role a family table may give a tensor.

The rules are those of ../shared/LEMON_SPEC.md sections 2-6: units that read the normalised
stream split their fan-in over the copies; units that write the stream follow its type (V_avg for
LayerNorm, V_zero for RMSNorm); replicated units (heads, neurons) are copied whole; branch outputs
of new layers are exactly zero. Axis rule names are listed in ``lemon_ext.arch.schema``.

Rule templates are formatted with: ``k`` ("k=2" or "k=1, r=16"), ``tail`` (", tail random" at
indivisible widths), ``split`` (the split mode), ``stream_type`` (V_avg / V_zero), ``eta``,
``tied`` (", x1/k (tied head)" before a tied head), ``what`` (the role's own row description,
formatted with ``hs``/``ht`` (heads), ``kvs``/``kvt``, ``fs``/``ft`` (FFN), ``efs``/``eft``
(expert FFN) source/target).
"""
from __future__ import annotations

from .schema import Role

_FAN_IN = "rows: {what}; cols: fan-in split of the stream ({k}{tail}), {split}"
_WRITES = "writes the stream ({k})"
_REPLICATED = "V_circ (replicated units)"
_DOWN = "rows write the stream ({k}); cols: split per neuron group, {split}"

ROLES: dict[str, Role] = {
    # Embeddings: the hidden axis becomes the stream.
    "embed": Role("cols", cols="stream", embed_scaled=True, rule="hidden axis -> {stream_type} ({k})"),
    "embed_conv": Role("rows", rows="stream", rule="out channels -> stream type ({k})"),
    "embed_bias": Role("vector", cols="stream", shape=("hidden",), rule=_WRITES),
    # Norms over the hidden axis.
    "norm_weight": Role("vector", cols="stream_circ", shape=("hidden",), gain=True,
                        rule="eta*V_circ(gamma), eta={eta}{tied}"),
    "norm_bias": Role("vector", cols="stream_zero", shape=("hidden",), shift=True, rule="V_zero(beta){tied}"),
    # A norm of a branch output before the residual add (OLMo 2, Gemma sandwich norms): its input
    # is the branch's stream-typed output, so the same gain rule; zero gain in new layers where
    # the family's new_layer_zero is "branch_norms".
    "branch_norm_weight": Role("vector", cols="stream_circ", shape=("hidden",), gain=True, branch_norm=True,
                               rule="eta*V_circ(gamma), eta={eta} (norm of a branch output)"),
    # Attention.
    "q_weight": Role("rows", rows="q_heads", cols="stream_in", shape=("attn", "hidden"), split=True,
                     qk_norm_input=True, rule=_FAN_IN, what="query heads {hs}->{ht}"),
    "q_bias": Role("vector", cols="q_heads", shape=("attn",), qk_norm_input=True, rule=_REPLICATED),
    # k separately from v where the family normalises q and k (Qwen3, Gemma 3, OLMo 2).
    "k_weight": Role("rows", rows="kv_heads", cols="stream_in", shape=("kv_attn", "hidden"), split=True,
                     qk_norm_input=True, rule=_FAN_IN, what="kv heads {kvs}->{kvt}"),
    "k_bias": Role("vector", cols="kv_heads", shape=("kv_attn",), qk_norm_input=True, rule=_REPLICATED),
    "kv_weight": Role("rows", rows="kv_heads", cols="stream_in", shape=("kv_attn", "hidden"), split=True,
                      rule=_FAN_IN, what="kv heads {kvs}->{kvt}"),
    "kv_bias": Role("vector", cols="kv_heads", shape=("kv_attn",), rule=_REPLICATED),
    "qkv_weight": Role("rows", rows=("q_heads", "kv_heads", "kv_heads"), cols="stream_in",
                       shape=("attn + 2 * kv_attn", "hidden"), split=True, stored_transposed=True,
                       rule=_FAN_IN, what="[q|k|v] heads {hs}->{ht} per segment"),
    "qkv_bias": Role("vector", cols=("q_heads", "kv_heads", "kv_heads"), shape=("attn + 2 * kv_attn",),
                     rule=_REPLICATED),
    # GPT-NeoX query_key_value: per head [q k v] blocks of 3 * head_dim.
    "qkv_interleaved_weight": Role("rows", rows="heads_qkv", cols="stream_in", shape=("3 * attn", "hidden"),
                                   split=True, rule=_FAN_IN, what="[q k v] per head, heads {hs}->{ht}"),
    "qkv_interleaved_bias": Role("vector", cols="heads_qkv", shape=("3 * attn",), rule=_REPLICATED),
    # q/k norms: per head (head_dim unchanged: copied) or over the whole projection (replicated
    # with the heads: exact at integer head multiples only).
    "qk_norm_head": Role("vector", cols="keep", shape=("head_dim",), rule="copied (per head_dim, heads replicate)"),
    "q_norm_projection": Role("vector", cols="q_heads", shape=("attn",), integer_heads=True,
                              rule="V_circ over query heads (whole-projection norm)"),
    "k_norm_projection": Role("vector", cols="kv_heads", shape=("kv_attn",), integer_heads=True,
                              rule="V_circ over key heads (whole-projection norm)"),
    "o_weight": Role("rows", rows="stream", cols="q_heads", shape=("hidden", "attn"), split=True,
                     writes_stream=True, stored_transposed=True,
                     rule="rows write the stream ({k}); cols: split per replicated head, {split}"),
    "o_bias": Role("vector", cols="stream", shape=("hidden",), writes_stream=True, rule=_WRITES),
    # Feed-forward.
    "up_weight": Role("rows", rows="ffn", cols="stream_in", shape=("ffn", "hidden"), split=True,
                      stored_transposed=True, rule=_FAN_IN, what="neurons {fs}->{ft} circular"),
    "up_bias": Role("vector", cols="ffn", shape=("ffn",), rule=_REPLICATED),
    "down_weight": Role("rows", rows="stream", cols="ffn", shape=("hidden", "ffn"), split=True,
                        writes_stream=True, stored_transposed=True, rule=_DOWN),
    "down_bias": Role("vector", cols="stream", shape=("hidden",), writes_stream=True, rule=_WRITES),
    # Fused [gate | up] (Phi-3 gate_up_proj).
    "gate_up_weight": Role("rows", rows=("ffn", "ffn"), cols="stream_in", shape=("2 * ffn", "hidden"), split=True,
                           rule=_FAN_IN, what="[gate|up] neurons {fs}->{ft} per segment"),
    # Mixture of experts: the router keeps its experts; each expert is an MLP of its own width
    # (its own replica groups and noise keys); the shared expert and its (1, D) gate likewise.
    "router": Role("rows", rows="keep", cols="stream_in", shape=("experts", "hidden"), split=True,
                   rule=_FAN_IN, what="experts kept"),
    "expert_up_weight": Role("rows", rows="expert_ffn", cols="stream_in", shape=("expert_ffn", "hidden"), split=True,
                             rule=_FAN_IN, what="expert neurons {efs}->{eft} circular"),
    "expert_down_weight": Role("rows", rows="stream", cols="expert_ffn", shape=("hidden", "expert_ffn"), split=True,
                               writes_stream=True, rule=_DOWN),
    "experts_gate_up": Role("stacked", rows=("experts", "expert_ffn", "expert_ffn"), cols="stream_in",
                            shape=("experts", "2 * expert_ffn", "hidden"), split=True, rule=_FAN_IN,
                            what="per expert [gate|up] neurons {efs}->{eft}"),
    "experts_down": Role("stacked", rows=("experts", "stream"), cols="expert_ffn",
                         shape=("experts", "hidden", "expert_ffn"), split=True, writes_stream=True, rule=_DOWN),
    "shared_up_weight": Role("rows", rows="shared_ffn", cols="stream_in", shape=("shared_ffn", "hidden"), split=True,
                             rule=_FAN_IN, what="shared expert neurons circular"),
    "shared_down_weight": Role("rows", rows="stream", cols="shared_ffn", shape=("hidden", "shared_ffn"), split=True,
                               writes_stream=True, rule=_DOWN),
    "shared_gate": Role("rows", rows="keep", cols="stream_in", shape=(1, "hidden"), split=True, rule=_FAN_IN,
                        what="shared expert gate kept"),
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
