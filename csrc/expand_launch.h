// Plain-C launch interface of the CUDA kernel of lemon_ext::expand: the .cu file that implements
// it includes no torch headers, so `nvcc -c` checks it in seconds (tests/test_ops_cuda_compile.py).
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// All pointers are device pointers; optional ones are NULL when absent. Maps are pre-digested by
// the torch wrapper (csrc/cuda/expand_cuda.cpp) into two int32 words per target column.
typedef struct LemonExpandLaunch {
  const void* src;        // (R_S, C_S) source, element strides s0, s1; src_kind: 0 f32, 1 bf16, 2 f16
  int src_kind;
  int64_t rs, cs, s0, s1;
  const int64_t* row_map;  // (R_T,) source row, -1 ZERO, -2 MEAN
  const int32_t* cidx;     // (C_T,) staged-row slot: c >= 0, cs (ZERO/FREE), cs + 1 (MEAN)
  const int32_t* meta;     // (C_T,) group size | group pos << 8 | FREE << 16 | ZERO << 17
  const float* row_factor; // (R_T,) or NULL
  const float* col_factor; // (C_T,) or NULL
  const float* row_mean;   // (C_S,) or NULL
  const float* col_mean;   // (R_S,) or NULL
  int64_t rt, ct;
  int split, max_n;        // split mode, largest group size
  float noise_std;
  uint32_t k0, k1;         // Philox key (lemon_ext.noise.philox_key)
  int64_t row_offset, col_offset;
  int out_kind;            // 0 f32, 1 bf16, 2 f16
  void* out;               // (R_T, C_T) contiguous
} LemonExpandLaunch;

// Launches on `stream` (a cudaStream_t); returns a cudaError_t (0 = success).
int lemon_expand_cuda_launch(const LemonExpandLaunch* args, void* stream);

#ifdef __cplusplus
}
#endif
