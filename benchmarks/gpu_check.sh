#!/usr/bin/env bash
# One command for a GPU session (no network; torch 2.11+cu130, triton 3.6, nvcc): build the CUDA
# kernels in place, run the op and GPU-pipeline tests, benchmark the three full shapes and the
# pipeline, print a short table last. Budget: ~6 minutes; the step timeouts (build 200 s, tests
# 150, op benchmark 130, pipeline benchmark 90) keep it under 10. Logs and rows go to
# ${OUT:-/tmp}/lemon_gpu_check/.
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-/tmp}/lemon_gpu_check"
mkdir -p "$LOG"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}" PATH="$CUDA_HOME/bin:$PATH"
status=0
step() { echo "== $(date -u +%T) $*" | tee -a "$LOG/steps.log"; }

step "environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" || true
  nvcc --version | tail -1 || true; git rev-parse --short HEAD 2>/dev/null || echo "no .git here"; } 2>&1 \
  | tee "$LOG/env.log"

step "build (pip install --no-build-isolation --no-deps -e .; fallback: setup.py build_ext --inplace)"
if ! timeout 200 python -m pip install --no-build-isolation --no-deps -e . >"$LOG/build.log" 2>&1; then
  echo "pip build failed (tail below); trying setup.py build_ext --inplace" | tee -a "$LOG/steps.log"
  tail -20 "$LOG/build.log"
  if ! timeout 200 python setup.py build_ext --inplace >>"$LOG/build.log" 2>&1; then
    # keep the CPU / Triton checks alive: build without the CUDA sources and report the failure
    echo "CUDA build FAILED (see $LOG/build.log); rebuilding with LEMON_EXT_SKIP_CUDA_BUILD=1" | tee -a "$LOG/steps.log"
    grep -E "error" "$LOG/build.log" | head -20 || true
    status=1
    LEMON_EXT_SKIP_CUDA_BUILD=1 timeout 200 python setup.py build_ext --inplace >>"$LOG/build_nocuda.log" 2>&1 || exit 1
  fi
fi
python -c "from lemon_ext import ops; print(ops.backends())" | tee "$LOG/backends.log"
python -c "from lemon_ext import ops; import sys; b = ops.backends(); sys.exit(0 if b['cuda'] is None else 1)" \
  || { echo "CUDA backend missing after the build: see $LOG/build.log"; status=1; }

step "GPU tests (op backends, the GPU checkpoint pipeline)"
if ! LEMON_OPS_TRITON_MATRIX=0 timeout 150 python -m pytest -q --maxfail=5 -p no:cacheprovider tests/test_ops_kernels.py tests/test_ops_api.py \
    tests/test_ops_triton.py tests/test_checkpoint_cuda_pipeline.py -rs >"$LOG/tests.log" 2>&1; then
  status=1
fi
tail -15 "$LOG/tests.log"

step "benchmark: 3 full shapes x bf16/fp32 x circular/random x lemon/off"
timeout 130 python benchmarks/bench_expand.py --out "$LOG/bench_expand.json" >"$LOG/bench.log" 2>&1 || status=1

step "benchmark: expand_state_dict through the GPU pipeline vs pinned H2D/D2H bandwidth"
timeout 90 python benchmarks/bench_pipeline_gpu.py --json "$LOG/bench_pipeline.json" >"$LOG/bench_pipeline.log" 2>&1 || status=1

step "done (status $status); logs in $LOG"
grep -E "passed|failed|error" "$LOG/tests.log" | tail -1 || true
tail -3 "$LOG/bench_pipeline.log"
sed -n '/^| backend/,$p' "$LOG/bench.log"
exit $status
