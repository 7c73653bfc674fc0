"""Benchmark of lemon_ext::expand backends against a copy_ and a naive PyTorch expansion.

For each present backend x shape x dtype x map kind (circular, random) x noise mode
("lemon": LEMON split, draws on; "off": no split, no draws) it times the raw op (group layout and
means prepared outside the timing, as the engine does once per tensor) and, in the same run:
- ``copy_`` of the target's bytes (the bandwidth ceiling),
- a naive PyTorch expansion: index_select x2, multiply, (randn), cast,
- a fresh tensor of the target's size, allocated and filled (what any op returning a new tensor
  pays for its pages; on a VM whose first touch is slow this bounds every ratio).
GB/s counts the source read once + the target written once. Median times: triton.testing.do_bench
on GPU, a simple median of wall times on CPU.

CPU runs use scaled-down shapes by default (the GPU shapes take minutes per row on 2 cores); say
``--shapes`` to choose. Rows go to ``--out`` (.csv or .json) with device, versions and commit.

    python benchmarks/bench_expand.py --quick            # CPU, a few minutes
    python benchmarks/bench_expand.py --out $OUT/bench.json   # GPU: the three full shapes
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/bench_expand.py  # CPU with torch's huge-page allocator
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lemon_ext import ops  # noqa: E402
from lemon_ext.ops import reference as R  # noqa: E402

GPU_SHAPES = ["4096x4096:8192x8192", "8192x8192:16384x16384", "4096x11008:8192x22016"]
CPU_SHAPES = ["1024x1024:2048x2048", "2048x2048:4096x4096", "1024x2752:2048x5504"]  # GPU / 4 per side
QUICK_SHAPES = ["1024x1024:2048x2048", "512x1376:1024x2752"]


def parse_shape(s: str):
    src, tgt = s.split(":")
    (rs, cs), (rt, ct) = (tuple(int(x) for x in p.split("x")) for p in (src, tgt))
    return rs, cs, rt, ct


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def cpu_allocator() -> str:
    """Which pages torch's CPU allocator hands out: c10 madvises allocations >= 2 MB to
    transparent huge pages when THP_MEM_ALLOC_ENABLE=1 is set before torch loads. On the dev VM
    a fresh 4 KB page costs ~1.3-2.4 ms per MB and a recycled huge page ~0.15 ms per MB, so every
    ratio against a baseline that allocates depends on it; both the op and the baselines of one
    run use the same allocator."""
    import os

    return "thp" if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" else "4k-pages"


def timer(device: str, reps: int):
    """fn -> (median wall seconds, median process CPU seconds (all threads); GPU: wall twice).

    On a shared CPU machine wall time includes waiting for cores other processes hold; CPU time
    does not, so the ratios are also given in CPU time (the op and the naive baseline both use
    every core torch gives them)."""
    if device == "cuda":
        from triton.testing import do_bench

        def gpu(fn):
            t = do_bench(fn, warmup=10, rep=max(20, 10 * reps), return_mode="median") / 1e3
            return t, t

        return gpu

    def run(fn):
        fn()  # warm-up (plan caches, allocator)
        wall, cpu = [], []
        for _ in range(reps):
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        return statistics.median(wall), statistics.median(cpu)

    return run


def make_maps(kind: str, rs: int, cs: int, rt: int, ct: int, device: str):
    if kind == "circular":
        return torch.arange(rt, device=device) % rs, torch.arange(ct, device=device) % cs
    g = torch.Generator().manual_seed(0)
    pick = lambda n, m: torch.cat([torch.arange(n), torch.randint(0, n, (m - n,), generator=g)])  # noqa: E731
    return pick(rs, rt).to(device), pick(cs, ct).to(device)


def bench_case(device, backend, shape, dtype, kind, noise, measure, reps):
    rs, cs, rt, ct = shape
    src = torch.randn(rs, cs, device=device).to(dtype)
    rm, cm = make_maps(kind, rs, cs, rt, ct, device)
    cf = torch.rand(ct, device=device) + 0.5
    gs, gp = R.group_layout(cm)
    split = R.SPLIT_LEMON if noise == "lemon" else R.SPLIT_NONE
    args = (src, rm, cm, None, cf, gs, gp, None, None, split, 0.0, 1234, 5678, dtype)
    if backend == "torch":
        op = lambda: R.expand_reference(*args)  # noqa: E731
    elif backend == "triton":
        op = lambda: torch.ops.lemon_ext.expand_triton(*args)  # noqa: E731
    else:
        op = lambda: torch.ops.lemon_ext.expand(*args)  # noqa: E731
    dst = torch.empty(rt, ct, dtype=dtype, device=device)
    other = torch.empty_like(dst)

    def naive():
        x = src.index_select(0, rm).index_select(1, cm).float() * cf
        if noise == "lemon":
            x = x + 0.01 * torch.randn_like(x)
        return x.to(dtype)

    (t_op, c_op) = measure(op) if backend != "torch" else timer(device, 1)(op)
    t_copy, _ = measure(lambda: dst.copy_(other))
    # The floor of any op that returns a new tensor: allocate one of the target's size and touch
    # every page (on the dev VM a fresh page costs ~1.6 ms per MB, 20x a refill).
    t_fresh, _ = measure(lambda: torch.empty(rt, ct, dtype=dtype, device=device).fill_(0))
    t_naive, c_naive = measure(naive)
    nbytes = src.numel() * src.element_size() + dst.numel() * dst.element_size()
    return {
        "backend": backend, "shape": f"{rs}x{cs}->{rt}x{ct}", "dtype": str(dtype).replace("torch.", ""),
        "maps": kind, "noise": noise, "ms": t_op * 1e3, "gbps": nbytes / t_op / 1e9,
        "copy_ms": t_copy * 1e3, "copy_gbps": 2 * dst.numel() * dst.element_size() / t_copy / 1e9,
        "naive_ms": t_naive * 1e3, "pct_of_copy": 100 * t_copy / t_op, "x_naive": t_naive / t_op,
        "fresh_output_ms": t_fresh * 1e3, "pct_fresh_output": 100 * t_fresh / t_op,
        "cpu_ms": c_op * 1e3, "naive_cpu_ms": c_naive * 1e3, "x_naive_cpu": c_naive / max(c_op, 1e-9),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", nargs="*", help="RSxCS:RTxCT ... (default: 3 GPU shapes, /4 per side on CPU)")
    p.add_argument("--quick", action="store_true", help="CPU: two small shapes, fewer repetitions")
    p.add_argument("--backends", nargs="*", help="default: every present backend for the device")
    p.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32"])
    p.add_argument("--reps", type=int, help="timed repetitions on CPU (default 5, --quick 3)")
    p.add_argument("--out", help=".csv or .json file for the rows")
    a = p.parse_args(argv)
    device = a.device
    shapes = a.shapes or (GPU_SHAPES if device == "cuda" else QUICK_SHAPES if a.quick else CPU_SHAPES)
    reps = a.reps or (3 if a.quick else 5)
    status = ops.backends()
    usable = ["cuda", "triton", "cpu", "torch"] if device == "cuda" else ["cpu", "torch"]
    backends = [b for b in (a.backends or usable) if status[b] is None]
    skipped = {b: status[b] for b in usable if status[b] is not None}
    measure = timer(device, reps)
    meta = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads",
        "torch": torch.__version__, "triton": _triton_version(), "commit": git_commit(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "cpu_allocator": cpu_allocator(),
    }
    print(f"# {meta}  backends={backends}  skipped={skipped}", flush=True)
    rows = []
    for shape in map(parse_shape, shapes):
        for dtype in (getattr(torch, d) for d in a.dtypes):
            for kind in ("circular", "random"):
                for noise in ("lemon", "off"):
                    for backend in backends:
                        if backend == "torch" and (shape[2] * shape[3] > 2**20 or device == "cuda"):
                            continue  # the reference is the definition, not a contender, at these sizes
                        row = {**meta, **bench_case(device, backend, shape, dtype, kind, noise, measure, reps)}
                        rows.append(row)
                        print(f"{row['backend']:6} {row['shape']:24} {row['dtype']:8} {row['maps']:8} "
                              f"{row['noise']:5} {row['ms']:9.2f} ms {row['gbps']:7.1f} GB/s "
                              f"{row['pct_of_copy']:5.1f}% of copy  {row['x_naive']:5.1f}x naive "
                              f"({row['x_naive_cpu']:5.1f}x in CPU time)  fresh output "
                              f"{row['fresh_output_ms']:.2f} ms = {row['pct_fresh_output']:.0f}% of the op",
                              flush=True)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".json":
            out.write_text(json.dumps(rows, indent=1))
        else:
            with out.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    _summary(rows)
    return rows


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "absent"


def _summary(rows):
    """Short table last: per backend/dtype/maps/noise, the geometric-mean ratios over shapes."""
    print("\n| backend | dtype | maps | noise | median GB/s | % of copy | x naive | x naive (CPU time) "
          "| fresh output, % of op |")
    print("|---|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["backend"], r["dtype"], r["maps"], r["noise"]) for r in rows})
    for k in keys:
        sel = [r for r in rows if (r["backend"], r["dtype"], r["maps"], r["noise"]) == k]
        gm = lambda xs: statistics.geometric_mean(xs)  # noqa: E731
        print(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {statistics.median(r['gbps'] for r in sel):.1f} | "
              f"{gm([r['pct_of_copy'] for r in sel]):.1f} | {gm([r['x_naive'] for r in sel]):.1f} | "
              f"{gm([r['x_naive_cpu'] for r in sel]):.1f} | {gm([r['pct_fresh_output'] for r in sel]):.0f} |")


if __name__ == "__main__":
    main()
