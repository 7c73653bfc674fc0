"""Reproduce LEMON's claim at CPU scale: an expanded model reaches a from-scratch model's final
validation loss with a fraction of its training FLOPs.

Data: the English documentation text shipped with every Python (``pydoc_data.topics``), byte
level (vocab 256), last 10% held out for validation. Models: GPT-2 (Pre-LN) from transformers.

1. pretrain the source  GPT-2(L, D)       for ``scratch_steps`` (its FLOPs are reported apart);
2. expand it with ``lemon_ext.expand_model`` to GPT-2(2L, 2D) (heads doubled, head_dim kept);
   check the expanded model's validation loss equals the source's (lossless);
3. (a) train GPT-2(2L, 2D) from scratch: AdamW, peak LR, warmup, cosine to 0 at ``scratch_steps``;
   (b) train the expanded model with the LEMON schedule: the same optimizer, peak LR and warmup,
   cosine compressed to ``lemon_total_steps(scratch_steps, r)`` for each budget ratio r;
4. report validation-loss curves (PNG), steps and FLOPs each run needs to reach the from-scratch
   final validation loss, and the saving with and without the source's pretraining (JSON).

    python examples/reproduce_lemon.py --out out/lemon            # full run (~30 min, 2-core CPU)
    python examples/reproduce_lemon.py --quick --out /tmp/q       # CI smoke (< 2 min)
    python examples/reproduce_lemon.py --device cuda --out out/g  # on a GPU

Every run checkpoints into ``--out``: rerunning the same command resumes where it stopped.
FLOPs are counted as 6 x (matmul parameters) + 6 x layers x context x width per token
(Kaplan et al. 2020; forward + backward, embeddings lookups free, evaluation excluded).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

from lemon_ext.schedule import lemon_total_steps  # noqa: E402
from lemon_ext.train import evaluate, train  # noqa: E402

# Full run: sizes picked so the whole experiment fits ~30 min on this 2-core CPU while other jobs
# share it (measured 07:35 UTC, load ~4.5, 1 thread: 0.55 s per step of the 220k-param target at
# 1024 tokens, 0.15 s for the source). Cost in scratch-run units: source ~0.27 (per-op overhead,
# not FLOPs, dominates at this size) + scratch 1 + LEMON 0.3 + 0.5 + 0.6 + 0.75 + 0.5 (grown
# AdamW state) = ~3.9 units.
FULL = dict(width=32, layers=2, heads=2, seq=64, batch=16, scratch_steps=800, lr=3e-3, warmup=40,
            eval_every=20, ratios=(0.3, 0.5, 0.6, 0.75), grown_adam_ratios=(0.5,), val_windows=256, dropout=0.0)
QUICK = dict(width=16, layers=1, heads=1, seq=32, batch=8, scratch_steps=40, lr=3e-3, warmup=4,
             eval_every=10, ratios=(0.5,), grown_adam_ratios=(0.5,), val_windows=32, dropout=0.0)


class ByteWindows(torch.utils.data.Dataset):
    """Windows of ``seq`` bytes at seeded random offsets: item i -> {"input_ids": LongTensor[seq],
    "labels": same} (GPT-2 shifts labels itself). Random offsets instead of fixed blocks give a
    different tokenisation boundary each time a passage is seen (less memorisation of 420 KB)."""

    def __init__(self, data: torch.Tensor, seq: int, n_items: int, seed: int):
        self.data, self.seq = data, seq
        g = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(0, len(data) - seq, (n_items,), generator=g)

    def __len__(self):
        return len(self.offsets)

    def __getitem__(self, i):
        w = self.data[self.offsets[i]: self.offsets[i] + self.seq].long()
        return {"input_ids": w, "labels": w}


class ValWindows(torch.utils.data.Dataset):
    """Consecutive non-overlapping windows of the held-out text (fixed: every eval sees the same)."""

    def __init__(self, data: torch.Tensor, seq: int, n: int):
        n = min(n, len(data) // seq)
        self.blocks = data[: n * seq].long().view(n, seq)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def load_text() -> tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 bytes of all pydoc topics (sorted by key: the same order everywhere), 90/10 split."""
    from pydoc_data.topics import topics

    raw = "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    cut = int(0.9 * len(data))
    return data[:cut], data[cut:]


def gpt2(width, layers, heads, seq, dropout, seed):
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=seq, n_embd=width, n_layer=layers, n_head=heads,
                                  resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg)


