"""Tiny random Hugging Face models for the engine tests (built by transformers itself)."""
from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

VOCAB = 50
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def relative_error(reference: torch.Tensor, value: torch.Tensor) -> float:
    """max |reference - value| / max |reference| (the measure of every lossless check)."""
    return ((reference - value).abs().max() / reference.abs().max()).item()


def llama_family(kind: str, **overrides):
    """(model_class, config) for llama variants: gqa, mqa, tied, untied, qwen2, mistral."""
    import transformers as tf

    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=37, vocab_size=VOCAB, max_position_embeddings=64)
    if kind == "mqa":
        base["num_key_value_heads"] = 1
    if kind == "mha_tied":
        base.update(num_key_value_heads=4, tie_word_embeddings=True)
    if kind == "biases":
        base.update(attention_bias=True, mlp_bias=True)
    base.update(overrides)
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM, tf.Qwen2Config(**base)
    if kind == "mistral":
        return tf.MistralForCausalLM, tf.MistralConfig(**base)
    return tf.LlamaForCausalLM, tf.LlamaConfig(**base)


def gpt2_config(**overrides):
    import transformers as tf

    base = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32, resid_pdrop=0.0,
                embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, n_inner=37)
    base.update(overrides)
    return tf.GPT2Config(**base)


def bert_config(**overrides):
    import transformers as tf

    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                vocab_size=VOCAB, max_position_embeddings=32, **NO_DROPOUT)
    base.update(overrides)
    return tf.BertConfig(**base)


def vit_config(**overrides):
    import transformers as tf

    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                image_size=8, patch_size=4, num_labels=3, **NO_DROPOUT)
    base.update(overrides)
    return tf.ViTConfig(**base)


def build(model_class, config, dtype=torch.float64, seed=0, scale=0.05):
    """A seeded random ``model_class(config)`` in ``dtype``, eval mode, every parameter perturbed
    by N(0, scale) (random init leaves norms at 1 / 0: perturbed, each rule is exercised)."""
    torch.manual_seed(seed)
    model = model_class(config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def bf16_state_dict(model) -> dict:
    """``model``'s state dict rounded to bfloat16: a bf16 checkpoint of it."""
    return {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}


def token_batch(seed=1, batch=2, length=7, vocab=VOCAB):
    """Seeded random token ids, (batch, length), below ``vocab``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def image_batch(seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 8, 8, generator=g).to(dtype)
