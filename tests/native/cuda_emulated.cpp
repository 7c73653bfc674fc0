// Runs the CUDA kernel (csrc/cuda/expand_kernel.cu, through its plain-C launcher) on CPU threads
// with cuda_shim.h, on the fixed cases of cases.h, and prints one hash per case: the kernel's
// indexing, shared-memory staging and fallbacks, 16-byte stores and row offsets, checked against
// the PyTorch reference without a GPU (tests/test_ops_native.py). The test compiles a copy of the
// .cu with `kernel<<<...>>>(...)` rewritten to lemon_shim_launch(kernel, ..., ...) and passes its
// path as LEMON_KERNEL_CU.
#include "cuda_shim.h"
#include LEMON_KERNEL_CU

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cases.h"

using lemon_test::Case;

namespace {

std::vector<char> run_case(const Case& c) {
  std::vector<char> buf(lemon_test::out_bytes(c));
  // The wrapper's column digest (csrc/cuda/expand_cuda.cpp does it with torch ops on the device).
  std::vector<int32_t> cidx(c.ct), meta(c.ct);
  for (int64_t j = 0; j < c.ct; ++j) {
    cidx[j] = lemon::staged_slot((*c.cm)[j], c.cs);
    meta[j] = lemon::column_meta((*c.cm)[j], (*c.gs)[j], (*c.gp)[j]);
  }
  LemonExpandLaunch a{};
  a.src = c.src; a.src_kind = c.src_kind; a.rs = c.rs; a.cs = c.cs; a.s0 = c.s0; a.s1 = 1;
  a.row_map = c.rm->data(); a.cidx = cidx.data(); a.meta = meta.data();
  a.row_factor = c.rf->data(); a.col_factor = c.cf->data(); a.row_mean = c.rmean->data();
  a.col_mean = c.cmean->data(); a.rt = c.rt; a.ct = c.ct; a.split = c.split; a.max_n = c.max_n;
  a.noise_std = c.noise_std;
  const lemon::PhiloxKey k = lemon::philox_key(c.seed, c.key);
  a.k0 = k.k0; a.k1 = k.k1; a.row_offset = c.row_offset; a.col_offset = c.col_offset;
  a.out_kind = c.out; a.out = buf.data();
  const int err = lemon_expand_cuda_launch(&a, nullptr);
  if (err != 0) {
    std::fprintf(stderr, "launch failed: %d (%s split=%d out=%d)\n", err, c.kind, c.split, c.out);
    std::exit(2);
  }
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  std::printf("cuda-emulated max_smem=%zu\n", cuda_shim::max_smem());
  lemon_test::for_each_case(argc > 1 ? std::atoll(argv[1]) : 301, run_case);
  return 0;
}
