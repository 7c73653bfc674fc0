// Philox4x32-10 draws for a list of source-column quads of one row, vectorised across quads.
//
// philox_quads(quads, n, row, stream, key, dst, base) writes dst[4 (q - base) + l] = U(row, 4 q + l, stream) for
// every quad q in quads[0, n) (the counter layout of lemon_ext/noise.py: c = (q, row, stream, 0),
// word l). n must be a multiple of kPhiloxBlock: callers pad their lists by repeating the last
// quad (a repeated quad is written twice with the same value). A list, not a range: deep LEMON
// nodes of random maps need scattered quads (1024 -> 2048 random: 519 needed per row, 944 if
// computed as 16-quad ranges).
//
// Why intrinsics: GCC turns the 32x32 -> 64-bit Philox multiplies into vpmullq plus permutes;
// measured on the dev VM (AMD EPYC, AVX-512, a slow vCPU: 52 ns per scalar call) 22 ns per call
// auto-vectorised against ~8 ns here (vpmuludq on even and odd lanes, vpmulld for the low words). The AVX-512 and AVX2
// paths are picked at run time; the scalar path is lemon::philox itself. All three give the same
// bits (integer math; the uint -> float step is one exactly-rounded convert and one multiply).
#pragma once
#include <cstdint>
#include <cstdlib>
#include <string>

#include "expand_math.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define LEMON_X86_SIMD 1
#endif

