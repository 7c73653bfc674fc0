// Torch-facing wrapper of the CUDA kernel (compiled only when setup.py builds with CUDA):
// checks arguments (TORCH_CHECK naming the argument), digests the column map into two int32
// words per column with a few torch ops on the device, and launches on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../expand_checks.h"
#include "../expand_launch.h"

namespace lemon {
namespace {

at::Tensor expand_cuda(const at::Tensor& source, const at::Tensor& row_map, const at::Tensor& col_map,
                       const std::optional<at::Tensor>& row_factor, const std::optional<at::Tensor>& col_factor,
                       const at::Tensor& group_size, const at::Tensor& group_pos,
                       const std::optional<at::Tensor>& row_mean, const std::optional<at::Tensor>& col_mean,
                       int64_t split, double noise_std, int64_t seed, int64_t key, at::ScalarType out_dtype,
                       int64_t row_offset, int64_t col_offset) {
  TORCH_CHECK(source.is_cuda(), "expand (CUDA): source must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(source.device());
  ExpandInputs in = check_inputs(source, row_map, col_map, row_factor, col_factor, group_size, group_pos,
                                 row_mean, col_mean, split, out_dtype);
  const int64_t cs = source.size(1), rt = in.row_map.numel(), ct = in.col_map.numel();
  at::Tensor out = at::empty({rt, ct}, source.options().dtype(out_dtype));
  if (rt == 0 || ct == 0) return out;
  // The group size bound is needed on the host anyway (shared-memory plan); the map ranges come
  // back with it in the same copy, so a bad index is an error, never a read outside the source
  // (one device sync per call, as before).
  const at::Tensor bounds = at::stack({in.group_size.max().to(at::kLong), in.row_map.min(), in.row_map.max(),
                                       in.col_map.min(), in.col_map.max()}).cpu();
  const int64_t* b = bounds.data_ptr<int64_t>();
  const int max_n = int(b[0]);
  TORCH_CHECK(max_n <= kMaxGroupSize, "expand: group_size holds ", max_n, " > ", kMaxGroupSize);
  TORCH_CHECK(b[1] >= kMean && b[2] < source.size(0), "expand: row_map entries must be source rows in [0, ",
              source.size(0), ") or ZERO (-1) / MEAN (-2); got range [", b[1], ", ", b[2], "]");
  TORCH_CHECK(b[3] >= kFree && b[4] < cs, "expand: col_map entries must be source columns in [0, ", cs,
              ") or ZERO (-1) / MEAN (-2) / FREE (-3); got range [", b[3], ", ", b[4], "]");
  // Column digest, on the device: cidx = staged_slot(c, cs), meta = column_meta(c, n, m)
  // (expand_math.h: c, cs (ZERO/FREE) or cs + 1 (MEAN); n | m << 8 | FREE << 16 | ZERO << 17).
  const at::Tensor& c = in.col_map;
  const at::Tensor cidx = at::where(c >= 0, c, at::where(c == kMean, cs + 1, cs)).to(at::kInt).contiguous();
  const at::Tensor meta = (in.group_size.bitwise_and(0xFF) + in.group_pos.bitwise_and(0xFF) * 256 +
                           (c == kFree).to(at::kInt) * 65536 + (c == kZero).to(at::kInt) * 131072)
                              .to(at::kInt).contiguous();
  // Source: any row stride; a non-unit column stride would make the staging loads uncoalesced.
  const at::Tensor src = source.stride(1) == 1 ? source : source.contiguous();
  const at::ScalarType st = src.scalar_type();
  LemonExpandLaunch a{};
  a.src = src.data_ptr();
  a.src_kind = st == at::kFloat ? 0 : st == at::kBFloat16 ? 1 : 2;
  a.rs = src.size(0); a.cs = cs; a.s0 = src.stride(0); a.s1 = src.stride(1);
  a.row_map = in.row_map.data_ptr<int64_t>();
  a.cidx = cidx.data_ptr<int32_t>();
  a.meta = meta.data_ptr<int32_t>();
  a.row_factor = in.row_factor.defined() ? in.row_factor.data_ptr<float>() : nullptr;
  a.col_factor = in.col_factor.defined() ? in.col_factor.data_ptr<float>() : nullptr;
  a.row_mean = in.row_mean.defined() ? in.row_mean.data_ptr<float>() : nullptr;
  a.col_mean = in.col_mean.defined() ? in.col_mean.data_ptr<float>() : nullptr;
  a.rt = rt; a.ct = ct;
  a.split = int(split); a.max_n = max_n;
  a.noise_std = float(noise_std);
  const PhiloxKey k = philox_key(seed, key);
  a.k0 = k.k0; a.k1 = k.k1;
  a.row_offset = row_offset; a.col_offset = col_offset;
  a.out_kind = out_kind(out_dtype);
  a.out = out.data_ptr();
  const int err = lemon_expand_cuda_launch(&a, at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "expand (CUDA): kernel launch failed: ", cudaGetErrorString(cudaError_t(err)));
  return out;
}

}  // namespace
}  // namespace lemon

TORCH_LIBRARY_IMPL(lemon_ext, CUDA, m) { m.impl("expand", &lemon::expand_cuda); }
