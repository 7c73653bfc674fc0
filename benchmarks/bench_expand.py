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

    python benchmarks/bench_expand.py --model            # CPU: expand_state_dict / fresh-output floor
    python benchmarks/bench_expand.py --quick            # CPU, a few minutes
    python benchmarks/bench_expand.py --out $OUT/bench.json   # GPU: the three full shapes
    python benchmarks/bench_expand.py --gpu-check --out $OUT/bench.json  # GPU: the rows with targets
    python benchmarks/bench_expand.py --triton-sweep     # GPU: Triton launch configs on one row
    python benchmarks/bench_expand.py --fallback-memory  # the torch fallback's memory, blocks vs one piece
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/bench_expand.py  # CPU with torch's huge-page allocator

Backends: every present one for the device, plus ``triton-element`` on GPU (the Triton kernel
with one Philox call per element and tree level, the design before the per-quad draw tables).
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


# --gpu-check: (shape, dtype, maps, noise, target % of copy or None); issue 14's GPU targets
GPU_CHECK_ROWS = [
    ("8192x8192:16384x16384", "bfloat16", "random", "lemon", 80.0),
    ("8192x8192:16384x16384", "bfloat16", "circular", "off", 90.0),
    ("8192x8192:16384x16384", "bfloat16", "circular", "lemon", None),
    ("8192x8192:16384x16384", "float32", "random", "lemon", None),
    ("8192x8192:16384x16384", "float32", "circular", "off", None),
    ("4096x11008:8192x22016", "bfloat16", "random", "lemon", None),
    ("4096x11008:8192x22016", "bfloat16", "circular", "off", None),
    ("4096x11008:8192x22016", "float32", "random", "lemon", None),
]
TRITON_SWEEP = [dict(block=b, num_warps=w, programs_per_sm=p)
                for b, w, p in ((1024, 4, 4), (2048, 8, 4), (512, 4, 8), (1024, 8, 2), (2048, 4, 8), (1024, 4, 16))]


def bench_case(device, backend, shape, dtype, kind, noise, measure, reps, triton_config=None):
    rs, cs, rt, ct = shape
    src = torch.randn(rs, cs, device=device).to(dtype)
    # Maps, groups and factors are host data, as the engine passes them: the native ops check them
    # on the host and upload them asynchronously (no device sync inside the timed call).
    rm_h, cm_h = make_maps(kind, rs, cs, rt, ct, "cpu")
    cf_h = torch.rand(ct) + 0.5
    gs, gp = R.group_layout(cm_h)
    rm, cm, cf = rm_h.to(device), cm_h.to(device), cf_h.to(device)  # for the naive baseline
    split = R.SPLIT_LEMON if noise == "lemon" else R.SPLIT_NONE
    args = (src, rm_h, cm_h, None, cf_h, gs, gp, None, None, split, 0.0, 1234, 5678, dtype)
    if backend == "torch":
        args = (src, rm, cm, None, cf, gs.to(device), gp.to(device), None, None, split, 0.0, 1234, 5678, dtype)
    if backend == "torch":
        op = lambda: R.expand_reference(*args)  # noqa: E731
    elif backend == "triton" and triton_config is None:
        op = lambda: torch.ops.lemon_ext.expand_triton(*args)  # noqa: E731
    elif backend.startswith("triton"):
        from lemon_ext.ops._triton import expand_triton

        draws = "element" if backend == "triton-element" else "table"
        op = lambda: expand_triton(*args, draws=draws, config=triton_config)  # noqa: E731
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
        "backend": backend, "triton_config": triton_config, "shape": f"{rs}x{cs}->{rt}x{ct}", "dtype": str(dtype).replace("torch.", ""),
        "maps": kind, "noise": noise, "ms": t_op * 1e3, "gbps": nbytes / t_op / 1e9,
        "copy_ms": t_copy * 1e3, "copy_gbps": 2 * dst.numel() * dst.element_size() / t_copy / 1e9,
        "naive_ms": t_naive * 1e3, "pct_of_copy": 100 * t_copy / t_op, "x_naive": t_naive / t_op,
        "fresh_output_ms": t_fresh * 1e3, "pct_fresh_output": 100 * t_fresh / t_op,
        "cpu_ms": c_op * 1e3, "naive_cpu_ms": c_naive * 1e3, "x_naive_cpu": c_naive / max(c_op, 1e-9),
    }


