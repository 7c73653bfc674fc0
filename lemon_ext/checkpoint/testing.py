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
