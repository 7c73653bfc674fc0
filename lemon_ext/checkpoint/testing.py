"""Helpers for tests and benchmarks: tiny Hugging Face checkpoints in every input format, peak RSS.

Not imported by the package itself (transformers is only needed here and in ``verify``).
"""
from __future__ import annotations

import json
import os

import torch


def tiny_llama_config(*, tied: bool = False, layers: int = 2, hidden: int = 32, ffn: int = 64, heads: int = 4,
                      kv_heads: int = 2, vocab: int = 96):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, head_dim=hidden // heads, num_hidden_layers=layers,
                       tie_word_embeddings=tied, max_position_embeddings=64)


def save_model(model, path: str, fmt: str = "safetensors", shard_bytes: int = 40_000) -> None:
    """Save ``model`` as: "safetensors" (one file), "sharded" (index + shards), "bin", "sharded_bin"."""
    os.makedirs(path, exist_ok=True)
    if fmt in ("safetensors", "sharded"):
        model.save_pretrained(path, max_shard_size=shard_bytes if fmt == "sharded" else "10GB")
        return
    model.config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:  # like save_pretrained: the tied head is not stored
        for name in getattr(model, "_tied_weights_keys", None) or []:
            sd.pop(name, None)
        sd.pop("lm_head.weight", None)
    if fmt == "bin":
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
        return
    names = list(sd)
    half = len(names) // 2
    wmap = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, os.path.join(path, fname))
        wmap.update({k: fname for k in part})
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(t.nbytes for t in sd.values())}, "weight_map": wmap}, f)


def make_tiny_llama(path: str, fmt: str = "safetensors", *, tied: bool = False, dtype=torch.float32, seed: int = 0,
                    **cfg_kwargs):
    """A random tiny LlamaForCausalLM saved at ``path``; returns the model (eval mode)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tied=tied, **cfg_kwargs)).to(dtype).eval()
    with torch.no_grad():  # non-trivial norm gains so the eta/tied scalings are exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    save_model(model, path, fmt)
    return model


def peak_rss_bytes() -> int:
    """Peak resident set of this process (VmHWM; unlike ru_maxrss it is not inherited over fork+exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def synthetic_llama_config(hidden, ffn, heads, kv_heads, layers, vocab, dtype="bfloat16") -> dict:
    """config.json of a Llama-shaped model (untied head), for synthetic checkpoints."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": ffn, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": hidden // heads, "num_hidden_layers": layers, "vocab_size": vocab,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 4096,
            "hidden_act": "silu", "initializer_range": 0.02, "dtype": dtype}


def synthetic_llama_tensors(cfg: dict) -> list[tuple[str, tuple]]:
    """(name, shape) of every tensor of a LlamaForCausalLM with ``cfg``, in model order."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kvd = cfg["num_key_value_heads"] * cfg["head_dim"]
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kvd, h)), (p + "self_attn.v_proj.weight", (kvd, h)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def make_synthetic_llama(path: str, cfg: dict, *, dtype=torch.bfloat16, max_shard_size="1GB", seed: int = 0) -> int:
    """Write a sharded Llama-shaped checkpoint in bounded memory (streamed with our shard writer).

    Values are slices of one 32 Mi-element random block (generating fresh noise per tensor costs
    more than the expansion itself on 2 cores); norm gains are 1. Returns the bytes of tensors.
    """
    import math
    import zlib

    from .outdir import write_json_atomic
    from .shards import build_index, plan_shards
    from .writer import ShardWriter

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    g = torch.Generator().manual_seed(seed)
    block = (torch.randn(1 << 25, generator=g) * 0.02).to(dtype)
    shapes = dict(synthetic_llama_tensors(cfg))
    shards = plan_shards([(n, dtype, s) for n, s in shapes.items()], max_shard_size)
    for sh in shards:
        w = ShardWriter(path, sh)
        for name, _, shape in sh.tensors:
            n = math.prod(shape)
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=dtype)
            else:
                # crc32, not hash(): str hashes change per process, and the same seed must give
                # the same checkpoint in every process
                start = (zlib.crc32(name.encode()) & 0xFFFF) * 7 % max(1, block.numel() - n) if n < block.numel() else 0
                t = block[start:start + n] if n <= block.numel() else block.repeat(-(-n // block.numel()))[:n]
            w.write(name, t.reshape(shape))
        w.close()
    index = build_index(shards)
    if index is not None:
        write_json_atomic(os.path.join(path, "model.safetensors.index.json"), index)
    return sum(sh.nbytes for sh in shards)
