// Argument checks and normalisation shared by the CPU and CUDA wrappers of lemon_ext::expand.
// User errors raise TORCH_CHECK messages that name the argument at fault.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "expand_math.h"

namespace lemon {

struct ExpandInputs {
  at::Tensor source, row_map, col_map, group_size, group_pos;  // maps int64, groups int32
  at::Tensor row_factor, col_factor, row_mean, col_mean;       // float32 or undefined
};

inline at::Tensor opt_f32(const std::optional<at::Tensor>& t, int64_t numel, const char* name,
                          const at::Tensor& source, bool host_ok = false) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->numel() == numel, "expand: ", name, " must have ", numel, " elements, got ", t->numel());
  TORCH_CHECK(t->device() == source.device() || (host_ok && t->is_cpu()), "expand: ", name, " is on ",
              t->device(), " but source is on ", source.device());
  return t->to(at::kFloat).contiguous().view({numel});
}

inline int out_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kOutF32;
    case at::kBFloat16: return kOutBF16;
    case at::kHalf: return kOutF16;
    case at::kDouble: return kOutF64;
    default: TORCH_CHECK(false, "expand: out_dtype must be float32, bfloat16, float16 or float64, got ", t);
  }
  return 0;
}

inline ExpandInputs check_inputs(
    const at::Tensor& source, const at::Tensor& row_map, const at::Tensor& col_map,
    const std::optional<at::Tensor>& row_factor, const std::optional<at::Tensor>& col_factor,
    const at::Tensor& group_size, const at::Tensor& group_pos,
    const std::optional<at::Tensor>& row_mean, const std::optional<at::Tensor>& col_mean,
    int64_t split, at::ScalarType out_dtype, bool maps_on_host = false) {
  // maps_on_host (CUDA wrapper only): the four map tensors are CPU tensors beside a GPU source,
  // checked on the host without a device sync; factors and means may then be on either side.
  TORCH_CHECK(source.dim() == 2, "expand: source must be 2-D, got shape ", source.sizes());
  const auto st = source.scalar_type();
  // float64 tensors are computed in float64 by the reference (the engine's losslessness
  // tests); the native kernels compute in float32 only, so they refuse float64.
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
              "expand: source must be float32, bfloat16 or float16 (float64 runs on the torch "
              "backend), got ", st);
  TORCH_CHECK(out_kind(out_dtype) != kOutF64, "expand: out_dtype float64 runs on the torch backend only");
  TORCH_CHECK(split >= kSplitNone && split <= kSplitCancelEqual, "expand: split must be in [0, 5], got ", split);
  const int64_t rs = source.size(0), cs = source.size(1);
  const int64_t rt = row_map.numel(), ct = col_map.numel();
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{row_map, "row_map"},
                               {col_map, "col_map"}, {group_size, "group_size"}, {group_pos, "group_pos"}}) {
    TORCH_CHECK(t.dim() == 1, "expand: ", name, " must be 1-D, got shape ", t.sizes());
    TORCH_CHECK(!at::isFloatingType(t.scalar_type()) && t.scalar_type() != at::kBool,
                "expand: ", name, " must be an integer tensor, got ", t.scalar_type());
    if (maps_on_host) {
      TORCH_CHECK(t.is_cpu(), "expand: ", name, " is on ", t.device(), " but row_map is on the CPU (maps go together)");
    } else {
      TORCH_CHECK(t.device() == source.device(), "expand: ", name, " is on ", t.device(), " but source is on ",
                  source.device());
    }
  }
  TORCH_CHECK(group_size.numel() == ct && group_pos.numel() == ct,
              "expand: group_size and group_pos must have col_map's length ", ct);
  ExpandInputs in;
  in.source = source;
  in.row_map = row_map.to(at::kLong).contiguous();
  in.col_map = col_map.to(at::kLong).contiguous();
  in.group_size = group_size.to(at::kInt).contiguous();
  in.group_pos = group_pos.to(at::kInt).contiguous();
  in.row_factor = opt_f32(row_factor, rt, "row_factor", source, maps_on_host);
  in.col_factor = opt_f32(col_factor, ct, "col_factor", source, maps_on_host);
  in.row_mean = opt_f32(row_mean, cs, "row_mean", source, maps_on_host);
  in.col_mean = opt_f32(col_mean, rs, "col_mean", source, maps_on_host);
  (void)rs;
  return in;
}

}  // namespace lemon
