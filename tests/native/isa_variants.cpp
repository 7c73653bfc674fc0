// Runs the CPU row loop (csrc/expand_cpu_rows.h, no torch) on fixed inputs for every split mode,
// output dtype and map kind, and prints one FNV-1a hash of the output bytes per case.
// tests/test_ops_isa_variants.py builds it twice (with the GCC target clones; without them for
// baseline x86-64) and runs it natively, under valgrind (which reports no AVX-512, so the AVX2
// clones and the AVX2 Philox run) and with LEMON_EXT_PHILOX=scalar: every variant must print the
// same hashes as the native AVX-512 run, which the op tests compare with the reference.
#include <cstdio>
#include <cstring>
#include <map>
#include <vector>

#include "expand_cpu_rows.h"

using namespace lemon;

namespace {

struct Lcg {  // own generator: the inputs must not depend on the C++ library
  uint64_t s;
  uint32_t next() { s = s * 6364136223846793005ull + 1442695040888963407ull; return uint32_t(s >> 33); }
  float uniform() { return float(next() >> 8) * 0x1p-24f; }
};

uint64_t fnv1a(const void* p, size_t n, uint64_t h = 1469598103934665603ull) {
  const auto* b = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

template <int OUT>
void run_rows(int mode, const CpuArgs& a, const CpuPlan& p) {
  if (mode == 0) expand_rows<OUT, 0>(a, p, 0, a.rt);
  else if (mode == 1) expand_rows<OUT, 1>(a, p, 0, a.rt);
  else if (mode == 3) expand_rows<OUT, 3>(a, p, 0, a.rt);
  else expand_rows<OUT, 2>(a, p, 0, a.rt);
}

}  // namespace

int main() {
  // What the GCC ifunc resolver and the Philox dispatch see on this CPU (or under valgrind).
  std::printf("isa avx512f=%d avx2=%d\n", int(__builtin_cpu_supports("avx512f")), int(__builtin_cpu_supports("avx2")));
  // 301 target columns: 64-quad SIMD blocks, runs and gathered stretches in one row.
  const int64_t rs = 23, cs = 150, rt = 41, ct = 301;
  Lcg g{12345};
  std::vector<float> src(rs * cs), rf(rt), cf(ct), rmean(cs), cmean(rs);
  for (auto& x : src) x = (g.uniform() - 0.5f) * 4.0f;
  for (auto& x : rf) x = 0.5f + g.uniform();
  for (auto& x : cf) x = 0.5f + g.uniform();
  for (auto& x : rmean) x = g.uniform() - 0.5f;
  for (auto& x : cmean) x = g.uniform() - 0.5f;
  std::vector<int64_t> rm(rt);
  for (int64_t i = 0; i < rt; ++i) rm[i] = i == 7 ? kZero : i == 11 ? kMean : i % rs;
  const int splits[] = {kSplitNone, kSplitLemon, kSplitEqual, kSplitProjection, kSplitCancel, kSplitCancelEqual};
  for (int kind = 0; kind < 2; ++kind) {  // 0 circular, 1 random (with ZERO / MEAN / FREE columns)
    std::vector<int64_t> cm(ct);
    for (int64_t j = 0; j < ct; ++j) cm[j] = j < cs || kind == 0 ? j % cs : int64_t(g.next() % cs);
    if (kind == 1) { cm[200] = kZero; cm[201] = kFree; cm[250] = kMean; cm[251] = kFree; }
    std::map<int64_t, int> count;
    std::vector<int32_t> gs(ct), gp(ct);
    for (int64_t j = 0; j < ct; ++j) gp[j] = cm[j] >= 0 ? count[cm[j]]++ : 0;
    int max_n = 1;
    for (int64_t j = 0; j < ct; ++j) {
      gs[j] = cm[j] >= 0 ? count[cm[j]] : 0;  // sentinels: 0, as reference.group_layout
      max_n = std::max(max_n, int(gs[j]));
    }
    for (int split : splits) {
      for (int out = kOutF32; out <= kOutF16; ++out) {
        CpuArgs a{};
        a.src = src.data(); a.src_kind = kSrcF32; a.rs = rs; a.cs = cs; a.s0 = cs; a.s1 = 1;
        a.row_map = rm.data(); a.row_factor = rf.data(); a.row_mean = rmean.data(); a.col_mean = cmean.data();
        a.col_factor = cf.data(); a.rt = rt; a.ct = ct; a.split = split; a.noise_std = 0.02f;
        a.key = philox_key(1234, 5678); a.row_offset = 4294967280LL; a.col_offset = 3;
        std::vector<char> buf(size_t(rt * ct) * (out == kOutF32 ? 4 : 2));
        a.out = buf.data();
        const CpuPlan p = make_plan(cm.data(), gs.data(), gp.data(), ct, cs, split, max_n);
        const int mode = split == kSplitNone ? 0 : split == kSplitLemon ? 1
                       : (split == kSplitCancel || split == kSplitCancelEqual) ? 3 : 2;
        if (out == kOutF32) run_rows<kOutF32>(mode, a, p);
        else if (out == kOutBF16) run_rows<kOutBF16>(mode, a, p);
        else run_rows<kOutF16>(mode, a, p);
        std::printf("%s split=%d out=%d %016llx\n", kind ? "random" : "circular", split, out,
                    static_cast<unsigned long long>(fnv1a(buf.data(), buf.size())));
      }
    }
  }
  return 0;
}