def flops_per_token(cfg) -> float:
    """Training FLOPs per token of a GPT2 config: 6 x matmul params + 6 x L x ctx x D (attention)."""
    d, L, ctx, v = cfg.n_embd, cfg.n_layer, cfg.n_positions, cfg.vocab_size
    inner = cfg.n_inner or 4 * d
    matmul = L * (3 * d * d + d * d + 2 * d * inner) + d * v  # qkv, out, mlp up+down, LM head
    return 6.0 * matmul + 6.0 * L * ctx * d


def read_curve(out_dir: str) -> list[tuple[int, float]]:
    """(step, val loss) from a run's metrics.jsonl: complete even when the run was resumed."""
    path = os.path.join(out_dir, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    return sorted({r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}.items())


def first_reach(curve, target) -> int | None:
    """First evaluated step with val loss <= target (sensitive to one lucky evaluation)."""
    return next((s for s, v in curve if v <= target), None)


def sustained_reach(curve, target) -> int | None:
    """First evaluated step from which every later evaluation stays <= target (the robust figure:
    the 128-256-window validation set moves by ~0.01 between neighbouring evaluations)."""
    reach = None
    for s, v in curve:
        if v > target:
            reach = None
        elif reach is None:
            reach = s
    return reach


seconds: list[float] = []  # wall time of each run() in this process (0 when it resumed a finished run)


def run(name, model, train_set, val_set, p, total_steps, out, device, seed, **kw):
    t = time.time()
    run_dir = os.path.join(out, name)
    train(model, train_set, val_set, out_dir=run_dir, batch_size=p["batch"], total_steps=total_steps,
          lr=p["lr"], warmup_steps=p["warmup"], eval_every=p["eval_every"], eval_batch_size=64,
          weight_decay=0.1, betas=(0.9, 0.95), max_grad_norm=1.0, log_every=25, save_every=200,
          device=device, seed=seed, progress=sys.stderr.isatty(), extra={"run": name}, **kw)
    curve = read_curve(run_dir)
    seconds.append(time.time() - t)
    print(f"[{name}] {total_steps} steps, final val {curve[-1][1]:.4f} ({seconds[-1]:.0f} s here)", flush=True)
    return curve


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny CI-sized run (< 2 min)")
    ap.add_argument("--out", default="out/reproduce_lemon", help="run directory; results.json and the plot go here")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    p = dict(QUICK if args.quick else FULL)
    seconds.clear()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    import lemon_ext  # the engine (expand_model)

    train_text, val_text = load_text()
    T = p["scratch_steps"]
    n_items = T * p["batch"]  # one pass over distinct windows for the longest run
    train_set = ByteWindows(train_text, p["seq"], n_items, seed=args.seed)
    val_set = ValWindows(val_text, p["seq"], p["val_windows"])
    src_shape = dict(width=p["width"], layers=p["layers"], heads=p["heads"])
    tgt_shape = dict(width=2 * p["width"], layers=2 * p["layers"], heads=2 * p["heads"])

    # 1. source pretraining (as long as the target's scratch run: ~1/7 of its FLOPs at these sizes)
    source = gpt2(**src_shape, seq=p["seq"], dropout=p["dropout"], seed=args.seed)
    src_curve = run("source", source, train_set, val_set, p, T, args.out, args.device, args.seed)

    # 2. lossless expansion 2x width (heads doubled, head_dim kept) and 2x depth (interleaved)
    grow = dict(hidden_size=tgt_shape["width"], intermediate_size=4 * tgt_shape["width"],
                num_attention_heads=tgt_shape["heads"], num_hidden_layers=tgt_shape["layers"], seed=args.seed)
    expanded = lemon_ext.expand_model(source.cpu(), **grow)
    src_val = evaluate(source.to(args.device), val_set, batch_size=64)
    exp_val = evaluate(expanded.to(args.device), val_set, batch_size=64)
    print(f"source val {src_val:.6f}  expanded val {exp_val:.6f}  (|diff| {abs(src_val - exp_val):.2e})", flush=True)

    # 3a. target from scratch, full schedule
    scratch = gpt2(**tgt_shape, seq=p["seq"], dropout=p["dropout"], seed=args.seed + 1)
    scratch_curve = run("scratch", scratch, train_set, val_set, p, T, args.out, args.device, args.seed,
                        eval_at_start=True)
    target = scratch_curve[-1][1]

    # 3b. expanded model, LEMON schedule at each budget ratio (fresh AdamW state, as in the paper)
    fpt_t, fpt_s = flops_per_token(scratch.config), flops_per_token(source.config)
    tokens_per_step = p["batch"] * p["seq"]
    scratch_flops = T * tokens_per_step * fpt_t
    source_flops = T * tokens_per_step * fpt_s

    def record(r, steps, curve):
        reach = sustained_reach(curve, target)
        return {"budget_ratio": r, "total_steps": steps, "start_val_loss": curve[0][1], "final_val_loss": curve[-1][1],
                "reached_scratch_final": reach is not None, "steps_to_reach": reach,
                "steps_to_first_touch": first_reach(curve, target), "seconds": seconds[-1],
                "flops_to_reach": None if reach is None else reach * tokens_per_step * fpt_t,
                "flops_fraction_to_reach": None if reach is None else reach / T,
                # scratch steps needed to reach this run's final loss: its compute-equivalent
                "scratch_steps_to_match_final": first_reach(scratch_curve, curve[-1][1]), "curve": curve}

    runs = {}
    for r in p["ratios"]:
        steps = lemon_total_steps(T, r)
        curve = run(f"lemon_r{r:g}", copy.deepcopy(expanded), train_set, val_set, p, steps, args.out, args.device,
                    args.seed, eval_at_start=True)
        runs[f"{r:g}"] = record(r, steps, curve)

    # 3c. (beyond the paper) the same LEMON schedule, but AdamW state carried from the source's
    # last checkpoint through expand_optimizer_state instead of a fresh optimizer
    grown = {}
    for r in p["grown_adam_ratios"]:
        from lemon_ext.optim_state import expand_optimizer_state
        from lemon_ext.train import build_adamw, latest_checkpoint

        opt_s = build_adamw(source.cpu(), lr=p["lr"], weight_decay=0.1, betas=(0.9, 0.95))
        ckpt = torch.load(os.path.join(latest_checkpoint(os.path.join(args.out, "source")), "state.pt"),
                          weights_only=False)
        opt_s.load_state_dict(ckpt["optimizer"])
        model_g = copy.deepcopy(expanded).cpu()
        opt_g = expand_optimizer_state(opt_s, source, model_g, **grow)
        for group in opt_g.param_groups:  # the source's schedule ended at lr ~0: restart at the peak
            group["lr"] = p["lr"]
            group.pop("initial_lr", None)
        steps = lemon_total_steps(T, r)
        curve = run(f"lemon_r{r:g}_grown_adam", model_g, train_set, val_set, p, steps, args.out, args.device,
                    args.seed, eval_at_start=True, optimizer=opt_g)
        grown[f"{r:g}"] = record(r, steps, curve)

    reached = [v for v in runs.values() if v["reached_scratch_final"]]
    best = min(reached, key=lambda v: v["steps_to_reach"]) if reached else None
    # smallest budget whose *final* loss matches scratch: the paper's way of quoting savings
    by_budget = min((v for v in reached if v["final_val_loss"] <= target), key=lambda v: v["budget_ratio"], default=None)
    results = {
        "data": "pydoc_data.topics (Python %d.%d), bytes, 90/10 split: %d train / %d val bytes" % (
            sys.version_info[0], sys.version_info[1], len(train_text), len(val_text)),
        "source": {**src_shape, "params": sum(q.numel() for q in source.parameters()), "steps": T,
                   "final_val_loss": src_curve[-1][1], "flops": source_flops, "seconds": seconds[0], "curve": src_curve},
        "expanded_start_val_loss": exp_val, "source_val_loss": src_val,
        "lossless_abs_diff": abs(exp_val - src_val),
        "target": {**tgt_shape, "params": sum(q.numel() for q in scratch.parameters())},
        "hyper": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()},
        "tokens_per_step": tokens_per_step, "flops_per_token_target": fpt_t, "flops_per_token_source": fpt_s,
        "scratch": {"steps": T, "final_val_loss": target, "flops": scratch_flops, "seconds": seconds[1],
                    "curve": scratch_curve},
        "lemon": runs,
        "lemon_grown_adam": grown,
        # saving of from-scratch training FLOPs by the best run, at the eval from which it stays
        # <= the scratch final val loss (steps_to_reach; steps_to_first_touch is the optimistic one)
        "flops_saving": None if best is None else 1.0 - best["steps_to_reach"] / T,
        "flops_saving_best_run": None if best is None else best["budget_ratio"],
        "flops_saving_with_source": None if best is None else
        1.0 - (best["flops_to_reach"] + source_flops) / scratch_flops,
        "flops_saving_by_final_budget": None if by_budget is None else 1.0 - by_budget["total_steps"] / T,
        "wall_seconds": time.time() - t0,
        "device": args.device, "torch": torch.__version__, "quick": args.quick,
    }
    with open(os.path.join(args.out, "reproduce_lemon.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(args.out, "reproduce_lemon.png"))
    with open(os.path.join(args.out, "reproduce_lemon_table.md"), "w") as f:
        f.write(markdown(results))
    summary(results)
    return results


def markdown(res) -> str:
    """The results table (docs/reproduce_lemon.md is written from this, not by hand)."""
    T, sf = res["scratch"]["steps"], res["scratch"]["flops"]
    rows = ["| run | training steps | training FLOPs | final val loss | steps (FLOPs) to reach scratch final |",
            "|---|---|---|---|---|",
            f"| source GPT-2 L{res['source']['layers']}/D{res['source']['width']} pretraining | {T} | "
            f"{res['source']['flops']:.3g} | {res['source']['final_val_loss']:.4f} | - |",
            f"| target L{res['target']['layers']}/D{res['target']['width']} from scratch | {T} | {sf:.3g} | "
            f"{res['scratch']['final_val_loss']:.4f} | {T} (100%) |"]
    for name, run in [("", r) for r in res["lemon"].values()] + [
            (", AdamW state grown", r) for r in res.get("lemon_grown_adam", {}).values()]:
        reach = run["steps_to_reach"]
        rows.append(f"| LEMON, budget {run['budget_ratio']:.0%}{name} | {run['total_steps']} | "
                    f"{run['total_steps'] * res['tokens_per_step'] * res['flops_per_token_target']:.3g} | "
                    f"{run['final_val_loss']:.4f} | "
                    + (f"{reach} ({run['flops_fraction_to_reach']:.0%})" if reach else "not reached") + " |")
    return "\n".join(rows) + "\n"


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = res["scratch"]["steps"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    s, v = zip(*res["scratch"]["curve"])
    ax.plot([x / T for x in s], v, color="black", lw=2, label="target from scratch (full schedule)")
    for key, run in res["lemon"].items():
        s, v = zip(*run["curve"])
        ax.plot([x / T for x in s], v, lw=1.5, label=f"LEMON, budget {run['budget_ratio']:.0%}")
    for key, run in res.get("lemon_grown_adam", {}).items():
        s, v = zip(*run["curve"])
        ax.plot([x / T for x in s], v, lw=1.2, ls="--", label=f"LEMON, budget {run['budget_ratio']:.0%}, AdamW state grown")
    ax.axhline(res["scratch"]["final_val_loss"], color="gray", ls="--", lw=1, label="scratch final val loss")
    ax.axhline(res["source"]["final_val_loss"], color="tab:brown", ls=":", lw=1, label="source final val loss")
    ax.set_xlabel("target training FLOPs / from-scratch training FLOPs (source pretraining excluded)")
    ax.set_ylabel("validation loss (nats / byte)")
    lo = res["scratch"]["final_val_loss"]
    ax.set_ylim(lo - 0.1, max(res["source"]["final_val_loss"], lo) + 0.6)
    ax.set_title("GPT-2 L%d/D%d -> L%d/D%d on pydoc text" % (res["source"]["layers"], res["source"]["width"],
                                                            res["target"]["layers"], res["target"]["width"]))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(res):
    print(f"scratch final val {res['scratch']['final_val_loss']:.4f}; source {res['source']['final_val_loss']:.4f}; "
          f"expanded start {res['expanded_start_val_loss']:.4f}")
    for run in res["lemon"].values():
        reach = run["steps_to_reach"]
        print(f"  budget {run['budget_ratio']:.2f}: final {run['final_val_loss']:.4f}, reaches scratch final at "
              + (f"step {reach} ({run['flops_fraction_to_reach']:.0%} of scratch FLOPs)" if reach else "never"))
    fs = res["flops_saving"]
    print("flops_saving:", "n/a" if fs is None else f"{fs:.1%} (with source pretraining: {res['flops_saving_with_source']:.1%})")


if __name__ == "__main__":
    main()
