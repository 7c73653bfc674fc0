// Torch-facing wrapper of the CUDA kernel (compiled only when setup.py builds with CUDA):
// checks arguments (TORCH_CHECK naming the argument), digests the column map into two int32
// words per column and launches on the current stream.
//
// Maps are host data: given as CPU tensors (what lemon_ext.ops.expand passes) they are checked
// and digested here on the host and go up, with host factors, in one asynchronous copy from a
// page-locked block on the current stream, so a call never waits for the device and a pipeline
// keeps its copies and kernels in flight. Maps already on the device are checked with one device
// sync (their ranges and the group-size bound come back in one copy) and digested with a few torch
// ops there.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "../expand_checks.h"
#include "../expand_launch.h"

namespace lemon {
namespace {

// Host tensor -> `dev`, asynchronously on the current stream from pinned memory (the caching host
// allocator keeps the pinned block until the copy has run). Device tensors pass through.
at::Tensor upload(const at::Tensor& t, const at::Device& dev) {
  if (!t.defined() || t.device() == dev) return t;
  return t.contiguous().pin_memory().to(t.options().device(dev), /*non_blocking=*/true);
}

at::Tensor expand_cuda(const at::Tensor& source, const at::Tensor& row_map, const at::Tensor& col_map,
                       const std::optional<at::Tensor>& row_factor, const std::optional<at::Tensor>& col_factor,
                       const at::Tensor& group_size, const at::Tensor& group_pos,
                       const std::optional<at::Tensor>& row_mean, const std::optional<at::Tensor>& col_mean,
                       int64_t split, double noise_std, int64_t seed, int64_t key, at::ScalarType out_dtype,
                       int64_t row_offset, int64_t col_offset) {
  TORCH_CHECK(source.is_cuda(), "expand (CUDA): source must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(source.device());
  const bool host_maps = row_map.is_cpu();
  ExpandInputs in = check_inputs(source, row_map, col_map, row_factor, col_factor, group_size, group_pos,
                                 row_mean, col_mean, split, out_dtype, host_maps);
  const int64_t rs = source.size(0), cs = source.size(1), rt = in.row_map.numel(), ct = in.col_map.numel();
  at::Tensor out = at::empty({rt, ct}, source.options().dtype(out_dtype));
  if (rt == 0 || ct == 0) return out;
  const at::Device dev = source.device();
  int max_n = 0;
  at::Tensor rmap, cidx, meta;
  at::Tensor row_factor_d = in.row_factor, col_factor_d = in.col_factor;
  if (host_maps) {
    const int64_t* rm = in.row_map.data_ptr<int64_t>();
    const int64_t* cm = in.col_map.data_ptr<int64_t>();
    const int32_t* gs = in.group_size.data_ptr<int32_t>();
    const int32_t* gp = in.group_pos.data_ptr<int32_t>();
    for (int64_t i = 0; i < rt; ++i)
      TORCH_CHECK(rm[i] >= kMean && rm[i] < rs, "expand: row_map entries must be source rows in [0, ", rs,
                  ") or ZERO (-1) / MEAN (-2); row_map[", i, "] = ", rm[i]);
    // One page-locked staging block, one copy: [row_map i64 x rt | cidx i32 x ct | meta i32 x ct |
    // row_factor f32 x rt | col_factor f32 x ct] (factors when given on the host). Every part
    // starts at a multiple of its element size.
    const bool rf_host = in.row_factor.defined() && in.row_factor.is_cpu();
    const bool cf_host = in.col_factor.defined() && in.col_factor.is_cpu();
    const int64_t o_cidx = rt * 8, o_meta = o_cidx + ct * 4, o_rf = o_meta + ct * 4;
    const int64_t o_cf = o_rf + (rf_host ? rt * 4 : 0), nbytes = o_cf + (cf_host ? ct * 4 : 0);
    at::Tensor staging = at::empty({nbytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    uint8_t* p = staging.data_ptr<uint8_t>();
    std::memcpy(p, rm, size_t(rt) * 8);
    int32_t* dc = reinterpret_cast<int32_t*>(p + o_cidx);
    int32_t* dm = reinterpret_cast<int32_t*>(p + o_meta);
    for (int64_t j = 0; j < ct; ++j) {
      TORCH_CHECK(cm[j] >= kFree && cm[j] < cs, "expand: col_map entries must be source columns in [0, ", cs,
                  ") or ZERO (-1) / MEAN (-2) / FREE (-3); col_map[", j, "] = ", cm[j]);
      TORCH_CHECK(gs[j] >= 0 && gs[j] <= kMaxGroupSize, "expand: group_size[", j, "] = ", gs[j],
                  " is outside [0, ", kMaxGroupSize, "]");
      max_n = std::max(max_n, int(gs[j]));
      dc[j] = staged_slot(cm[j], cs);
      dm[j] = column_meta(cm[j], gs[j], gp[j]);
    }
    if (rf_host) std::memcpy(p + o_rf, in.row_factor.data_ptr<float>(), size_t(rt) * 4);
    if (cf_host) std::memcpy(p + o_cf, in.col_factor.data_ptr<float>(), size_t(ct) * 4);
    // asynchronous on the current stream; the caching host allocator keeps the block until it ran
    const at::Tensor up = staging.to(staging.options().device(dev).pinned_memory(false), /*non_blocking=*/true);
    rmap = up.narrow(0, 0, rt * 8).view(at::kLong);
    cidx = up.narrow(0, o_cidx, ct * 4).view(at::kInt);
    meta = up.narrow(0, o_meta, ct * 4).view(at::kInt);
    if (rf_host) row_factor_d = up.narrow(0, o_rf, rt * 4).view(at::kFloat);
    if (cf_host) col_factor_d = up.narrow(0, o_cf, ct * 4).view(at::kFloat);
  } else {
    // The group size bound is needed on the host anyway (shared-memory plan); the map ranges come
    // back with it in the same copy, so a bad index is an error, never a read outside the source.
    const at::Tensor bounds = at::stack({in.group_size.max().to(at::kLong), in.row_map.min(), in.row_map.max(),
                                         in.col_map.min(), in.col_map.max()}).cpu();
    const int64_t* b = bounds.data_ptr<int64_t>();
    max_n = int(b[0]);
    TORCH_CHECK(max_n <= kMaxGroupSize, "expand: group_size holds ", max_n, " > ", kMaxGroupSize);
    TORCH_CHECK(b[1] >= kMean && b[2] < rs, "expand: row_map entries must be source rows in [0, ", rs,
                ") or ZERO (-1) / MEAN (-2); got range [", b[1], ", ", b[2], "]");
    TORCH_CHECK(b[3] >= kFree && b[4] < cs, "expand: col_map entries must be source columns in [0, ", cs,
                ") or ZERO (-1) / MEAN (-2) / FREE (-3); got range [", b[3], ", ", b[4], "]");
    // Column digest on the device: cidx = staged_slot(c, cs), meta = column_meta(c, n, m)
    // (expand_math.h: c, cs (ZERO/FREE) or cs + 1 (MEAN); n | m << 8 | FREE << 16 | ZERO << 17).
    const at::Tensor& c = in.col_map;
    rmap = in.row_map;
    cidx = at::where(c >= 0, c, at::where(c == kMean, cs + 1, cs)).to(at::kInt).contiguous();
    meta = (in.group_size.bitwise_and(0xFF) + in.group_pos.bitwise_and(0xFF) * 256 +
            (c == kFree).to(at::kInt) * 65536 + (c == kZero).to(at::kInt) * 131072)
               .to(at::kInt).contiguous();
  }
  row_factor_d = upload(row_factor_d, dev);  // device already, or a host tensor beside device maps
  col_factor_d = upload(col_factor_d, dev);
  const at::Tensor row_mean_d = upload(in.row_mean, dev), col_mean_d = upload(in.col_mean, dev);
  // Source: any row stride; a non-unit column stride would make the staging loads uncoalesced.
  const at::Tensor src = source.stride(1) == 1 ? source : source.contiguous();
  const at::ScalarType st = src.scalar_type();
  LemonExpandLaunch a{};
  a.src = src.data_ptr();
  a.src_kind = st == at::kFloat ? 0 : st == at::kBFloat16 ? 1 : 2;
  a.rs = src.size(0); a.cs = cs; a.s0 = src.stride(0); a.s1 = src.stride(1);
  a.row_map = rmap.data_ptr<int64_t>();
  a.cidx = cidx.data_ptr<int32_t>();
  a.meta = meta.data_ptr<int32_t>();
  a.row_factor = row_factor_d.defined() ? row_factor_d.data_ptr<float>() : nullptr;
  a.col_factor = col_factor_d.defined() ? col_factor_d.data_ptr<float>() : nullptr;
  a.row_mean = row_mean_d.defined() ? row_mean_d.data_ptr<float>() : nullptr;
  a.col_mean = col_mean_d.defined() ? col_mean_d.data_ptr<float>() : nullptr;
  a.rt = rt; a.ct = ct;
  a.split = int(split); a.max_n = max_n;
  a.noise_std = float(noise_std);
  const PhiloxKey k = philox_key(seed, key);
  a.k0 = k.k0; a.k1 = k.k1;
  a.row_offset = row_offset; a.col_offset = col_offset;
  a.out_kind = out_kind(out_dtype);
  a.out = out.data_ptr();
  const int err = lemon_expand_cuda_launch(&a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "expand (CUDA): kernel launch failed: ", cudaGetErrorString(cudaError_t(err)));
  return out;
}

}  // namespace
}  // namespace lemon

TORCH_LIBRARY_IMPL(lemon_ext, CUDA, m) { m.impl("expand", &lemon::expand_cuda); }