# --model: whole-model expand_state_dict against the fresh-output floor (issue 14). Each run is
# its own process, so every output page is new for the op and for the floor alike (in one process
# glibc recycles freed blocks and the floor would look 5x cheaper than it is).
MODEL_CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
import lemon_ext
from bench_engine import llama_config, random_state_dict
what, width, dtype = sys.argv[2], float(sys.argv[3]), getattr(torch, sys.argv[4])
cfg = llama_config(hidden=512, layers=4, ffn=1408, heads=8, kv_heads=4, vocab=8000)
target = dict(hidden_size=int(512 * width), intermediate_size=int(1408 * width), num_attention_heads=int(8 * width),
              num_key_value_heads=int(4 * width), num_hidden_layers=6)
sd = random_state_dict(cfg, dtype)
shapes = [(s.target_shape, dtype) for s in lemon_ext.plan_expansion(cfg, **target).specs]
small = llama_config(hidden=64, layers=2, ffn=128, heads=4, kv_heads=2, vocab=128)  # warm code paths only
lemon_ext.expand_state_dict(random_state_dict(small, dtype), small, backend="cpu", hidden_size=128, num_attention_heads=8, num_key_value_heads=4,
                            intermediate_size=256, num_hidden_layers=3)
torch.empty(1024).fill_(1.0)
t, c = time.perf_counter(), time.process_time()
if what == "op":
    out = lemon_ext.expand_state_dict(sd, cfg, backend="cpu", **target)[0]
else:  # the floor of any op returning new tensors: allocate each target tensor, fill it, keep it
    out = [torch.empty(shape, dtype=dt).fill_(1.0) for shape, dt in shapes]
