// Runs the CPU row loop (csrc/expand_cpu_rows.h, no torch) on the fixed cases of cases.h and
// prints one hash per case. tests/test_ops_native.py builds it twice (with the GCC target clones;
// without them, -DLEMON_NO_CLONES, for baseline x86-64) and runs it natively, with
// LEMON_EXT_PHILOX=avx2/scalar and under valgrind (whose CPU reports AVX2 but no AVX-512, so the
// AVX2 clones and the AVX2 Philox run): every run must print the PyTorch reference's hashes.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cases.h"
#include "expand_cpu_rows.h"

using namespace lemon;
using lemon_test::Case;

namespace {

template <int OUT>
void run_rows(int mode, const CpuArgs& a, const CpuPlan& p) {
  if (mode == 0) expand_rows<OUT, 0>(a, p, 0, a.rt);
  else if (mode == 1) expand_rows<OUT, 1>(a, p, 0, a.rt);
  else if (mode == 3) expand_rows<OUT, 3>(a, p, 0, a.rt);
  else expand_rows<OUT, 2>(a, p, 0, a.rt);
}

std::vector<char> run_case(const Case& c) {
  std::vector<char> buf(lemon_test::out_bytes(c));
  CpuArgs a{};
  a.src = c.src; a.src_kind = c.src_kind; a.rs = c.rs; a.cs = c.cs; a.s0 = c.s0; a.s1 = 1;
  a.row_map = c.rm->data(); a.row_factor = c.rf->data(); a.row_mean = c.rmean->data();
  a.col_mean = c.cmean->data(); a.col_factor = c.cf->data(); a.rt = c.rt; a.ct = c.ct;
  a.split = c.split; a.noise_std = c.noise_std; a.key = philox_key(c.seed, c.key);
  a.row_offset = c.row_offset; a.col_offset = c.col_offset; a.out = buf.data();
  const CpuPlan p = make_plan(c.cm->data(), c.gs->data(), c.gp->data(), c.ct, c.cs, c.split, c.max_n);
  const int mode = c.split == kSplitNone ? 0 : c.split == kSplitLemon ? 1
                 : (c.split == kSplitCancel || c.split == kSplitCancelEqual) ? 3 : 2;
  if (c.out == kOutF32) run_rows<kOutF32>(mode, a, p);
  else if (c.out == kOutBF16) run_rows<kOutBF16>(mode, a, p);
  else run_rows<kOutF16>(mode, a, p);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  // What the GCC ifunc resolver and the Philox dispatch see on this CPU (or under valgrind).
#if defined(__x86_64__)
  std::printf("isa avx512f=%d avx2=%d\n", int(__builtin_cpu_supports("avx512f") != 0),
              int(__builtin_cpu_supports("avx2") != 0));  // nonzero flags, not 1
#else
  std::printf("isa not-x86-64\n");
#endif
  lemon_test::for_each_case(argc > 1 ? std::atoll(argv[1]) : 301, run_case);
  return 0;
}
