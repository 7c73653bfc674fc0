"""AdamW with weight decay only on matrices: not on norms, biases or embeddings."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["decay_groups", "build_adamw"]

# Embedding-like modules: their weights are lookup tables (and a tied LM head shares them), so
# decaying them shrinks rare tokens toward 0; GPT-2/BERT/LLaMA recipes all exclude them.
_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into ``[{decay}, {no decay}]`` AdamW groups.

    No decay for: every parameter with ``ndim < 2`` (LayerNorm/RMSNorm gains and biases, all
    biases), weights of ``nn.Embedding`` modules, and any parameter whose name contains
    ``embed``/``wte``/``wpe`` (HF position embeddings stored as bare Parameters, e.g. ViT's
    ``position_embeddings``, ``cls_token``) or ``norm``. A parameter tied to an embedding (GPT-2's
    ``lm_head.weight``) is the same object and is listed once, in the no-decay group.
    """
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, _EMBEDDING_TYPES):
            no_decay_ids.add(id(module.weight))
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():  # named_parameters() already drops tied duplicates
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        lname = name.lower()
        if (p.ndim < 2 or id(p) in no_decay_ids or "norm" in lname or "embed" in lname
                or "wte" in lname or "wpe" in lname or "cls_token" in lname):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model: nn.Module, *, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
                eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over ``decay_groups(model, weight_decay)``; fused on CUDA (one kernel per step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = True if params and all(p.is_cuda for p in params) else None
    return torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps,
                             fused=fused)