wall, cpu = time.perf_counter() - t, time.process_time() - c
print(json.dumps({"wall": wall, "cpu": cpu, "elements": sum(x.numel() for x in (out.values() if isinstance(out, dict) else out))}))
"""
MODEL_CASES = [(2.0, "bfloat16"), (1.5, "bfloat16"), (2.0, "float32")]


def model_floor(reps: int, out_path=None):
    """Issue 14's bf16 Llama (vocab 8000, 512 -> 1024 hidden, 1408 -> 2816 FFN, 8 -> 16 heads,
    4 -> 8 kv heads, 4 -> 6 layers; 87.2M target elements) through expand_state_dict(backend="cpu"),
    and its 1.5x width and fp32 variants: median wall time of ``reps`` fresh processes each, op and
    floor alternating, and the ratio op / floor (target: <= 2)."""
    here = str(Path(__file__).resolve().parent)
    rows = []
    for width, dtype in MODEL_CASES:
        runs = {"op": [], "floor": []}
        for _ in range(reps):
            for what in ("op", "floor"):
                res = subprocess.run([sys.executable, "-c", MODEL_CHILD, here, what, str(width), dtype],
                                     capture_output=True, text=True, timeout=600)
                if res.returncode:
                    raise SystemExit(res.stderr[-3000:])
                runs[what].append(json.loads(res.stdout.strip().splitlines()[-1]))
        med = {w: statistics.median(r["wall"] for r in rs) for w, rs in runs.items()}
        row = {"what": "expand_state_dict vs fresh-output floor", "width": width, "dtype": dtype,
               "target_elements": runs["op"][0]["elements"], "op_s": med["op"], "floor_s": med["floor"],
               "ratio": med["op"] / med["floor"], "op_runs": [round(r["wall"], 4) for r in runs["op"]],
               "floor_runs": [round(r["wall"], 4) for r in runs["floor"]],
               "op_cpu_s": statistics.median(r["cpu"] for r in runs["op"]),
               "floor_cpu_s": statistics.median(r["cpu"] for r in runs["floor"]), "commit": git_commit(),
               "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        row["cpu_ratio"] = row["op_cpu_s"] / row["floor_cpu_s"]
        rows.append(row)
        print(f"{width}x {dtype}: op {row['op_s'] * 1e3:.1f} ms, floor {row['floor_s'] * 1e3:.1f} ms, "
              f"ratio {row['ratio']:.2f} (runs op {row['op_runs']}, floor {row['floor_runs']})", flush=True)
    print("\n| model (Llama 512 -> width x, 4 -> 6 layers) | dtype | target elements | op ms | fresh-output floor ms "
          "| op / floor | in CPU time (both threads) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['width']}x | {r['dtype']} | {r['target_elements'] / 1e6:.1f}M | {r['op_s'] * 1e3:.1f} | "
              f"{r['floor_s'] * 1e3:.1f} | {r['ratio']:.2f} | {r['cpu_ratio']:.2f} |")
    _write(out_path, rows)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", nargs="*", help="RSxCS:RTxCT ... (default: 3 GPU shapes, /4 per side on CPU)")
    p.add_argument("--quick", action="store_true", help="CPU: two small shapes, fewer repetitions")
    p.add_argument("--gpu-check", action="store_true", help="only the GPU rows with targets (GPU_CHECK_ROWS)")
    p.add_argument("--triton-sweep", action="store_true", help="Triton launch configs on the first GPU_CHECK_ROWS row")
    p.add_argument("--fallback-memory", action="store_true",
                   help="the torch fallback's temporary memory and time, row blocks vs one piece (not with --quick), "
                        "vs the C++ kernel; --shapes picks the tensor (default 16000x512:16000x1024)")
    p.add_argument("--model", action="store_true",
                   help="issue 14: whole-model expand_state_dict against the fresh-output floor, fresh processes")
    p.add_argument("--backends", nargs="*", help="default: every present backend for the device")
    p.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32"])
    p.add_argument("--reps", type=int, help="timed repetitions on CPU (default 5, --quick 3)")
    p.add_argument("--out", help=".csv or .json file for the rows")
    a = p.parse_args(argv)
    if a.model:
        return model_floor(a.reps or 5, a.out)
    if a.fallback_memory:
        return fallback_memory(a.out, *(a.shapes or [])[:1], one_piece=not a.quick)
    device = a.device
    reps = a.reps or (3 if a.quick else 5)
    status = ops.backends()
    usable = ["cuda", "triton", "triton-element", "cpu", "torch"] if device == "cuda" else ["cpu", "torch"]
    backends = [b for b in (a.backends or usable) if status[b.split("-")[0]] is None]
    skipped = {b: status[b.split("-")[0]] for b in usable if status[b.split("-")[0]] is not None}
    measure = timer(device, reps)
    meta = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads",
        "torch": torch.__version__, "triton": _triton_version(), "commit": git_commit(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "cpu_allocator": cpu_allocator(),
    }
    print(f"# {meta}  backends={backends}  skipped={skipped}", flush=True)
    if a.gpu_check or a.triton_sweep:
        cases = [(parse_shape(sh), getattr(torch, dt), kind, noise, target) for sh, dt, kind, noise, target in GPU_CHECK_ROWS]
    else:
        shapes = a.shapes or (GPU_SHAPES if device == "cuda" else QUICK_SHAPES if a.quick else CPU_SHAPES)
        cases = [(shape, getattr(torch, d), kind, noise, None) for shape in map(parse_shape, shapes) for d in a.dtypes
                 for kind in ("circular", "random") for noise in ("lemon", "off")]
    rows = []
    if a.triton_sweep:
        shape, dtype, kind, noise, target = cases[0]
        for cfg in TRITON_SWEEP:
            row = {**meta, **bench_case(device, "triton", shape, dtype, kind, noise, measure, reps, triton_config=cfg)}
            rows.append(row)
            print(f"triton {cfg}: {row['ms']:.3f} ms, {row['pct_of_copy']:.1f}% of copy", flush=True)
        best = max(rows, key=lambda r: r["pct_of_copy"])
        print(f"\nbest Triton config on {best['shape']} {best['dtype']} {best['maps']} {best['noise']}: "
              f"{best['triton_config']} = {best['pct_of_copy']:.1f}% of copy (defaults: lemon_ext.ops._triton.CONFIG)")
        _write(a.out, rows)
        return rows
    for shape, dtype, kind, noise, target in cases:
        for backend in backends:
            if backend == "torch" and (shape[2] * shape[3] > 2**20 or device == "cuda"):
                continue  # the reference is the definition, not a contender, at these sizes
            row = {**meta, **bench_case(device, backend, shape, dtype, kind, noise, measure, reps), "target_pct": target}
            rows.append(row)
            print(f"{row['backend']:14} {row['shape']:24} {row['dtype']:8} {row['maps']:8} "
                  f"{row['noise']:5} {row['ms']:9.2f} ms {row['gbps']:7.1f} GB/s "
                  f"{row['pct_of_copy']:5.1f}% of copy  {row['x_naive']:5.1f}x naive "
                  f"({row['x_naive_cpu']:5.1f}x in CPU time)  fresh output "
                  f"{row['fresh_output_ms']:.2f} ms = {row['pct_fresh_output']:.0f}% of the op",
                  flush=True)
    _write(a.out, rows)
    if a.gpu_check:
        _gpu_check_table(rows)
    else:
        _summary(rows)
    return rows


def _write(out, rows):
    if not out or not rows:
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".json":
        out.write_text(json.dumps(rows, indent=1, default=str))
    else:
        with out.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def _gpu_check_table(rows):
    """Short table last: every row with its copy_ of the same run and the target it must meet."""
    print("\n| backend | shape | dtype | maps | noise | ms | GB/s | copy_ GB/s | % of copy | target | met |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r.get("target_pct")
        met = "-" if t is None else ("yes" if r["pct_of_copy"] >= t else "NO")
        print(f"| {r['backend']} | {r['shape']} | {r['dtype']} | {r['maps']} | {r['noise']} | {r['ms']:.3f} | "
              f"{r['gbps']:.0f} | {r['copy_gbps']:.0f} | {r['pct_of_copy']:.1f} | {'-' if t is None else f'>= {t:.0f}'} "
              f"| {met} |")


FALLBACK_PROBE = """
import ctypes, json, sys, time, torch
from lemon_ext import ops
from lemon_ext.ops import reference as R
def status(key):
    return int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1]) * 1024
