// The CPU row loop (csrc/expand_cpu_rows.h, no torch) on one synthetic tensor, single thread,
// built by benchmarks/stage_counters.py with -DLEMON_STAGE_TSC: the TSC ticks of every stage print
// at exit (stage_tsc.h). Usage: stage_counters RS CS RT CT SPLIT OUT MAPS REPS
//   SPLIT 0 none / 1 LEMON / 4 cancel; OUT 0 f32 / 1 bf16; MAPS circular | random
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "expand_cpu_rows.h"

using namespace lemon;

int main(int argc, char** argv) {
  if (argc < 9) { std::fprintf(stderr, "usage: RS CS RT CT SPLIT OUT MAPS REPS\n"); return 2; }
  const int64_t rs = std::atoll(argv[1]), cs = std::atoll(argv[2]), rt = std::atoll(argv[3]), ct = std::atoll(argv[4]);
  const int split = std::atoi(argv[5]), out_kind = std::atoi(argv[6]);
  const bool random_maps = std::string(argv[7]) == "random";
  const int reps = std::atoi(argv[8]);
  std::mt19937 gen(0);
  std::vector<int64_t> rm(rt), cm(ct);
  for (int64_t i = 0; i < rt; ++i) rm[i] = i < rs || !random_maps ? i % rs : int64_t(gen() % rs);
  for (int64_t j = 0; j < ct; ++j) cm[j] = j < cs || !random_maps ? j % cs : int64_t(gen() % cs);
  // group size n and rank m of each target column (ops.reference.group_layout)
  std::vector<int32_t> count(cs, 0), gs(ct), gp(ct);
  for (int64_t j = 0; j < ct; ++j) gp[j] = count[cm[j]]++;
  int max_n = 0;
  for (int64_t j = 0; j < ct; ++j) { gs[j] = count[cm[j]]; max_n = std::max(max_n, int(gs[j])); }
  std::vector<uint16_t> src(rs * cs);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  for (auto& x : src) x = f32_to_bf16(normal(gen));
  std::vector<char> out(rt * ct * (out_kind == kOutF32 ? 4 : 2));
  CpuArgs a{};
  a.src = src.data(); a.src_kind = kSrcBF16; a.rs = rs; a.cs = cs; a.s0 = cs; a.s1 = 1;
  a.row_map = rm.data(); a.rt = rt; a.ct = ct; a.split = split; a.key = philox_key(1234, 5678);
  a.out = out.data();
  const CpuPlan p = make_plan(cm.data(), gs.data(), gp.data(), ct, cs, split, max_n);
  for (int r = 0; r < reps; ++r) {
    if (out_kind == kOutF32) {
      if (split == kSplitNone) expand_rows<kOutF32, 0>(a, p, 0, rt);
      else if (split == kSplitLemon) expand_rows<kOutF32, 1>(a, p, 0, rt);
      else expand_rows<kOutF32, 3>(a, p, 0, rt);
    } else {
      if (split == kSplitNone) expand_rows<kOutBF16, 0>(a, p, 0, rt);
      else if (split == kSplitLemon) expand_rows<kOutBF16, 1>(a, p, 0, rt);
      else expand_rows<kOutBF16, 3>(a, p, 0, rt);
    }
  }
  std::printf("elements %lld fused %d\n", (long long)(rt * ct * reps), int(p.fused));
  return 0;
}
