// CUDA kernel of lemon_ext::expand + a plain C launcher. No torch headers: `nvcc -arch=sm_90 -c`
// checks this file in seconds. Math: ../expand_math.h (shared with the CPU kernel, so CPU tests
// exercise it); compile with --fmad=false (setup.py) so every float op rounds as the reference.
//
// Design (leads measured on H100, shared/ENVIRONMENT.md): one CTA per target row walking its
// columns. The source row is staged in shared memory in float32 (times row_factor) so column
// gathers never touch HBM; the draws of every (row, source-column quad, stream) the split reads
// are made once per quad (4 words per Philox call, all kept) into shared memory and gathered by
// the replicas; each thread writes 16-byte vectors of consecutive columns (coalesced).
// Fallbacks when shared memory is short: draws per element, then the source row from global.
#include <cuda_runtime.h>

#include "../expand_launch.h"
#include "../expand_math.h"

namespace {
using namespace lemon;

constexpr int kThreads = 512;

template <int OUT> struct DevOut { using T = uint16_t; };
template <> struct DevOut<kOutF32> { using T = float; };

template <int OUT>
__device__ __forceinline__ typename DevOut<OUT>::T encode(float x) {
  if constexpr (OUT == kOutF32) return x;
  else if constexpr (OUT == kOutBF16) return f32_to_bf16(x);
  else return f32_to_f16(x);
}

// S'[r, ci] in float32: ci < cs a source column (or the mean row's entry), cs the zero slot,
// cs + 1 the mean column. Same as stage_row in ../expand_cpu_rows.h.
__device__ __forceinline__ float source_value(const LemonExpandLaunch& a, int64_t r, int64_t ci) {
  if (ci < a.cs) {
    if (r < 0) return a.row_mean ? a.row_mean[ci] : 0.0f;
    const int64_t off = r * a.s0 + ci * a.s1;
    if (a.src_kind == 0) return static_cast<const float*>(a.src)[off];
    const uint16_t h = static_cast<const uint16_t*>(a.src)[off];
    return a.src_kind == 1 ? bf16_to_f32(h) : f16_to_f32(h);
  }
  return (ci == a.cs + 1 && r >= 0 && a.col_mean) ? a.col_mean[r] : 0.0f;
}

// U(row, col, stream): from the shared-memory table for staged streams, else a Philox call.
struct DevDraws {
  const float* tbl; int stride, slots; uint32_t base, row; int32_t col; PhiloxKey key;
  __device__ __forceinline__ float operator()(uint32_t stream) const {
    const uint32_t t = stream - base;
    if (t < uint32_t(slots)) return tbl[int64_t(t) * stride + col];
    return draw(key, row, uint64_t(col), stream);
  }
};

template <int OUT>
__global__ void __launch_bounds__(kThreads)
expand_rows_kernel(const LemonExpandLaunch a, const int stage_src, const int slots,
                   const uint32_t base, const int quads) {
  extern __shared__ __align__(16) float smem[];
  using O = typename DevOut<OUT>::T;
  constexpr int VEC = 16 / sizeof(O);
  const int64_t i = blockIdx.x;
  const int64_t r = a.row_map[i];
  O* out = static_cast<O*>(a.out) + i * a.ct;
  const bool vec_ok = (a.ct % VEC == 0) && ((reinterpret_cast<uintptr_t>(a.out) & 15) == 0);
  const int64_t step = int64_t(blockDim.x) * VEC;
  if (r == kZero) {  // whole row +0 (ZERO rows override FREE columns too)
    for (int64_t j0 = int64_t(threadIdx.x) * VEC; j0 < a.ct; j0 += step) {
      if (vec_ok) *reinterpret_cast<uint4*>(out + j0) = make_uint4(0, 0, 0, 0);
      else for (int e = 0; e < VEC && j0 + e < a.ct; ++e) out[j0 + e] = encode<OUT>(0.0f);
    }
    return;
  }
  const bool has_rf = a.row_factor != nullptr;
  const float rf = has_rf ? a.row_factor[i] : 1.0f;
  const int64_t spad = (a.cs + 2 + 3) / 4 * 4;
  float* srow = smem;
  float* tbl = smem + (stage_src ? spad : 0);
  if (stage_src) {
    for (int64_t k = threadIdx.x; k < a.cs + 2; k += blockDim.x) {
      const float x = source_value(a, r, k);
      srow[k] = has_rf ? __fmul_rn(x, rf) : x;
    }
  }
  const uint32_t row = uint32_t(uint64_t(i + a.row_offset));
  const PhiloxKey key{a.k0, a.k1};
  const int stride = quads * 4;
  for (int idx = threadIdx.x; idx < slots * quads; idx += blockDim.x) {
    const int t = idx / quads, q = idx - t * quads;
    const Words w = philox(uint32_t(q), row, base + uint32_t(t), 0u, key.k0, key.k1);
    reinterpret_cast<float4*>(tbl + int64_t(t) * stride)[q] =
        make_float4(to_uniform(w.w[0]), to_uniform(w.w[1]), to_uniform(w.w[2]), to_uniform(w.w[3]));
  }
  __syncthreads();
  for (int64_t j0 = int64_t(threadIdx.x) * VEC; j0 < a.ct; j0 += step) {
    union { uint4 v; O e[VEC]; } pack;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const int64_t j = j0 + e;
      float x = 0.0f;
      if (j < a.ct) {
        const int32_t ci = a.cidx[j], mt = a.meta[j];
        if (mt & (1 << 17)) {
          x = 0.0f;  // ZERO column
        } else if (mt & (1 << 16)) {  // FREE column: draw at the target column
          x = free_value(draw(key, row, uint64_t(j + a.col_offset), kStreamFree), a.noise_std);
        } else {
          float v = stage_src ? srow[ci] : (has_rf ? __fmul_rn(source_value(a, r, ci), rf) : source_value(a, r, ci));
          if (a.col_factor) v = __fmul_rn(v, a.col_factor[j]);
          const DevDraws U{tbl, stride, slots, base, row, ci < a.cs ? ci : 0, key};
          x = split_value<OUT>(a.split, v, mt & 0xFF, (mt >> 8) & 0xFF, a.noise_std, U);
        }
      }
      pack.e[e] = encode<OUT>(x);
    }
    if (vec_ok) *reinterpret_cast<uint4*>(out + j0) = pack.v;
    else for (int e = 0; e < VEC && j0 + e < a.ct; ++e) out[j0 + e] = pack.e[e];
  }
}

