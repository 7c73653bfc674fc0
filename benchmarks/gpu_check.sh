#!/usr/bin/env bash
# One command for a GPU session (no network; torch 2.11+cu130, triton 3.6, nvcc): build the CUDA
# kernels in place (for the GPU that is there), run the GPU tests, measure the op, the Triton
# launch configs, the host-state-dict pipeline and lemon-expand --device cuda, and print a short
# table last. Budget: 470 s of steps (each step's timeout is cut to what is left; a step that no
# longer fits is skipped and says so), well under 8 minutes on the H200. Logs, JSON rows and the
# table go to ${OUT:-/tmp}/lemon_gpu_check/.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-/tmp}/lemon_gpu_check"
mkdir -p "$LOG"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" MAX_JOBS="${MAX_JOBS:-16}" PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
# TORCH_CUDA_ARCH_LIST is left to setup.py: the visible GPU's capability (9.0 on the H200)
BUDGET=${LEMON_GPU_CHECK_BUDGET:-470}
START=$(date +%s)
status=0
step() { echo "== $(date -u +%T) (+$(( $(date +%s) - START ))s) $*" | tee -a "$LOG/steps.log"; }
# timeout for the next step: min(wanted, what is left of the budget); 0 = skip
left() { local l=$(( BUDGET - ($(date +%s) - START) )); (( l > $1 )) && l=$1; (( l < 15 )) && l=0; echo $l; }
run_step() {  # run_step NAME WANTED_SECONDS LOGFILE CMD...
  local name=$1 want=$2 logf=$3; shift 3
  local t; t=$(left "$want")
  if (( t == 0 )); then echo "SKIPPED $name: out of budget" | tee -a "$LOG/steps.log"; status=1; return 1; fi
  if ! timeout "$t" "$@" >"$logf" 2>&1; then
    echo "FAILED (or timed out after ${t}s): $name; tail of $logf:" | tee -a "$LOG/steps.log"
    tail -15 "$logf"
    status=1
    return 1
  fi
}

step "environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader || true
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" || true
  nvcc --version | tail -1 || true; git rev-parse --short HEAD 2>/dev/null || echo "no .git here"; nproc; free -g | head -2; } 2>&1 \
  | tee "$LOG/env.log"

step "build (pip install --no-build-isolation --no-deps -e .; fallback: setup.py build_ext --inplace)"
if ! run_step build 150 "$LOG/build.log" python -m pip install -v --no-build-isolation --no-deps -e .; then
  if ! run_step build-inplace 150 "$LOG/build_inplace.log" python setup.py build_ext --inplace; then
    echo "CUDA build FAILED; rebuilding without CUDA so the Triton and pipeline checks still run" | tee -a "$LOG/steps.log"
    grep -hE "error" "$LOG/build.log" "$LOG/build_inplace.log" | head -20 || true
    LEMON_EXT_SKIP_CUDA_BUILD=1 timeout 150 python setup.py build_ext --inplace >"$LOG/build_nocuda.log" 2>&1 || exit 1
  fi
fi
grep -h "building CUDA kernels for" "$LOG"/build*.log | tail -1 || true
python -c "from lemon_ext import ops; print(ops.backends())" | tee "$LOG/backends.log"
python -c "from lemon_ext import ops; import sys; sys.exit(0 if ops.backends()['cuda'] is None else 1)" \
  || { echo "CUDA backend missing after the build: see $LOG/build.log"; status=1; }

step "GPU tests (op backends, host maps without device syncs, Triton draw tables, the GPU pipeline)"
run_step tests 130 "$LOG/tests.log" env LEMON_OPS_TRITON_MATRIX=0 python -m pytest -q --maxfail=5 -p no:cacheprovider -rs \
  tests/test_ops_kernels.py tests/test_ops_api.py tests/test_ops_triton.py \
  tests/test_checkpoint_cuda_pipeline.py tests/test_pipeline_cuda_overlap.py
tail -3 "$LOG/tests.log"

step "benchmark: the op (cuda, triton, triton per-element draws) on the target rows vs copy_ of the same run"
run_step bench_expand 75 "$LOG/bench.log" python benchmarks/bench_expand.py --gpu-check --out "$LOG/bench_expand.json"

step "benchmark: Triton launch configs (block, warps, programs per SM) on bf16 8192^2 -> 16384^2 random + LEMON"
run_step triton_sweep 30 "$LOG/sweep.log" python benchmarks/bench_expand.py --triton-sweep --out "$LOG/triton_sweep.json"
tail -1 "$LOG/sweep.log"

