// Scalar math of lemon_ext::expand shared by the C++ (CPU) and CUDA kernels, so the CPU tests
// exercise the very functions the GPU runs. Plain C++17, no torch headers (the .cu file that
// includes it must compile with nvcc alone). Definitions: lemon_ext/ops/reference.py (module
// doc) and lemon_ext/noise.py (Philox stream layout). Every float op here is one IEEE float32
// operation rounded to nearest: compile with -ffp-contract=off (host) and --fmad=false (nvcc).
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LEMON_HD __host__ __device__ __forceinline__
#else
#define LEMON_HD inline __attribute__((always_inline))
#endif

namespace lemon {

// Map sentinels and split modes: keep equal to lemon_ext/ops/reference.py.
constexpr int64_t kZero = -1, kMean = -2, kFree = -3;
enum SplitMode : int { kSplitNone = 0, kSplitLemon = 1, kSplitEqual = 2, kSplitProjection = 3,
                       kSplitCancel = 4, kSplitCancelEqual = 5 };
// Philox counter word c2 (lemon_ext/noise.py STREAM_*).
constexpr uint32_t kStreamSplit = 0, kStreamProjection = 64, kStreamCancel = 128, kStreamFree = 192;
constexpr int kMaxGroupSize = 32;
constexpr float kSqrt3 = 0x1.bb67aep+0f;         // float32(sqrt(3)), reference.SQRT3
constexpr float kUniformScale = 0x1.fffffep-32f;  // Triton's uint_to_uniform_float scale

// Where column c's value sits in a staged source row: its source column, cs (the zero slot: ZERO
// and FREE columns) or cs + 1 (the mean column). The CPU plan and the CUDA wrapper's column digest
// (with torch ops on the device) both stage rows this way.
LEMON_HD int32_t staged_slot(int64_t c, int64_t cs) { return int32_t(c >= 0 ? c : c == kMean ? cs + 1 : cs); }

// The CUDA kernel's per-column word: group size n | rank m << 8 | FREE << 16 | ZERO << 17.
LEMON_HD int32_t column_meta(int64_t c, int32_t n, int32_t m) {
  return (n & 0xFF) | ((m & 0xFF) << 8) | (c == kFree ? 1 << 16 : 0) | (c == kZero ? 1 << 17 : 0);
}

// Output encodings: the kernels store raw bits and only need to know the rounding.
enum OutKind : int { kOutF32 = 0, kOutBF16 = 1, kOutF16 = 2, kOutF64 = 3 };

LEMON_HD uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
LEMON_HD float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

// ---- Philox4x32-10, the counter layout of lemon_ext/noise.py -------------------------------
struct Words { uint32_t w[4]; };

LEMON_HD Words philox(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint64_t pb = uint64_t(0xCD9E8D57u) * c2;
    const uint64_t pa = uint64_t(0xD2511F53u) * c0;
    const uint32_t n0 = uint32_t(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = uint32_t(pa >> 32) ^ c3 ^ k1;
    c0 = n0; c1 = uint32_t(pb); c2 = n2; c3 = uint32_t(pa);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  Words r; r.w[0] = c0; r.w[1] = c1; r.w[2] = c2; r.w[3] = c3;
  return r;
}

// Triton's uint_to_uniform_float: int32 view, x < 0 -> -x - 1 (== ~x), float(x) * scale.
LEMON_HD float to_uniform(uint32_t w) {
  int32_t x = int32_t(w);
  x = x < 0 ? ~x : x;
  return float(x) * kUniformScale;
}

// (k0, k1) of noise.philox_key: k0 = seed & M, k1 = (key ^ (seed >> 32)) & M.
struct PhiloxKey { uint32_t k0, k1; };
LEMON_HD PhiloxKey philox_key(int64_t seed, int64_t key) {
  const uint64_t s = uint64_t(seed);
  return PhiloxKey{uint32_t(s), uint32_t(uint64_t(key) ^ (s >> 32))};
}

// One draw U(row, column, stream) (a fresh Philox call; the kernels share calls where they can).
LEMON_HD float draw(PhiloxKey k, uint64_t row, uint64_t col, uint32_t stream) {
  Words w = philox(uint32_t(col >> 2), uint32_t(row), stream, 0u, k.k0, k.k1);
  return to_uniform(w.w[col & 3]);
}

// ---- round-to-nearest-even casts, bit-equal to torch's float -> bf16 / fp16 ---------------
// NaN inputs: bf16 gives 0x7FC0 (c10 scalar path), fp16 gives sign|0x7E00. NaN payloads are not
// part of the bitwise contract (torch's own vectorised and scalar casts differ there).
// The float32 bits u rounded to nearest even at bf16 precision (the low 16 bits to be dropped).
LEMON_HD uint32_t bf16_rne_bits(uint32_t u) { return u + 0x7FFFu + ((u >> 16) & 1u); }

// Branch-free (a select, not an early return) so the CPU row loops that call it vectorise.
LEMON_HD uint16_t f32_to_bf16(float f) {
  const uint32_t u = f2u(f);
  const uint32_t rounded = bf16_rne_bits(u) >> 16;
  return uint16_t((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}
LEMON_HD float bf16_to_f32(uint16_t h) { return u2f(uint32_t(h) << 16); }

// F. Giesen's float_to_half_fast3_rtne (public domain): exact RNE incl. subnormals, overflow.
LEMON_HD uint16_t f32_to_f16(float f) {
  uint32_t u = f2u(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint32_t o;
  if (u >= (127u + 16u) << 23) {  // >= 65536: inf (or NaN)
    o = u > 0x7F800000u ? 0x7E00u : 0x7C00u;
  } else if (u < (113u << 23)) {  // result subnormal or zero: align with a magic add (RNE)
    const uint32_t magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    o = f2u(u2f(u) + u2f(magic)) - magic;
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += (uint32_t(15 - 127) << 23) + 0xFFFu;
    u += mant_odd;
    o = u >> 13;
  }
  return uint16_t(o | (sign >> 16));
}
LEMON_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0x1F) return u2f(sign | 0x7F800000u | (mant << 13));
  if (exp == 0) {  // subnormal: mant * 2^-24, exact in float32
    const float v = float(mant) * 0x1p-24f;
    return u2f(f2u(v) | sign);
  }
  return u2f(sign | ((exp + 112u) << 23) | (mant << 13));
}

// round_to(x, out_dtype) of the reference: the nearest out-dtype value, as float32.
template <int OUT>
LEMON_HD float round_out(float x) {
  if (OUT == kOutBF16) return bf16_to_f32(f32_to_bf16(x));
  if (OUT == kOutF16) return f16_to_f32(f32_to_f16(x));
  return x;
}

// round_out for an input known not to be NaN: the same bits without the NaN select (bf16:
// +-inf and overflow to inf come out of the rounding formula itself). The CPU fused row uses it
// when the staged source row and the column factors are all finite (then no value it rounds can
// be NaN: a split coefficient is in [1/2, 1]).
template <int OUT>
LEMON_HD float round_out_no_nan(float x) {
  if (OUT == kOutBF16) return u2f(bf16_rne_bits(f2u(x)) & 0xFFFF0000u);
  return round_out<OUT>(x);
}

// ---- split modes: the value of target column j (source column c, group size n, rank m) ------
// `U(stream)` returns the draw for (this row, c, stream). All inputs float32; see reference.py.

// One LEMON split step of a value x already in the output dtype, given its draw u: with
// s = u >= 1/2 ? e : 0, a = p + q (2u - (s + 1 - e)), first = round(a x), second = x - first
// (exact, Sterbenz: a in [1/2, 1]); keeps first when l != s. Even split (n_l == n_r): p = 1/2,
// q = 1/4, e = 1 (s is the swap); odd: p = n_l / cnt, q = p - 1/2, e = 0; l = 1 for the left
// part. p = 1, q = 0, e = 0, l = 1 gives x back (the CPU passes use it for untouched columns).
template <int OUT>
LEMON_HD float lemon_step(float u, float p, float q, float e, float l, float x) {
  const float s = u >= 0.5f ? e : 0.0f;
  const float a = p + q * (2.0f * u - (s + (1.0f - e)));
  const float first = round_out<OUT>(a * x);
  return (l != s) ? first : x - first;
}

template <int OUT, class Draws>
LEMON_HD float split_lemon(float v, int n, int m, const Draws& U) {
  float val = round_out<OUT>(v);
  int cnt = n, lo = 0, node = 0;
  while (cnt > 1) {
    const int nl = (cnt + 1) / 2, nr = cnt / 2;
    const float u = U(kStreamSplit + uint32_t(node));
    const float base = float(nl) / float(cnt);
    const bool even = nl == nr, left = m < lo + nl;
    val = lemon_step<OUT>(u, even ? 0.5f : base, even ? 0.25f : base - 0.5f, even ? 1.0f : 0.0f,
                          left ? 1.0f : 0.0f, val);
    lo = left ? lo : lo + nl;
    node = left ? 2 * node + 1 : 2 * node + 2;
    cnt = left ? nl : nr;
  }
  return val;
}

// Projection: v/n + noise_std * (r_m - mean_q r_q). Groups of size 0 (MEAN columns) get no noise.
template <class Draws>
LEMON_HD float split_projection(float v, int n, int m, float noise_std, const Draws& U) {
  const float nf = float(n > 1 ? n : 1);
  float total = 0.0f, mine = 0.0f;
  for (int q = 0; q < n; ++q) {
    const float r = (2.0f * U(kStreamProjection + uint32_t(q)) - 1.0f) * kSqrt3;
    total = total + r;
    mine = q == m ? r : mine;
  }
  return v / nf + noise_std * (mine - total / nf);
}

// One cancelling-pair step of x (already in the output dtype) with draw u:
// zero ? 0 : sign * round((p + q u) x), p = 1/2, q = 1/4 (or 0 for the "equal" variant).
template <int OUT>
LEMON_HD float cancel_step(float u, float p, float q, float sign, float zero, float x) {
  const float e = round_out<OUT>((p + q * u) * x);
  return zero != 0.0f ? 0.0f : (sign < 0.0f ? -e : e);
}

// Cancel: pairs (2p, 2p+1) get +e, -e; unpaired parts (last of an odd group, groups of size
// 0 or 1) get 0.
template <int OUT, class Draws>
LEMON_HD float split_cancel(float v, int n, int m, bool equal, const Draws& U) {
  if (n <= 1 || (m == n - 1 && (n & 1))) return 0.0f;
  const float u = equal ? 0.0f : U(kStreamCancel + uint32_t(m / 2));
  return cancel_step<OUT>(u, 0.5f, equal ? 0.0f : 0.25f, (m & 1) ? -1.0f : 1.0f, 0.0f, round_out<OUT>(v));
}

template <int OUT, class Draws>
LEMON_HD float split_value(int split, float v, int n, int m, float noise_std, const Draws& U) {
  switch (split) {
    case kSplitLemon: return split_lemon<OUT>(v, n, m, U);
    case kSplitEqual: return v / float(n > 1 ? n : 1);
    case kSplitProjection: return split_projection(v, n, m, noise_std, U);
    case kSplitCancel: return split_cancel<OUT>(v, n, m, false, U);
    case kSplitCancelEqual: return split_cancel<OUT>(v, n, m, true, U);
    default: return v;
  }
}

// FREE column value: noise_std * ((2u - 1) * sqrt3), or +0 when noise_std == 0.
LEMON_HD float free_value(float u, float noise_std) {
  return noise_std == 0.0f ? 0.0f : noise_std * ((2.0f * u - 1.0f) * kSqrt3);
}

// ---- which Philox streams a split mode reads, for staging draws per source column ----------
// Streams are stream_base + t for t < num_stream_slots(split, max group size). For LEMON the
// slots are tree nodes: every internal node index (heap numbering) of a tree for any count
// <= max_n lies below the bound returned (max_n = 2 -> 1 slot, 3 -> 2, 4 -> 3, 8 -> 7).
inline int lemon_node_bound(int cnt, int node) {  // host only (recursive)
  if (cnt <= 1) return 0;
  const int nl = (cnt + 1) / 2, nr = cnt / 2;
  const int a = lemon_node_bound(nl, 2 * node + 1), b = lemon_node_bound(nr, 2 * node + 2);
  const int m = a > b ? a : b;
  return m > node + 1 ? m : node + 1;
}
inline int num_stream_slots(int split, int max_n) {
  switch (split) {
    case kSplitLemon: {
      int bound = 0;
      for (int n = 2; n <= max_n; ++n) { const int b = lemon_node_bound(n, 0); bound = b > bound ? b : bound; }
      return bound;
    }
    case kSplitProjection: return max_n;
    case kSplitCancel: return max_n / 2;
    default: return 0;
  }
}
inline uint32_t stream_base(int split) {
  return split == kSplitProjection ? kStreamProjection : split == kSplitCancel ? kStreamCancel : kStreamSplit;
}

}  // namespace lemon
