"""Llama-family expansion against an independent float64 re-implementation of the model.

transformers runs RMSNorm in float32 even for a float64 model, which caps agreement at ~1e-7 for
indivisible widths. This file re-implements the forward pass (RMSNorm, RoPE, GQA attention, SwiGLU,
tied or untied head) in float64 from the state dict alone, and requires 1e-10.
"""
import pytest
import torch

import lemon_ext
from helpers_engine import build, llama_family, relative_error, token_batch


def rms_norm(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x, theta=10000.0):
    """x: (B, H, T, hd) -> rotated, the half-split convention of transformers' Llama."""
    hd, t = x.shape[-1], x.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.outer(torch.arange(t, dtype=torch.float64), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def llama_forward(sd: dict, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of a Llama-family causal LM, float64 throughout."""
    d, h, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps = cfg.get("head_dim") or d // h, cfg["rms_norm_eps"]
    x = sd["model.embed_tokens.weight"][ids]
    b, t, _ = x.shape
    mask = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)

    def lin(name, y):
        out = y @ sd[name + ".weight"].T
        return out + sd[name + ".bias"] if name + ".bias" in sd else out

    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        y = rms_norm(x, sd[p + "input_layernorm.weight"], eps)
        q = lin(p + "self_attn.q_proj", y).view(b, t, h, hd).transpose(1, 2)
        k = lin(p + "self_attn.k_proj", y).view(b, t, kv, hd).transpose(1, 2)
        v = lin(p + "self_attn.v_proj", y).view(b, t, kv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(h // kv, dim=1)
        v = v.repeat_interleave(h // kv, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5 + mask, -1) @ v
        x = x + lin(p + "self_attn.o_proj", att.transpose(1, 2).reshape(b, t, h * hd))
        y = rms_norm(x, sd[p + "post_attention_layernorm.weight"], eps)
        gate = torch.nn.functional.silu(lin(p + "mlp.gate_proj", y))
        x = x + lin(p + "mlp.down_proj", gate * lin(p + "mlp.up_proj", y))
    x = rms_norm(x, sd["model.norm.weight"], eps)
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return x @ head.T


@pytest.mark.parametrize("kind", ["gqa", "mqa", "mha_tied", "biases", "qwen2"])
@pytest.mark.parametrize("sizes", [dict(hidden_size=64, intermediate_size=74, num_hidden_layers=4),
                                   dict(hidden_size=48, intermediate_size=55, num_hidden_layers=5)],
                         ids=["2x", "1.5x"])
def test_llama_float64_reference(kind, sizes):
    cls, cfg = llama_family(kind)
    model = build(cls, cfg)
    sd = model.state_dict()
    cfg_d = cfg.to_dict()
    sd_t, cfg_t = lemon_ext.expand_state_dict(sd, cfg_d, **sizes)
    x = token_batch()
    ref = llama_forward(sd, cfg_d, x)
    with torch.no_grad():  # the re-implementation agrees with transformers on the source
        assert relative_error(model(x).logits, ref) <= 1e-6
    assert relative_error(ref, llama_forward(sd_t, cfg_t, x)) <= 1e-10
