"""expand_state_dict through the GPU pipeline on a host state dict of many GB, against the pinned
host <-> device bandwidth measured in the same run (issue 4).

A Llama-shaped bf16 state dict in host memory is grown 2x in width and 1.5x in depth with
``expand_state_dict_pipelined(sd, cfg, device="cuda")`` (sources go up and targets come back
through pinned buffers while the next tensor loads). In the same run: pinned H2D and D2H copies of
1 GiB (the bandwidths the pipeline can reach), and the transfer bound max(source / H2D, target /
D2H) (the two directions use separate copy engines, so they overlap). Prints seconds, GB/s moved
(source up + target down), pipeline time / transfer bound, and checks a sample of the tensors
against the CPU backend (the backends agree bit for bit).

    python benchmarks/bench_pipeline_gpu.py                  # GPU: ~2.2 GB source -> ~12.4 GB target
    python benchmarks/bench_pipeline_gpu.py --small --device cpu   # smoke run without a GPU
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import time

import torch

from lemon_ext.checkpoint.testing import synthetic_llama_config, synthetic_llama_tensors
from lemon_ext.engine.api import expand_state_dict_pipelined

# ~1.1B parameters (TinyLlama's shape, 2.2 GB bf16) -> 2x width, 1.5x depth
FULL = dict(hidden=2048, ffn=5632, heads=32, kv_heads=4, layers=22, vocab=32000)
SMALL = dict(hidden=256, ffn=688, heads=8, kv_heads=2, layers=4, vocab=1000)


def host_state_dict(cfg: dict, dtype=torch.bfloat16) -> dict:
    """Random values (slices of one block: fresh noise per tensor would dominate the set-up)."""
    g = torch.Generator().manual_seed(0)
    block = (torch.randn(1 << 24, generator=g) * 0.02).to(dtype)
    sd = {}
    for name, shape in synthetic_llama_tensors(cfg):
        n = math.prod(shape)
        reps = -(-n // block.numel())
        sd[name] = (block.repeat(reps)[:n] if reps > 1 else block[:n]).reshape(shape).clone()
    return sd


def pinned_bandwidth(device, nbytes: int = 1 << 30, reps: int = 5) -> tuple[float, float]:
    """(H2D, D2H) GB/s of pinned copies of ``nbytes``, best of ``reps``."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = [float("inf"), float("inf")]
    for _ in range(reps):
        for k, (dst, src) in enumerate(((dev, host), (host, dev))):
            torch.cuda.synchronize(device)
            t = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize(device)
            best[k] = min(best[k], time.perf_counter() - t)
    return nbytes / best[0] / 1e9, nbytes / best[1] / 1e9


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="a ~10M-parameter model (smoke run)")
    ap.add_argument("--repeats", type=int, default=2, help="pipeline runs; the best counts")
    ap.add_argument("--json", default=None, help="write the result row here")
    a = ap.parse_args(argv)
    shape = SMALL if a.small else FULL
    cfg = synthetic_llama_config(**shape)
    sizes = dict(hidden_size=2 * shape["hidden"], intermediate_size=2 * shape["ffn"],
                 num_attention_heads=2 * shape["heads"], num_key_value_heads=2 * shape["kv_heads"],
                 num_hidden_layers=shape["layers"] * 3 // 2)
    sd = host_state_dict(cfg)
    src_bytes = sum(t.numel() * t.element_size() for t in sd.values())
    device = torch.device(a.device)
    h2d = d2h = None
    if device.type == "cuda":
        h2d, d2h = pinned_bandwidth(device)
    times, out = [], None
    for _ in range(max(1, a.repeats)):
        out = None  # free the previous result first (pinned host memory)
        t = time.perf_counter()
        out, _ = expand_state_dict_pipelined(sd, cfg, seed=0, device=device, **sizes)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    tgt_bytes = sum(t.numel() * t.element_size() for t in out.values())
    # Check a sample against the CPU backend: the embedding, one FFN up projection, the head.
    sample = [n for n in out if n.endswith(("embed_tokens.weight", "layers.1.mlp.up_proj.weight", "lm_head.weight"))]
    from lemon_ext.engine import plan_expansion  # the sampled tensors, expanded on CPU one by one
    plan = plan_expansion(cfg, seed=0, source_shapes={n: tuple(t.shape) for n, t in sd.items()}, **sizes)
    specs = {s.name: s for s in plan.specs}
    ref = {n: specs[n].execute(sd[specs[n].source], seed=0, dtype=sd[specs[n].source].dtype, device="cpu",
                               backend="auto") for n in sample}
    mismatched = [n for n in sample if not torch.equal(out[n].cpu(), ref[n])]
    best = min(times)
    row = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "commit": git_commit(), "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "source_gb": src_bytes / 1e9, "target_gb": tgt_bytes / 1e9, "seconds": times, "best_s": best,
        "gbps_moved": (src_bytes + tgt_bytes) / best / 1e9, "pinned_h2d_gbps": h2d, "pinned_d2h_gbps": d2h,
        "sample_checked": sample, "sample_mismatched": mismatched,
    }
    if h2d:
        bound = max(src_bytes / (h2d * 1e9), tgt_bytes / (d2h * 1e9))
        row.update(transfer_bound_s=bound, x_transfer_bound=best / bound)
    print(f"source {row['source_gb']:.2f} GB -> target {row['target_gb']:.2f} GB on {row['device']}: "
          f"best {best:.2f} s of {[round(t, 2) for t in times]}, {row['gbps_moved']:.1f} GB/s moved")
    if h2d:
        print(f"pinned H2D {h2d:.1f} GB/s, D2H {d2h:.1f} GB/s (same run): transfer bound {row['transfer_bound_s']:.2f} s, "
              f"pipeline = {row['x_transfer_bound']:.2f}x the bound")
    print(f"sample vs CPU backend: {len(sample) - len(mismatched)}/{len(sample)} tensors bitwise equal"
          + (f"; MISMATCH {mismatched}" if mismatched else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(row, f, indent=1)
    if mismatched:
        raise SystemExit(1)
    return row


if __name__ == "__main__":
    main()
