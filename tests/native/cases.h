// Fixed inputs for the native test harnesses (isa_variants.cpp, cuda_emulated.cpp) and a hash of
// their outputs; tests/test_ops_native.py rebuilds the same inputs in Python, runs the PyTorch
// reference on them and compares hashes. No torch, no C++ library randomness.
#pragma once
#include <cstdint>
#include <cstdio>
#include <map>
#include <vector>

#include "expand_math.h"

namespace lemon_test {

using namespace lemon;

struct Lcg {
  uint64_t s;
  uint32_t next() { s = s * 6364136223846793005ull + 1442695040888963407ull; return uint32_t(s >> 33); }
  float uniform() { return float(next() >> 8) * 0x1p-24f; }
};

inline uint64_t fnv1a(const void* p, size_t n) {
  uint64_t h = 1469598103934665603ull;
  const auto* b = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

// One case: a (RS, CS) source in float32, bf16 or fp16 (by case: (split + out) % 3) whose rows are
// kPad columns longer than CS (the padding holds 1e30: a read past a row shows), row map with a
// ZERO and a MEAN row, row/column factors and
// means, a circular or random column map (random: with ZERO / FREE / MEAN columns), the group
// layout of lemon_ext.ops.reference.group_layout (sentinels: size 0, rank 0).
struct Case {
  const char* kind; int split, out;
  int64_t rs, cs, rt, ct;
  const void* src; int src_kind; int64_t s0;  // src_kind: 0 f32, 1 bf16, 2 f16 (kSrc* of the row loop)
  const std::vector<float>* rf; const std::vector<float>* cf;
  const std::vector<float>* rmean; const std::vector<float>* cmean;
  const std::vector<int64_t>* rm; const std::vector<int64_t>* cm;
  const std::vector<int32_t>* gs; const std::vector<int32_t>* gp;
  int max_n;
  float noise_std; int64_t seed, key, row_offset, col_offset;
};

// Calls run(c) for every map kind x split mode x output kind, in a fixed order, and prints
// "<kind> split=<s> out=<o> <hash>" with the hash of the bytes run(c) returns. ct columns
// (301: SIMD blocks, runs and gathered stretches in one row; a multiple of 8 takes the CUDA
// kernel's 16-byte stores).
constexpr int64_t kPad = 5;

template <class Run>
void for_each_case(int64_t ct, Run run) {
  const int64_t rs = 23, cs = 150, rt = 41, s0 = cs + kPad;
  Lcg g{12345};
  std::vector<float> src(rs * cs), rf(rt), cf(ct), rmean(cs), cmean(rs);
  for (auto& x : src) x = (g.uniform() - 0.5f) * 4.0f;
  std::vector<float> src_f32(rs * s0, 1e30f);
  std::vector<uint16_t> src_bf16(rs * s0, f32_to_bf16(1e30f)), src_f16(rs * s0, f32_to_f16(65504.0f));
  for (int64_t r = 0; r < rs; ++r)
    for (int64_t k = 0; k < cs; ++k) {
      const float x = src[r * cs + k];
      src_f32[r * s0 + k] = x;
      src_bf16[r * s0 + k] = f32_to_bf16(x);
      src_f16[r * s0 + k] = f32_to_f16(x);
    }
  const void* sources[3] = {src_f32.data(), src_bf16.data(), src_f16.data()};
  for (auto& x : rf) x = 0.5f + g.uniform();
  for (auto& x : cf) x = 0.5f + g.uniform();
  for (auto& x : rmean) x = g.uniform() - 0.5f;
  for (auto& x : cmean) x = g.uniform() - 0.5f;
  std::vector<int64_t> rm(rt);
  for (int64_t i = 0; i < rt; ++i) rm[i] = i == 7 ? kZero : i == 11 ? kMean : i % rs;
  const int splits[] = {kSplitNone, kSplitLemon, kSplitEqual, kSplitProjection, kSplitCancel, kSplitCancelEqual};
  for (int random = 0; random < 2; ++random) {
    std::vector<int64_t> cm(ct);
    for (int64_t j = 0; j < ct; ++j) cm[j] = j < cs || !random ? j % cs : int64_t(g.next() % cs);
    if (random) { cm[200] = kZero; cm[201] = kFree; cm[250] = kMean; cm[251] = kFree; }
    std::map<int64_t, int> count;
    std::vector<int32_t> gs(ct), gp(ct);
    for (int64_t j = 0; j < ct; ++j) gp[j] = cm[j] >= 0 ? count[cm[j]]++ : 0;
    int max_n = 0;
    for (int64_t j = 0; j < ct; ++j) {
      gs[j] = cm[j] >= 0 ? count[cm[j]] : 0;
      max_n = gs[j] > max_n ? gs[j] : max_n;
    }
    for (int split : splits) {
      for (int out = kOutF32; out <= kOutF16; ++out) {
        const int src_kind = (split + out) % 3;
        const Case c{random ? "random" : "circular", split, out, rs, cs, rt, ct, sources[src_kind], src_kind, s0,
                     &rf, &cf, &rmean, &cmean, &rm, &cm, &gs, &gp, max_n, 0.02f, 1234, 5678, 4294967280LL, 3};
        const std::vector<char> bytes = run(c);
        std::printf("%s split=%d out=%d %016llx\n", c.kind, split, out,
                    static_cast<unsigned long long>(fnv1a(bytes.data(), bytes.size())));
      }
    }
  }
}

inline size_t out_bytes(const Case& c) { return size_t(c.rt * c.ct) * (c.out == kOutF32 ? 4 : 2); }

}  // namespace lemon_test