rs, cs, rt, ct = (int(x) for x in sys.argv[1:5])
backend, block = sys.argv[5], int(sys.argv[6])
src = (torch.randn(rs, cs) * 0.02).to(torch.bfloat16)
rm, cm = torch.arange(rt) % rs, torch.arange(ct) % cs
ops.expand(src[:8], rm[:8] % 8, cm, split="lemon", backend=backend)  # warm-up
R.BLOCK_ELEMENTS = block
ctypes.CDLL("libc.so.6").malloc_trim(0)
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
base = status("VmRSS")
t = time.perf_counter()
out = ops.expand(src, rm, cm, split="lemon", backend=backend, seed=1, key=2)
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "temp_bytes": status("VmHWM") - base - out.nbytes, "out_bytes": out.nbytes}))
"""


def fallback_memory(out_path=None, shape="16000x512:16000x1024", one_piece=True):
    """The torch fallback on an LM-head-like bf16 tensor (LEMON split, circular maps), each run in a
    fresh process: peak RSS above the RSS before the call (VmHWM reset through clear_refs) minus the
    output, and seconds; row blocks (the default) vs one piece (the earlier reference) vs C++."""
    rs, cs, rt, ct = parse_shape(shape)
    root = Path(__file__).resolve().parents[1]
    rows = []
    for name, backend, block in (("torch, row blocks", "torch", R.BLOCK_ELEMENTS), ("torch, one piece", "torch", 10**15),
                                 ("cpu (C++)", "cpu", R.BLOCK_ELEMENTS)):
        if ops.backends()[backend] is not None or (block == 10**15 and not one_piece):
            continue
        res = subprocess.run([sys.executable, "-c", FALLBACK_PROBE, str(rs), str(cs), str(rt), str(ct), backend,
                              str(block)], capture_output=True, text=True, cwd=root, timeout=3600)
        if res.returncode:
            raise SystemExit(res.stderr[-3000:])
        r = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append({"what": name, "shape": shape, **r, "bound_bytes": 2 * r["out_bytes"] + 256 * 2**20,
                     "commit": git_commit(), "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
        print(f"{name:18} {r['seconds']:7.2f} s  temporary {r['temp_bytes'] / 2**20:8.0f} MiB "
              f"(output {r['out_bytes'] / 2**20:.0f} MiB)", flush=True)
    print(f"\n| {shape} bf16 LEMON | seconds | temporary MiB | bound 2 x target + 256 MiB |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['seconds']:.2f} | {r['temp_bytes'] / 2**20:.0f} | {r['bound_bytes'] / 2**20:.0f} |")
    _write(out_path, rows)
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