template <int OUT>
cudaError_t launch(const LemonExpandLaunch& a, cudaStream_t stream, int stage_src, int slots,
                   uint32_t base, int quads, size_t smem) {
  auto kernel = expand_rows_kernel<OUT>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<dim3(unsigned(a.rt)), kThreads, smem, stream>>>(a, stage_src, slots, base, quads);
  return cudaGetLastError();
}

}  // namespace

extern "C" int lemon_expand_cuda_launch(const LemonExpandLaunch* args, void* stream) {
  const LemonExpandLaunch& a = *args;
  if (a.rt == 0 || a.ct == 0) return 0;
  if (a.rt > 0x7FFFFFFF) return int(cudaErrorInvalidValue);
  int dev = 0, max_smem = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return int(err);
  const int quads = int((a.cs + 3) / 4);
  const size_t src_bytes = size_t((a.cs + 2 + 3) / 4 * 4) * sizeof(float);
  int slots = num_stream_slots(a.split, a.max_n);
  const int stage_src = src_bytes <= size_t(max_smem) ? 1 : 0;
  if (!stage_src || src_bytes + size_t(slots) * quads * 16 > size_t(max_smem)) slots = 0;
  const size_t smem = (stage_src ? src_bytes : 0) + size_t(slots) * quads * 16;
  const uint32_t base = stream_base(a.split);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.out_kind) {
    case kOutF32: return int(launch<kOutF32>(a, s, stage_src, slots, base, quads, smem));
    case kOutBF16: return int(launch<kOutBF16>(a, s, stage_src, slots, base, quads, smem));
    case kOutF16: return int(launch<kOutF16>(a, s, stage_src, slots, base, quads, smem));
    default: return int(cudaErrorInvalidValue);
  }
}
