"""expand_state_dict through the GPU pipeline on a host state dict of many GB, against the pinned
host <-> device bandwidth measured in the same run (issues 4 and 14); and lemon-expand --device
cuda on a sharded checkpoint against a plain write of the same bytes (``--checkpoint``).

A Llama-shaped bf16 state dict in host memory is grown 2x in width and 1.5x in depth with
``expand_state_dict_pipelined(sd, cfg, device="cuda")`` (sources go up and targets come back
through reused pinned buffers while the next tensor loads; the writer thread copies each result
into a pageable tensor). In the same run: pinned H2D and D2H copies of 1 GiB (the bandwidths the
pipeline can reach), a pinned -> fresh pageable host copy of 1 GiB (what handing over pageable
results costs), and the transfer bound max(source / H2D, target / D2H) (the two directions use
separate copy engines, so they overlap). Prints seconds, GB/s moved (source up + target down),
the pipeline's time against the transfer bound (target: >= 80%), its stage timings (read, H2D,
kernel, D2H, host copy, write), the pinned bytes against the plan, and checks a sample of the
tensors against the CPU backend (the backends agree bit for bit). ``--compare-pinned-results``
also times the earlier design (each result a fresh page-locked tensor).

    python benchmarks/bench_pipeline_gpu.py                  # GPU: ~2.2 GB source -> ~12.4 GB target
    python benchmarks/bench_pipeline_gpu.py --checkpoint     # GPU: lemon-expand --device cuda, >= 2 GB
    python benchmarks/bench_pipeline_gpu.py --small --device cpu   # smoke run without a GPU
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

import torch

from lemon_ext.checkpoint.testing import synthetic_llama_config, synthetic_llama_tensors

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


def host_copy_bandwidth(nbytes: int = 1 << 30, reps: int = 3) -> float:
    """GB/s of copying a pinned buffer into a fresh pageable tensor (allocation and first touch
    included), as the writer thread does for every result: best of ``reps``."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst = torch.empty(nbytes, dtype=torch.uint8)
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
        del dst
    return nbytes / best / 1e9


