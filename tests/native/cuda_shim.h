// Just enough of the CUDA runtime to run csrc/cuda/expand_kernel.cu on the CPU, for
// cuda_emulated.cpp: a launch runs the blocks one after another, each block's blockDim.x threads
// as fibers (ucontext) on one OS thread, switched at __syncthreads (512 OS threads and a
// std::barrier took 25 s for the 36 cases, mostly in the scheduler); shared memory is one buffer
// refilled with NaN before each block (a read of shared memory the kernel did not write shows
// up in the output). A block whose threads do not all reach the same barrier is an error. The launch
// refuses more dynamic shared memory than the device allows (LEMON_SHIM_MAX_SMEM, default an
// H100's 227 KiB) or more than 48 KiB without cudaFuncSetAttribute, as the driver does.
// Not emulated: warps (the kernel uses no warp primitives), memory model beyond the barrier.
#pragma once
#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <cstdio>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float __fmul_rn(float a, float b) { return a * b; }  // built with -ffp-contract=off

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
using cudaStream_t = void*;

namespace cuda_shim {
constexpr size_t kSmemFloats = 256 * 1024 / sizeof(float);
inline size_t max_smem() {
  const char* env = std::getenv("LEMON_SHIM_MAX_SMEM");
  return env ? size_t(std::atoll(env)) : size_t(227 * 1024);
}
inline size_t opted_in_smem = 48 * 1024;  // raised by cudaFuncSetAttribute
inline cudaError_t last_error = cudaSuccess;

// One block's threads as fibers: resume each in turn until it waits at a barrier or returns.
struct Block {
  std::function<void()> body;
  std::vector<ucontext_t> ctx;
  std::vector<char*> stacks;
  std::vector<char> done;
  ucontext_t scheduler;
  unsigned current = 0;
};
inline Block* block = nullptr;
inline void fiber_entry() {
  block->body();
  block->done[block->current] = 1;
}  // returns to uc_link: the scheduler
}  // namespace cuda_shim

// The kernel's `extern __shared__ float smem[]` names this (same translation unit, same
// anonymous namespace as the kernel).
namespace {
alignas(16) float smem[cuda_shim::kSmemFloats];
}

inline dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

inline void __syncthreads() {
  cuda_shim::Block& b = *cuda_shim::block;
  swapcontext(&b.ctx[b.current], &b.scheduler);
}

inline cudaError_t cudaGetDevice(int* dev) { *dev = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = int(cuda_shim::max_smem());
  return cudaSuccess;
}
template <class Kernel>
cudaError_t cudaFuncSetAttribute(Kernel, cudaFuncAttribute, int value) {
  if (size_t(value) > cuda_shim::max_smem()) return cudaErrorInvalidValue;
  cuda_shim::opted_in_smem = size_t(value);
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_shim::last_error;
  cuda_shim::last_error = cudaSuccess;
  return e;
}

// kernel<<<grid, block, smem, stream>>>(args...) is rewritten to this call by the test.
template <class Kernel, class... Args>
void lemon_shim_launch(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t, Args... args) {
  if (smem_bytes > cuda_shim::opted_in_smem || smem_bytes > sizeof(smem) || block.x > 1024) {
    cuda_shim::last_error = cudaErrorInvalidValue;
    return;
  }
  blockDim = block;
  gridDim = grid;
  cuda_shim::Block b;
  b.body = [&] { kernel(args...); };
  b.ctx.resize(block.x);
  // Stacks allocated once and never cleared (clearing 512 of them per launch cost seconds of page
  // faults); 64 KiB each is ample for the kernel.
  constexpr size_t kStack = 64 * 1024;
  static std::vector<char*> stacks;
  while (stacks.size() < block.x) stacks.push_back(new char[kStack]);
  b.stacks = stacks;
  cuda_shim::block = &b;
  for (unsigned blk = 0; blk < grid.x; ++blk) {
    blockIdx = dim3(blk);
    for (size_t k = 0; k < smem_bytes / sizeof(float); ++k) smem[k] = std::numeric_limits<float>::quiet_NaN();
    b.done.assign(block.x, 0);
    for (unsigned t = 0; t < block.x; ++t) {
      getcontext(&b.ctx[t]);
      b.ctx[t].uc_stack.ss_sp = b.stacks[t];
      b.ctx[t].uc_stack.ss_size = kStack;
      b.ctx[t].uc_link = &b.scheduler;
      makecontext(&b.ctx[t], &cuda_shim::fiber_entry, 0);
    }
    for (;;) {  // one round: every live thread runs to its next barrier or to its end
      unsigned finished = 0;
      for (unsigned t = 0; t < block.x; ++t) {
        if (b.done[t]) { ++finished; continue; }
        b.current = t;
        threadIdx = dim3(t);
        swapcontext(&b.scheduler, &b.ctx[t]);
        finished += b.done[t];
      }
      if (finished == block.x) break;
      if (finished != 0) {
        std::fprintf(stderr, "cuda_shim: block %u: %u of %u threads returned while others wait at __syncthreads\n",
                     blk, finished, block.x);
        std::abort();
      }
    }
  }
  cuda_shim::block = nullptr;
}
