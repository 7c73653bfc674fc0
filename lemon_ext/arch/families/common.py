"""Table pieces shared by several families."""
from __future__ import annotations

#: Renames transformers applies to every checkpoint it loads (its "legacy" conversion mapping).
LEGACY_RENAMES = ((r"LayerNorm\.gamma", "LayerNorm.weight"), (r"LayerNorm\.beta", "LayerNorm.bias"))

from ..schema import Layout  # noqa: E402

#: The config fields of a Llama-style decoder (every family below that kept transformers' names).
DECODER_FIELDS = dict(
    hidden_size="hidden_size", intermediate_size="intermediate_size",
    num_attention_heads="num_attention_heads", num_key_value_heads="num_key_value_heads",
    num_hidden_layers="num_hidden_layers", eps="rms_norm_eps", head_dim="head_dim",
)

#: Shapes of a Llama-style decoder's token embedding and LM head.
DECODER_SHAPES = {"embed_tokens.weight": ("vocab_size", "hidden"), "lm_head.weight": ("vocab_size", "hidden")}

#: RoPE frequencies: persistent buffers in transformers < 4.31 (Llama 2, Mistral 7B v0.1, TinyLlama
#: uploads), one per layer, and a model-level one in some later saves.
ROPE_INV_FREQ = {
    "layers.{i}.self_attn.rotary_emb.inv_freq": "RoPE inverse frequencies (rebuilt from rope_theta)",
    "rotary_emb.inv_freq": "RoPE inverse frequencies (rebuilt from rope_theta)",
}


def decoder_layouts(*stems: str, models: tuple[str, ...] | None = None,
                    extra: tuple[Layout, ...] = ()) -> tuple[Layout, ...]:
    """The layouts of a Llama-style decoder for model-class name stems (``"Qwen3"`` ->
    ``Qwen3ForCausalLM`` under ``model.`` with ``lm_head`` tied to the embedding when the config
    says so, and the bare ``Qwen3Model``, or the classes ``models``), plus ``extra`` layouts
    before the bare backbone."""
    causal_lm = Layout("causal_lm", "model.", head=(("lm_head.weight", "head"),),
                       tied=(("lm_head.weight", "model.embed_tokens.weight"),), final_norm=("model.norm.weight",),
                       architectures=tuple(f"{stem}ForCausalLM" for stem in stems))
    base = Layout("base", "", architectures=models or tuple(f"{stem}Model" for stem in stems))
    return (causal_lm, *extra, base)


def decoder_attention(*, qkv_bias: str | None = "attention_bias", o_bias: str | None = "attention_bias",
                      qk_norm: str | None = None) -> tuple[tuple[str, ...], ...]:
    """The ``self_attn`` entries of a Llama-style block: q/k/v/o projections, their optional
    biases (present from a config alone when ``qkv_bias`` / ``o_bias`` hold; None: no bias), and
    q/k norms ``qk_norm``: "head_dim" (per head, copied) or "projection" (over the whole projection);
    with q/k norms, k is the ``k_*`` role (its rows follow the eta rule of the q/k norm)."""
    k = "k" if qk_norm else "kv"
    entries = [("layers.{i}.self_attn.q_proj.weight", "q_weight"), ("layers.{i}.self_attn.q_proj.bias?", "q_bias", qkv_bias),
               ("layers.{i}.self_attn.k_proj.weight", f"{k}_weight"), ("layers.{i}.self_attn.k_proj.bias?", f"{k}_bias", qkv_bias),
               ("layers.{i}.self_attn.v_proj.weight", "kv_weight"), ("layers.{i}.self_attn.v_proj.bias?", "kv_bias", qkv_bias),
               ("layers.{i}.self_attn.o_proj.weight", "o_weight"), ("layers.{i}.self_attn.o_proj.bias?", "o_bias", o_bias)]
    entries = [e for e in entries if not (e[0].endswith("?") and e[2] is None)]
    if qk_norm == "head_dim":
        entries += [("layers.{i}.self_attn.q_norm.weight", "qk_norm_head"),
                    ("layers.{i}.self_attn.k_norm.weight", "qk_norm_head")]
    elif qk_norm == "projection":
        entries += [("layers.{i}.self_attn.q_norm.weight", "q_norm_projection"),
                    ("layers.{i}.self_attn.k_norm.weight", "k_norm_projection")]
    return tuple(entries)


def swiglu(bias: str | None = None) -> tuple[tuple[str, ...], ...]:
    """The ``mlp`` entries of a SwiGLU FFN (gate, up, down), with optional biases when ``bias`` holds."""
    entries = [("layers.{i}.mlp.gate_proj.weight", "up_weight"), ("layers.{i}.mlp.gate_proj.bias?", "up_bias", bias),
               ("layers.{i}.mlp.up_proj.weight", "up_weight"), ("layers.{i}.mlp.up_proj.bias?", "up_bias", bias),
               ("layers.{i}.mlp.down_proj.weight", "down_weight"), ("layers.{i}.mlp.down_proj.bias?", "down_bias", bias)]
    return tuple(e for e in entries if not (e[0].endswith("?") and e[2] is None))
