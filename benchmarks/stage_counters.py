"""Where the CPU kernel's time goes, in counters that do not depend on the machine's load.

Builds benchmarks/native/stage_counters.cpp (the row loop of csrc/expand_cpu_rows.h on one
synthetic bf16 tensor, single thread, no torch) with -DLEMON_STAGE_TSC and prints, per case and
per path (the fused row, and the staged passes with LEMON_EXT_CPU_FUSED=0):
- TSC ticks per target element for each stage (stage source row, Philox, gather, round, pass,
  encode, tail = ZERO/FREE columns, fused = gather + round + pass in one loop). TSC ticks count at
  the nominal clock, so they are cycles at that clock; the stage sum is the loop's whole time.
- with ``--instructions`` (needs valgrind): instructions per target element per function, from
  callgrind. Valgrind's CPU has no AVX-512, so these are the AVX2 clones' counts.

    python benchmarks/stage_counters.py [--reps 20] [--instructions] [--out counters.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (name, RS, CS, RT, CT, split, out, maps): issue 14's Llama MLP tensor at 2x, its 1.5x width,
# fp32 out, random maps, no split
CASES = [
    ("2x bf16 LEMON circular", 512, 1408, 1024, 2816, 1, 1, "circular"),
    ("1.5x bf16 LEMON circular", 512, 1408, 768, 2112, 1, 1, "circular"),
    ("2x fp32 LEMON circular", 512, 1408, 1024, 2816, 1, 0, "circular"),
    ("2x bf16 LEMON random", 512, 1408, 1024, 2816, 1, 1, "random"),
    ("2x bf16 no split circular", 512, 1408, 1024, 2816, 0, 1, "circular"),
]
STAGES = ("stage", "philox", "gather", "round", "pass", "encode", "tail", "fused")


def build(out_dir: Path) -> Path:
    exe = out_dir / "stage_counters"
    cmd = [os.environ.get("CXX", "g++"), "-std=c++17", "-O3", "-ffp-contract=off", "-fno-trapping-math",
           "-DLEMON_STAGE_TSC", f"-I{ROOT / 'csrc'}", str(ROOT / "benchmarks/native/stage_counters.cpp"), "-o", str(exe)]
    subprocess.run(cmd, check=True)
    return exe


def ticks(exe: Path, case, reps: int, fused: bool) -> dict:
    _, rs, cs, rt, ct, split, out, maps = case
    env = dict(os.environ, LEMON_EXT_CPU_FUSED="1" if fused else "0")
    res = subprocess.run([str(exe), *map(str, (rs, cs, rt, ct, split, out, maps, reps))], env=env,
                         capture_output=True, text=True, check=True)
    elements = int(re.search(r"elements (\d+)", res.stdout).group(1))
    took_fused = re.search(r"fused (\d)", res.stdout).group(1) == "1"
    counts = dict(re.findall(r"(\w+)=(\d+)", res.stderr.split("LEMON_STAGE_TSC", 1)[1]))
    per = {k: int(counts[k]) / elements for k in STAGES}
    return {"path": "fused" if took_fused else "staged", "ticks_per_element": per, "total": sum(per.values())}


def instructions(exe: Path, case, fused: bool) -> dict:
    _, rs, cs, rt, ct, split, out, maps = case
    with tempfile.TemporaryDirectory() as d:
        cg = Path(d) / "cg.out"
        env = dict(os.environ, LEMON_EXT_CPU_FUSED="1" if fused else "0")
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={cg}", "--toggle-collect=*expand_rows*",
                        str(exe), *map(str, (rs, cs, rt, ct, split, out, maps, 1))], env=env, capture_output=True,
                       check=True)
        text = subprocess.run(["callgrind_annotate", "--inclusive=no", str(cg)], capture_output=True, text=True).stdout
    per_fn = {}
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) \([\s\d.]+%\)\s+\S*:(?:lemon::)?([\w_]+)", line)
        if m:
            per_fn[m.group(2)] = per_fn.get(m.group(2), 0) + int(m.group(1).replace(",", "")) / (rt * ct)
    return dict(sorted(per_fn.items(), key=lambda kv: -kv[1])[:8])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--instructions", action="store_true", help="also callgrind instruction counts (slow)")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        exe = build(Path(d))
        for case in CASES:
            for fused in (True, False):
                r = {"case": case[0], **ticks(exe, case, a.reps, fused)}
                if a.instructions and shutil.which("valgrind"):
                    r["instructions_per_element"] = instructions(exe, case, fused)
                rows.append(r)
    print("| case | path | " + " | ".join(STAGES) + " | total TSC ticks / element |")
    print("|---|---|" + "---|" * (len(STAGES) + 1))
    for r in rows:
        t = r["ticks_per_element"]
        print(f"| {r['case']} | {r['path']} | " + " | ".join(f"{t[k]:.2f}" for k in STAGES) + f" | {r['total']:.2f} |")
    if a.instructions:
        for r in rows:
            print(f"{r['case']} ({r['path']}): instructions per target element {r.get('instructions_per_element')}")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