def peak_rss() -> int:
    from lemon_ext.checkpoint.testing import peak_rss_bytes

    return peak_rss_bytes()


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def run_pipeline(sd, cfg, sizes, device, repeats):
    """What ``expand_state_dict_pipelined(sd, cfg, device=...)`` runs (same plan, same dtype rule,
    ``copy_out=True``), through ``run_specs`` for its stage timings: (best seconds, all seconds,
    outputs of the last run, stats of the best run, plan)."""
    from lemon_ext.engine import plan_expansion
    from lemon_ext.execution import run_specs

    plan = plan_expansion(cfg, seed=0, source_shapes={n: tuple(t.shape) for n, t in sd.items()}, **sizes)
    dtypes = {s.name: sd[s.source].dtype for s in plan.specs}
    times, out, best_stats = [], None, None
    for _ in range(max(1, repeats)):
        out = None  # free the previous result first
        res = {}
        t = time.perf_counter()
        stats = run_specs(plan.specs, sd.__getitem__, lambda spec, x: res.__setitem__(spec.name, x), device=device,
                          seed=0, dtype=dtypes, copy_out=True, output_device="cpu",
                          source_dtypes={n: x.dtype for n, x in sd.items()})
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
        out = res
        if best_stats is None or times[-1] <= min(times):
            best_stats = stats
    return min(times), times, out, best_stats, plan


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="a ~10M-parameter model (smoke run)")
    ap.add_argument("--repeats", type=int, default=2, help="pipeline runs; the best counts")
    ap.add_argument("--compare-pinned-results", action="store_true",
                    help="also time the earlier design: every result a fresh page-locked tensor")
    ap.add_argument("--checkpoint", action="store_true", help="lemon-expand --device on a sharded checkpoint instead")
    ap.add_argument("--source-gb", type=float, default=2.0, help="--checkpoint: source size")
    ap.add_argument("--workdir", default=None, help="--checkpoint: scratch directory (deleted at the end)")
    ap.add_argument("--child-expand", nargs=4, metavar=("SRC", "DST", "SIZES_JSON", "DEVICE"), help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="write the result row here")
    a = ap.parse_args(argv)
    if a.child_expand:
        return child_expand(*a.child_expand)
    if a.checkpoint:
        return checkpoint_bench(a)
    shape = SMALL if a.small else FULL
    cfg = synthetic_llama_config(**shape)
    sizes = dict(hidden_size=2 * shape["hidden"], intermediate_size=2 * shape["ffn"],
                 num_attention_heads=2 * shape["heads"], num_key_value_heads=2 * shape["kv_heads"],
                 num_hidden_layers=shape["layers"] * 3 // 2)
    sd = host_state_dict(cfg)
    src_bytes = sum(t.numel() * t.element_size() for t in sd.values())
    device = torch.device(a.device)
    h2d = d2h = host_copy = None
    if device.type == "cuda":
        h2d, d2h = pinned_bandwidth(device)
        host_copy = host_copy_bandwidth()
    rss0 = peak_rss()
    best, times, out, stats, plan = run_pipeline(sd, cfg, sizes, device, a.repeats)
    tgt_bytes = sum(t.numel() * t.element_size() for t in out.values())
    # Check a sample against the CPU backend: the embedding, one FFN up projection, the head.
    sample = [n for n in out if n.endswith(("embed_tokens.weight", "layers.1.mlp.up_proj.weight", "lm_head.weight"))]
    specs = {s.name: s for s in plan.specs}
    ref = {n: specs[n].execute(sd[specs[n].source], seed=0, dtype=sd[specs[n].source].dtype, device="cpu",
                               backend="auto") for n in sample}
    mismatched = [n for n in sample if not torch.equal(out[n].cpu(), ref[n])]
    from lemon_ext.execution import pinned_plan

    planned = pinned_plan(plan.specs, dtype={s.name: sd[s.source].dtype for s in plan.specs},
                          source_dtypes={n: t.dtype for n, t in sd.items()})
    row = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "commit": git_commit(), "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "source_gb": src_bytes / 1e9, "target_gb": tgt_bytes / 1e9, "seconds": times, "best_s": best,
        "gbps_moved": (src_bytes + tgt_bytes) / best / 1e9, "pinned_h2d_gbps": h2d, "pinned_d2h_gbps": d2h,
        "host_copy_gbps": host_copy, "stage_seconds": stats, "pinned_planned_gb": planned["total"] / 1e9,
        "pinned_old_rule_gb": (planned["source_buffers"] * max(math.prod(s.source_shape) * 4 for s in plan.specs)
                               + 2 * max(math.prod(s.target_shape) * 8 for s in plan.specs)) / 1e9,
        "peak_rss_gib": peak_rss() / 2**30, "rss_before_gib": rss0 / 2**30,
        "sample_checked": sample, "sample_mismatched": mismatched,
    }
    if h2d:
        bound = max(src_bytes / (h2d * 1e9), tgt_bytes / (d2h * 1e9))
        row.update(transfer_bound_s=bound, x_transfer_bound=best / bound, pct_of_transfer_bound=100 * bound / best,
                   host_copy_bound_s=tgt_bytes / (host_copy * 1e9))
    if a.compare_pinned_results and device.type == "cuda":
        from lemon_ext.execution import pipeline

        out = None
        pipeline._PINNED_RESULTS = True
        try:
            best_p, times_p, _, stats_p, _ = run_pipeline(sd, cfg, sizes, device, 1)
        finally:
            pipeline._PINNED_RESULTS = False
        row.update(pinned_results_s=times_p, pinned_results_stages=stats_p)
    print(f"source {row['source_gb']:.2f} GB -> target {row['target_gb']:.2f} GB on {row['device']}: "
          f"best {best:.2f} s of {[round(t, 2) for t in times]}, {row['gbps_moved']:.1f} GB/s moved")
    st = {k: round(v, 2) if isinstance(v, float) else v for k, v in stats.items()}
    print(f"stage seconds (overlapping; device time summed from CUDA events): {st}")
    if "pinned_bytes" in stats:
        print(f"pinned host memory: {stats['pinned_bytes'] / 1e9:.2f} GB held (plan {row['pinned_planned_gb']:.2f} GB; "
              f"the earlier 8-byte rule: {row['pinned_old_rule_gb']:.2f} GB)")
    print(f"peak RSS {row['peak_rss_gib']:.1f} GiB (source + result held by this process: "
          f"{(src_bytes + tgt_bytes) / 2**30:.1f} GiB)")
    if h2d:
        print(f"pinned H2D {h2d:.1f} GB/s, D2H {d2h:.1f} GB/s, pinned -> pageable host copy {host_copy:.1f} GB/s "
              f"(same run): transfer bound {row['transfer_bound_s']:.2f} s, pipeline at "
              f"{row['pct_of_transfer_bound']:.0f}% of it (target >= 80%); host-copy bound "
              f"{row['host_copy_bound_s']:.2f} s")
    if "pinned_results_s" in row:
        print(f"earlier design (a fresh page-locked tensor per result): {row['pinned_results_s'][0]:.2f} s "
              f"vs {best:.2f} s for pooled buffers + pageable copies")
    print(f"sample vs CPU backend: {len(sample) - len(mismatched)}/{len(sample)} tensors bitwise equal"
          + (f"; MISMATCH {mismatched}" if mismatched else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(row, f, indent=1, default=str)
    if mismatched:
        raise SystemExit(1)
    return row


def child_expand(src, dst, sizes_json, device):
    """Fresh process: ``lemon-expand SRC DST ... --device DEVICE``; prints seconds and peak RSS."""
    from lemon_ext.checkpoint.testing import peak_rss_bytes
    from lemon_ext.cli import main as cli

    sizes = json.loads(sizes_json)
    argv = [src, dst, "--max-shard-size", "2GB", "--device", device, "--quiet"]
    for k, v in sizes.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    base = peak_rss_bytes()
    t = time.perf_counter()
    rc = cli(argv)
    dt = time.perf_counter() - t
    with open(os.path.join(dst, "lemon_expansion.json")) as f:
        rep = json.load(f)
    print(json.dumps({"rc": rc, "seconds": dt, "peak_rss": peak_rss_bytes(), "base_rss": base,
                      "bytes": rep.get("total_size"), "stages": rep.get("run", {}).get("stage_seconds")}))
    return rc


def checkpoint_bench(a) -> dict:
    """lemon-expand --device on a >= 2 GB sharded bf16 checkpoint vs writing the same bytes with
    safetensors (bench_checkpoint.py's probe, fresh process, before the expansion), peak RSS."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    from lemon_ext.checkpoint.expand import analyze
    from lemon_ext.checkpoint.testing import make_synthetic_llama

    h, f, heads, kv = 2048, 5632, 16, 4
    per_layer = 2 * (2 * h * h + 2 * h * (h // heads) * kv + 3 * h * f + 2 * h)
    layers = max(2, math.ceil((a.source_gb * 1e9 - 2 * 2 * 32000 * h) / per_layer))
    layers += layers % 2
    cfg = synthetic_llama_config(h, f, heads, kv, layers, 32000)
    sizes = {"hidden_size": 2 * h, "intermediate_size": 2 * f, "num_attention_heads": 2 * heads,
             "num_key_value_heads": 2 * kv, "num_hidden_layers": layers * 3 // 2}
    work = a.workdir or os.path.join(os.environ.get("OUT", "/tmp"), "lemon_ckpt_bench")
    src, dst, st = (os.path.join(work, n) for n in ("src", "dst", "st"))
    shutil.rmtree(work, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        t = time.perf_counter()
        src_bytes = make_synthetic_llama(src, cfg, max_shard_size="1GB")
        print(f"generated {src_bytes / 1e9:.2f} GB source ({layers} layers) in {time.perf_counter() - t:.0f} s", flush=True)
        job = analyze(src, sizes=sizes, options=dict(symmetry_breaking="lemon", allow_lossy=False,
                                                     depth_placement="interleave"), max_shard_size="2GB")
        os.sync()
        r = subprocess.run([sys.executable, os.path.join(here, "bench_checkpoint.py"), "--child", "probe", st,
                            str(job.target_bytes), str(2 * 10**9)], env=env, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"write probe failed:\n{r.stderr[-3000:]}")
        plain = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"plain write (safetensors save_file + fsync) of {plain['bytes'] / 1e9:.2f} GB: {plain['seconds']:.1f} s",
              flush=True)
        os.sync()
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child-expand", src, dst, json.dumps(sizes),
                            a.device], env=env, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"lemon-expand failed:\n{r.stderr[-3000:]}")
        ours = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    row = {"device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu", "commit": git_commit(),
           "source_gb": src_bytes / 1e9, "target_gb": ours["bytes"] / 1e9, "expand_s": ours["seconds"],
           "plain_write_s": plain["seconds"], "ratio": ours["seconds"] / plain["seconds"],
           "peak_rss_gib": ours["peak_rss"] / 2**30, "base_rss_gib": ours["base_rss"] / 2**30,
           "rss_bound_gib": job.rss_bound / 2**30, "stages": ours["stages"]}
    # The README's bound (2 x largest target + one shard + 1 GiB) on the GPU route too: the
    # page-locked buffers (2 x largest source + 2 x largest target, the dry run's estimate terms)
    # take the place of the tensors the CPU route holds; the CUDA context's host memory is new.
    from lemon_ext.execution import pinned_plan

    pp = pinned_plan(job.plan.specs, dtype=job.dtypes, source_dtypes=job.source.dtypes)
    row["pinned_planned_gib"] = pp["total"] / 2**30
    print(f"lemon-expand --device {a.device}: {row['source_gb']:.2f} GB -> {row['target_gb']:.2f} GB in "
          f"{row['expand_s']:.1f} s = {row['ratio']:.2f}x a plain write of the same bytes ({row['plain_write_s']:.1f} s); "
          f"peak RSS {row['peak_rss_gib']:.2f} GiB (after imports {row['base_rss_gib']:.2f}; README bound "
          f"{row['rss_bound_gib']:.2f} GiB; page-locked buffers planned {row['pinned_planned_gib']:.2f} GiB); "
          f"stages {row['stages']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(row, f, indent=1, default=str)
    return row


if __name__ == "__main__":
    main()