namespace lemon {

constexpr int64_t kPhiloxBlock = 16;

inline void philox_quads_scalar(const int32_t* quads, int64_t n, uint32_t row, uint32_t stream, PhiloxKey key,
                                float* dst, int64_t base = 0) {
  for (int64_t k = 0; k < n; ++k) {
    const int64_t q = quads[k];
    const Words w = philox(uint32_t(q), row, stream, 0u, key.k0, key.k1);
    for (int l = 0; l < 4; ++l) dst[4 * (q - base) + l] = to_uniform(w.w[l]);
  }
}

#ifdef LEMON_X86_SIMD
__attribute__((target("avx512f"))) inline __m512i mulhi_u32_512(__m512i a, __m512i m) {
  const __m512i even = _mm512_srli_epi64(_mm512_mul_epu32(a, m), 32);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  return _mm512_mask_blend_epi32(__mmask16(0xAAAA), even, odd);
}

__attribute__((target("avx512f"))) inline __m512 uniform_512(__m512i w) {
  const __m512i x = _mm512_xor_si512(w, _mm512_srai_epi32(w, 31));  // x < 0 ? ~x : x
  return _mm512_mul_ps(_mm512_cvtepi32_ps(x), _mm512_set1_ps(kUniformScale));
}

// NB independent blocks of 16 quads in flight: one block is latency-bound (measured 11.2 ns per
// quad on the dev VM), four keep the multipliers busy (~8 ns; the scalar path takes ~52 ns).
template <int NB>
__attribute__((target("avx512f"))) inline void philox_blocks_avx512(const int32_t* quads, uint32_t row,
                                                                   uint32_t stream, PhiloxKey key, float* dst,
                                                                   int64_t base) {
  const __m512i m0 = _mm512_set1_epi32(int32_t(0xD2511F53u)), m1 = _mm512_set1_epi32(int32_t(0xCD9E8D57u));
  __m512i c0[NB], c1[NB], c2[NB], c3[NB];
  // Rounds 0 and 1 peeled: only the quad index differs between lanes, so round 0's product of c2
  // (the stream) and round 1's product of c0 (stream product ^ row ^ k0) are the same in every
  // lane: two scalar multiplies instead of two of the 20 vector ones (same bits: integer math).
  uint32_t k0 = key.k0, k1 = key.k1;
  const uint64_t pb0 = uint64_t(0xCD9E8D57u) * stream;  // round 0: c2 = stream, c1 = row, c3 = 0
  const uint32_t c0_r1 = uint32_t(pb0 >> 32) ^ row ^ k0, c1_r1 = uint32_t(pb0);
  const uint64_t pa1 = uint64_t(0xD2511F53u) * c0_r1;    // round 1's c0 product
  const __m512i kk1_r0 = _mm512_set1_epi32(int32_t(k1));
  const __m512i kk0_r1 = _mm512_set1_epi32(int32_t(k0 + 0x9E3779B9u)), kk1_r1 = _mm512_set1_epi32(int32_t(k1 + 0xBB67AE85u));
  for (int b = 0; b < NB; ++b) {
    const __m512i q = _mm512_loadu_si512(quads + 16 * b);
    // round 0: c0 <- hi(M1 stream) ^ row ^ k0 (scalar), c1 <- lo(M1 stream), c2 <- hi(M0 q) ^ 0 ^ k1, c3 <- lo(M0 q)
    const __m512i ha = mulhi_u32_512(q, m0), la = _mm512_mullo_epi32(q, m0);
    const __m512i r0_c2 = _mm512_xor_si512(ha, kk1_r0), r0_c3 = la;
    // round 1: c0 <- hi(M1 c2) ^ c1 ^ k0', c1 <- lo(M1 c2), c2 <- hi(M0 c0) ^ c3 ^ k1', c3 <- lo(M0 c0)
    const __m512i hb = mulhi_u32_512(r0_c2, m1), lb = _mm512_mullo_epi32(r0_c2, m1);
    c0[b] = _mm512_ternarylogic_epi32(hb, _mm512_set1_epi32(int32_t(c1_r1)), kk0_r1, 0x96);
    c1[b] = lb;
    c2[b] = _mm512_ternarylogic_epi32(_mm512_set1_epi32(int32_t(pa1 >> 32)), r0_c3, kk1_r1, 0x96);
    c3[b] = _mm512_set1_epi32(int32_t(uint32_t(pa1)));
  }
  k0 += 2 * 0x9E3779B9u;
  k1 += 2 * 0xBB67AE85u;
  for (int round = 2; round < 10; ++round) {
    const __m512i kk0 = _mm512_set1_epi32(int32_t(k0)), kk1 = _mm512_set1_epi32(int32_t(k1));
    for (int b = 0; b < NB; ++b) {
      const __m512i hb = mulhi_u32_512(c2[b], m1), lb = _mm512_mullo_epi32(c2[b], m1);
      const __m512i ha = mulhi_u32_512(c0[b], m0), la = _mm512_mullo_epi32(c0[b], m0);
      c0[b] = _mm512_ternarylogic_epi32(hb, c1[b], kk0, 0x96);  // hb ^ c1 ^ k0
      c2[b] = _mm512_ternarylogic_epi32(ha, c3[b], kk1, 0x96);
      c1[b] = lb;
      c3[b] = la;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int b = 0; b < NB; ++b) {
    // (w0, w1, w2, w3) per quad -> 16 x (4 consecutive floats): 4x4 transposes per 128-bit lane.
    const __m512 w0 = uniform_512(c0[b]), w1 = uniform_512(c1[b]), w2 = uniform_512(c2[b]), w3 = uniform_512(c3[b]);
    const __m512 t0 = _mm512_unpacklo_ps(w0, w1), t1 = _mm512_unpackhi_ps(w0, w1);
    const __m512 t2 = _mm512_unpacklo_ps(w2, w3), t3 = _mm512_unpackhi_ps(w2, w3);
    const __m512 r0 = _mm512_shuffle_ps(t0, t2, 0x44), r1 = _mm512_shuffle_ps(t0, t2, 0xEE);
    const __m512 r2 = _mm512_shuffle_ps(t1, t3, 0x44), r3 = _mm512_shuffle_ps(t1, t3, 0xEE);
    // quad quads[16 b + 4 L + s] sits in 128-bit lane L of r_s
    const int32_t* qb = quads + 16 * b;
#define LEMON_STORE_LANE(L)                                                      \
    _mm_storeu_ps(dst + 4 * (int64_t(qb[4 * L + 0]) - base), _mm512_extractf32x4_ps(r0, L)); \
    _mm_storeu_ps(dst + 4 * (int64_t(qb[4 * L + 1]) - base), _mm512_extractf32x4_ps(r1, L)); \
    _mm_storeu_ps(dst + 4 * (int64_t(qb[4 * L + 2]) - base), _mm512_extractf32x4_ps(r2, L)); \
    _mm_storeu_ps(dst + 4 * (int64_t(qb[4 * L + 3]) - base), _mm512_extractf32x4_ps(r3, L));
    LEMON_STORE_LANE(0) LEMON_STORE_LANE(1) LEMON_STORE_LANE(2) LEMON_STORE_LANE(3)
#undef LEMON_STORE_LANE
  }
}

__attribute__((target("avx512f"))) inline void philox_quads_avx512(const int32_t* quads, int64_t n, uint32_t row,
                                                                  uint32_t stream, PhiloxKey key, float* dst,
                                                                  int64_t base = 0) {
  int64_t k = 0;
  for (; k + 64 <= n; k += 64) philox_blocks_avx512<4>(quads + k, row, stream, key, dst, base);
  for (; k < n; k += 16) philox_blocks_avx512<1>(quads + k, row, stream, key, dst, base);
}

__attribute__((target("avx2"))) inline __m256i mulhi_u32_256(__m256i a, __m256i m) {
  const __m256i even = _mm256_srli_epi64(_mm256_mul_epu32(a, m), 32);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  return _mm256_blend_epi32(even, odd, 0xAA);
}

__attribute__((target("avx2"))) inline __m256 uniform_256(__m256i w) {
  const __m256i x = _mm256_xor_si256(w, _mm256_srai_epi32(w, 31));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(kUniformScale));
}

__attribute__((target("avx2"))) inline void philox_quads_avx2(const int32_t* quads, int64_t n, uint32_t row,
                                                             uint32_t stream, PhiloxKey key, float* dst,
                                                             int64_t base = 0) {
  const __m256i m0 = _mm256_set1_epi32(int32_t(0xD2511F53u)), m1 = _mm256_set1_epi32(int32_t(0xCD9E8D57u));
  for (int64_t k = 0; k < n; k += 8) {
    __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quads + k));
    __m256i c1 = _mm256_set1_epi32(int32_t(row)), c2 = _mm256_set1_epi32(int32_t(stream));
    __m256i c3 = _mm256_setzero_si256();
    uint32_t k0 = key.k0, k1 = key.k1;
    for (int round = 0; round < 10; ++round) {
      const __m256i hb = mulhi_u32_256(c2, m1), lb = _mm256_mullo_epi32(c2, m1);
      const __m256i ha = mulhi_u32_256(c0, m0), la = _mm256_mullo_epi32(c0, m0);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hb, c1), _mm256_set1_epi32(int32_t(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(ha, c3), _mm256_set1_epi32(int32_t(k1)));
      c1 = lb;
      c3 = la;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const __m256 w0 = uniform_256(c0), w1 = uniform_256(c1), w2 = uniform_256(c2), w3 = uniform_256(c3);
    const __m256 t0 = _mm256_unpacklo_ps(w0, w1), t1 = _mm256_unpackhi_ps(w0, w1);
    const __m256 t2 = _mm256_unpacklo_ps(w2, w3), t3 = _mm256_unpackhi_ps(w2, w3);
    const __m256 r[4] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xEE),
                         _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xEE)};
    const int32_t* qb = quads + k;  // quad qb[4 L + i] sits in 128-bit lane L of r[i]
    for (int i = 0; i < 4; ++i) {
      _mm_storeu_ps(dst + 4 * (int64_t(qb[i]) - base), _mm256_castps256_ps128(r[i]));
      _mm_storeu_ps(dst + 4 * (int64_t(qb[4 + i]) - base), _mm256_extractf128_ps(r[i], 1));
    }
  }
}
#endif

using PhiloxQuadsFn = void (*)(const int32_t*, int64_t, uint32_t, uint32_t, PhiloxKey, float*, int64_t);

// The widest path this CPU runs, decided once. LEMON_EXT_PHILOX=avx2 or =scalar picks a narrower
// one (the tests run every path on an AVX-512 machine that way; an unsupported choice is ignored).
inline PhiloxQuadsFn philox_quads_best() {
#ifdef LEMON_X86_SIMD
  static const PhiloxQuadsFn fn = []() -> PhiloxQuadsFn {
    const char* env = std::getenv("LEMON_EXT_PHILOX");
    const std::string want = env ? env : "";
    if (want == "scalar") return &philox_quads_scalar;
    if (want != "avx2" && __builtin_cpu_supports("avx512f")) return &philox_quads_avx512;
    if (__builtin_cpu_supports("avx2")) return &philox_quads_avx2;
    return &philox_quads_scalar;
  }();
  return fn;
#else
  return &philox_quads_scalar;
#endif
}

}  // namespace lemon