step "benchmark: expand_state_dict of a 2.2 GB bf16 host state dict on device=cuda vs the transfer bound"
run_step pipeline 75 "$LOG/bench_pipeline.log" python benchmarks/bench_pipeline_gpu.py --repeats 2 \
  --compare-pinned-results --json "$LOG/bench_pipeline.json"
tail -7 "$LOG/bench_pipeline.log"

step "benchmark: lemon-expand --device cuda on a 2 GB sharded checkpoint vs a plain write, peak RSS"
run_step checkpoint 90 "$LOG/bench_checkpoint.log" python benchmarks/bench_pipeline_gpu.py --checkpoint \
  --device cuda --json "$LOG/bench_checkpoint.json"
tail -1 "$LOG/bench_checkpoint.log"

step "done (status $status, $(( $(date +%s) - START )) s); logs in $LOG"
python - "$LOG" "$status" <<'EOF' | tee "$LOG/table.md"
import json, os, re, sys
log, status = sys.argv[1], sys.argv[2]
def load(name):
    try:
        with open(os.path.join(log, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
rows = []
tests = open(os.path.join(log, "tests.log")).read() if os.path.exists(os.path.join(log, "tests.log")) else ""
m = re.findall(r"(\d+ (?:passed|failed|skipped|error)[^\n]*) in [\d.]+s", tests)
ok = bool(m) and not re.search(r"\d+ (failed|error)", m[-1])
rows.append(("GPU tests", m[-1] if m else "no result", "all pass", "yes" if ok else "NO"))
for r in load("bench_expand.json") or []:
    t = r.get("target_pct")
    rows.append((f"op {r['backend']} {r['shape']} {r['dtype']} {r['maps']} {r['noise']}",
                 f"{r['pct_of_copy']:.1f}% of copy_ ({r['gbps']:.0f} GB/s, {r['ms']:.2f} ms)",
                 "-" if t is None else f">= {t:.0f}%", "-" if t is None else ("yes" if r["pct_of_copy"] >= t else "NO")))
sweep = load("triton_sweep.json")
if sweep:
    b = max(sweep, key=lambda r: r["pct_of_copy"])
    rows.append(("triton best launch config", f"{b['triton_config']}: {b['pct_of_copy']:.1f}% of copy_", "-", "-"))
p = load("bench_pipeline.json")
if p:
    pct = p.get("pct_of_transfer_bound")
    rows.append(("expand_state_dict 2.2 GB bf16, device=cuda",
                 f"{p['best_s']:.2f} s, {pct:.0f}% of transfer bound {p.get('transfer_bound_s', 0):.2f} s" if pct else "-",
                 ">= 80%", "yes" if pct and pct >= 80 else "NO"))
    st = p.get("stage_seconds", {})
    rows.append(("  stages s (read/H2D/kernel/D2H/host copy/write/wall)",
                 "/".join(f"{st.get(k, 0):.2f}" for k in ("read", "h2d", "compute", "d2h", "host_copy", "sink", "wall")),
                 "-", "-"))
    rows.append(("  pinned host memory", f"{st.get('pinned_bytes', 0) / 1e9:.2f} GB (plan {p['pinned_planned_gb']:.2f}, "
                 f"earlier rule {p['pinned_old_rule_gb']:.2f})", "= plan", "yes" if abs(st.get('pinned_bytes', 0) / 1e9 - p['pinned_planned_gb']) < 1e-3 else "NO"))
    if p.get("pinned_results_s"):
        rows.append(("  earlier design: pinned result per tensor", f"{p['pinned_results_s'][0]:.2f} s vs {p['best_s']:.2f} s", "-", "-"))
    rows.append(("  sample vs CPU backend", "equal" if not p["sample_mismatched"] else f"MISMATCH {p['sample_mismatched']}", "equal",
                 "yes" if not p["sample_mismatched"] else "NO"))
c = load("bench_checkpoint.json")
if c:
    rows.append(("lemon-expand --device cuda, 2 GB -> 11 GB", f"{c['expand_s']:.1f} s = {c['ratio']:.2f}x plain write "
                 f"({c['plain_write_s']:.1f} s)", "-", "-"))
    rows.append(("  peak host RSS", f"{c['peak_rss_gib']:.2f} GiB", f"<= {c['rss_bound_gib']:.2f} GiB",
                 "yes" if c["peak_rss_gib"] <= c["rss_bound_gib"] else "NO"))
print(f"\n| check | measured | target | met |\n|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
print(f"\nstatus {status}")
EOF
exit $status
