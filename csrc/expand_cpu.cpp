// CPU kernel of lemon_ext::expand (schema: lemon_ext/ops/_schema.py), bit-identical to
// lemon_ext/ops/reference.py: float32 math, no FMA contraction (-ffp-contract=off in setup.py),
// round-to-nearest-even casts. Rows run in parallel (at::parallel_for); see expand_cpu_rows.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "expand_checks.h"
#include "expand_cpu_rows.h"

namespace lemon {
namespace {

// No MADV_HUGEPAGE on the output: on the dev VM (THP "madvise" mode) it made the first touch
// of fresh output pages 6x slower (98 MB: 885-1057 ms against 160-179 ms with 4 KB pages,
// 2026-11-26), after an earlier session had measured it 12x faster; the kernel's THP policy
// is the user's to set, not this op's.

template <int OUT>
void dispatch_rows(const CpuArgs& a, const CpuPlan& p) {
  const int mode = a.split == kSplitNone ? 0 : a.split == kSplitLemon ? 1
                 : (a.split == kSplitCancel || a.split == kSplitCancelEqual) ? 3 : 2;
  // >= 64K target elements per task: parallel_for's per-task cost stays below 1%.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(a.ct, 1));
  at::parallel_for(0, a.rt, grain, [&](int64_t b, int64_t e) {
    if (mode == 0) expand_rows<OUT, 0>(a, p, b, e);
    else if (mode == 1) expand_rows<OUT, 1>(a, p, b, e);
    else if (mode == 3) expand_rows<OUT, 3>(a, p, b, e);
    else expand_rows<OUT, 2>(a, p, b, e);
  });
}

at::Tensor expand_cpu(const at::Tensor& source, const at::Tensor& row_map, const at::Tensor& col_map,
                      const std::optional<at::Tensor>& row_factor, const std::optional<at::Tensor>& col_factor,
                      const at::Tensor& group_size, const at::Tensor& group_pos,
                      const std::optional<at::Tensor>& row_mean, const std::optional<at::Tensor>& col_mean,
                      int64_t split, double noise_std, int64_t seed, int64_t key, at::ScalarType out_dtype,
                      int64_t row_offset, int64_t col_offset) {
  ExpandInputs in = check_inputs(source, row_map, col_map, row_factor, col_factor, group_size, group_pos,
                                 row_mean, col_mean, split, out_dtype);
  const int64_t rs = source.size(0), cs = source.size(1);
  const int64_t rt = in.row_map.numel(), ct = in.col_map.numel();
  at::Tensor out = at::empty({rt, ct}, source.options().dtype(out_dtype));
  if (rt == 0 || ct == 0) return out;
  const int64_t* rm = in.row_map.data_ptr<int64_t>();
  const int64_t* cm = in.col_map.data_ptr<int64_t>();
  for (int64_t i = 0; i < rt; ++i)
    TORCH_CHECK(rm[i] >= kMean && rm[i] < rs, "expand: row_map[", i, "] = ", rm[i],
                " is neither a source row in [0, ", rs, ") nor ZERO (-1) / MEAN (-2)");
  const int32_t* gs = in.group_size.data_ptr<int32_t>();
  int max_n = 0;
  for (int64_t j = 0; j < ct; ++j) {
    TORCH_CHECK(cm[j] >= kFree && cm[j] < cs, "expand: col_map[", j, "] = ", cm[j],
                " is neither a source column in [0, ", cs, ") nor ZERO (-1) / MEAN (-2) / FREE (-3)");
    TORCH_CHECK(gs[j] >= 0 && gs[j] <= kMaxGroupSize, "expand: group_size[", j, "] = ", gs[j],
                " is outside [0, ", kMaxGroupSize, "]");
    max_n = std::max(max_n, int(gs[j]));
  }
  const at::ScalarType st = source.scalar_type();
  CpuArgs a{};
  a.src = source.data_ptr();
  a.src_kind = st == at::kFloat ? kSrcF32 : st == at::kDouble ? kSrcF64 : st == at::kBFloat16 ? kSrcBF16 : kSrcF16;
  a.rs = rs; a.cs = cs; a.s0 = source.stride(0); a.s1 = source.stride(1);
  a.row_map = rm;
  a.row_factor = in.row_factor.defined() ? in.row_factor.data_ptr<float>() : nullptr;
  a.col_factor = in.col_factor.defined() ? in.col_factor.data_ptr<float>() : nullptr;
  a.row_mean = in.row_mean.defined() ? in.row_mean.data_ptr<float>() : nullptr;
  a.col_mean = in.col_mean.defined() ? in.col_mean.data_ptr<float>() : nullptr;
  a.rt = rt; a.ct = ct;
  a.split = int(split);
  a.noise_std = float(noise_std);
  a.key = philox_key(seed, key);
  a.row_offset = row_offset; a.col_offset = col_offset;
  a.out = out.data_ptr();
  const CpuPlan plan = make_plan(cm, gs, in.group_pos.data_ptr<int32_t>(), ct, cs, a.split, max_n);
  switch (out_kind(out_dtype)) {
    case kOutF32: dispatch_rows<kOutF32>(a, plan); break;
    case kOutBF16: dispatch_rows<kOutBF16>(a, plan); break;
    default: dispatch_rows<kOutF16>(a, plan); break;
  }
  return out;
}

}  // namespace
}  // namespace lemon

TORCH_LIBRARY_IMPL(lemon_ext, CPU, m) { m.impl("expand", &lemon::expand_cpu); }
