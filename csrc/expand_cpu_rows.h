// Row loop of the C++ CPU kernel of lemon_ext::expand (no torch headers: see expand_cpu.cpp).
//
// Per target row i: stage the source row once in float32 (times row_factor[i]), compute the
// Philox draws it needs once per (source-column quad, stream) into a small table (4 words per
// call, all kept), then walk the target columns gathering from both. The plan (which staged
// slot and which draws each target column reads) depends only on the column map, so it is
// built once per call (CpuPlan) and shared by every row and thread.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "expand_math.h"

namespace lemon {

enum SrcKind : int { kSrcF32 = 0, kSrcBF16 = 1, kSrcF16 = 2, kSrcF64 = 3 };

// Raw view of the (validated) inputs. Optional tensors are nullptr when absent.
struct CpuArgs {
  const void* src; int src_kind; int64_t rs, cs, s0, s1;  // source (R_S, C_S), element strides
  const int64_t* row_map; const float* row_factor; const float* row_mean; const float* col_mean;
  const float* col_factor;
  int64_t rt, ct;                  // target (R_T, C_T)
  int split; float noise_std; PhiloxKey key; int64_t row_offset, col_offset;
  void* out;                       // (R_T, C_T) contiguous, out kind given by the template
};

// Row-independent part, built once per call from col_map / group_size / group_pos.
struct CpuPlan {
  std::vector<int32_t> cidx;  // (C_T,) staged-row slot: c, cs (ZERO/FREE: 0), cs + 1 (MEAN)
  std::vector<int32_t> ucol;  // (C_T,) source column of the draws column j reads (MEAN -> 0)
  std::vector<int32_t> gsize, gpos;           // (C_T,) group size n and rank m
  std::vector<int64_t> zero_cols, free_cols;  // target columns overwritten after the row loop
  int slots = 0;               // streams staged: stream_base(split) + t, t < slots
  uint32_t base = 0;
  int64_t quads = 0;           // source-column quads; table row stride is 4 * quads
  std::vector<std::vector<int32_t>> slot_quads;  // per slot, the quads some column reads
  // LEMON tree, level by level (the path of column j depends on n and m only): per level d,
  // lv_off[d][j] = table offset of the draw, lv_base[d][j] = n_l / cnt, lv_flags[d][j] = active
  // | even << 1 | left << 2. Level passes are branch-free loops over j, so they vectorise;
  // walking each column's tree instead mispredicts the random swaps (measured 4x slower).
  int depth = 0;
  std::vector<std::vector<int32_t>> lv_off;
  std::vector<std::vector<float>> lv_base;
  std::vector<std::vector<uint8_t>> lv_flags;
};

// Streams column (n, m) reads, as slot indices (row-independent: the LEMON path depends on
// n and m only; the swaps depend on the draws, the path does not).
inline void slots_read(int split, int n, int m, std::vector<int>& out) {
  out.clear();
  if (split == kSplitLemon) {
    int cnt = n, lo = 0, node = 0;
    while (cnt > 1) {
      out.push_back(node);
      const int nl = (cnt + 1) / 2;
      const bool left = m < lo + nl;
      lo = left ? lo : lo + nl;
      node = left ? 2 * node + 1 : 2 * node + 2;
      cnt = left ? nl : cnt / 2;
    }
  } else if (split == kSplitProjection) {
    for (int q = 0; q < n; ++q) out.push_back(q);
  } else if (split == kSplitCancel) {
    if (!(n <= 1 || (m == n - 1 && (n & 1)))) out.push_back(m / 2);
  }
}

inline CpuPlan make_plan(const int64_t* col_map, const int32_t* gsize, const int32_t* gpos,
                         int64_t ct, int64_t cs, int split, int max_n) {
  CpuPlan p;
  p.cidx.resize(ct); p.ucol.resize(ct); p.gsize.assign(gsize, gsize + ct); p.gpos.assign(gpos, gpos + ct);
  p.slots = num_stream_slots(split, max_n);
  p.base = stream_base(split);
  p.quads = (cs + 3) / 4;
  std::vector<std::vector<char>> need(p.slots, std::vector<char>(p.quads, 0));
  std::vector<int> s;
  for (int64_t j = 0; j < ct; ++j) {
    const int64_t c = col_map[j];
    p.cidx[j] = int32_t(c >= 0 ? c : c == kMean ? cs + 1 : cs);
    p.ucol[j] = int32_t(c >= 0 ? c : 0);
    if (c == kZero) p.zero_cols.push_back(j);
    if (c == kFree) p.free_cols.push_back(j);
    if (c == kZero || c == kFree || p.slots == 0 || cs == 0) continue;
    slots_read(split, gsize[j], gpos[j], s);
    for (int t : s) need[t][p.ucol[j] >> 2] = 1;
  }
  if (split == kSplitLemon) {
    for (int n = 2; n <= max_n; ++n) { int d = 0; for (int c = n; c > 1; c = (c + 1) / 2) ++d; p.depth = std::max(p.depth, d); }
    p.lv_off.assign(p.depth, std::vector<int32_t>(ct, 0));
    p.lv_base.assign(p.depth, std::vector<float>(ct, 0.0f));
    p.lv_flags.assign(p.depth, std::vector<uint8_t>(ct, 0));
    for (int64_t j = 0; j < ct; ++j) {
      if (col_map[j] == kZero || col_map[j] == kFree) continue;
      int cnt = gsize[j], lo = 0, node = 0, d = 0;
      const int m = gpos[j];
      while (cnt > 1) {
        const int nl = (cnt + 1) / 2, nr = cnt / 2;
        const bool left = m < lo + nl;
        p.lv_off[d][j] = int32_t(node * 4 * p.quads + p.ucol[j]);
        p.lv_base[d][j] = float(nl) / float(cnt);
        p.lv_flags[d][j] = uint8_t(1 | (nl == nr ? 2 : 0) | (left ? 4 : 0));
        lo = left ? lo : lo + nl;
        node = left ? 2 * node + 1 : 2 * node + 2;
        cnt = left ? nl : nr;
        ++d;
      }
    }
  }
  p.slot_quads.resize(p.slots);
  for (int t = 0; t < p.slots; ++t)
    for (int64_t q = 0; q < p.quads; ++q)
      if (need[t][q]) p.slot_quads[t].push_back(int32_t(q));
  return p;
}

template <int OUT> struct OutT { using type = uint16_t; };
template <> struct OutT<kOutF32> { using type = float; };
template <> struct OutT<kOutF64> { using type = double; };

template <int OUT>
inline typename OutT<OUT>::type encode(float x) {
  if constexpr (OUT == kOutBF16) return f32_to_bf16(x);
  else if constexpr (OUT == kOutF16) return f32_to_f16(x);
  else return typename OutT<OUT>::type(x);
}

// srow[k] = float(S'[r, k]) (* rf), k < cs + 2 (cs: the zero slot, cs + 1: the mean column).
template <class T, class Load>
inline void stage_typed(const CpuArgs& a, int64_t r, bool has_rf, float rf, float* srow, Load load) {
  const T* base = static_cast<const T*>(a.src) + r * a.s0;
  if (has_rf) for (int64_t k = 0; k < a.cs; ++k) srow[k] = load(base[k * a.s1]) * rf;
  else for (int64_t k = 0; k < a.cs; ++k) srow[k] = load(base[k * a.s1]);
}

inline void stage_row(const CpuArgs& a, int64_t r, bool has_rf, float rf, float* srow) {
  if (r >= 0) {
    switch (a.src_kind) {
      case kSrcF32: stage_typed<float>(a, r, has_rf, rf, srow, [](float x) { return x; }); break;
      case kSrcF64: stage_typed<double>(a, r, has_rf, rf, srow, [](double x) { return float(x); }); break;
      case kSrcBF16: stage_typed<uint16_t>(a, r, has_rf, rf, srow, [](uint16_t x) { return bf16_to_f32(x); }); break;
      default: stage_typed<uint16_t>(a, r, has_rf, rf, srow, [](uint16_t x) { return f16_to_f32(x); }); break;
    }
  } else {  // MEAN row (without row_mean: the reference's zero row)
    for (int64_t k = 0; k < a.cs; ++k) {
      const float x = a.row_mean ? a.row_mean[k] : 0.0f;
      srow[k] = has_rf ? x * rf : x;
    }
  }
  const float zero = 0.0f, mean = (r >= 0 && a.col_mean) ? a.col_mean[r] : 0.0f;
  srow[a.cs] = has_rf ? zero * rf : zero;
  srow[a.cs + 1] = has_rf ? mean * rf : mean;
}

struct TableDraws {
  const float* tbl; int64_t stride; uint32_t base; int32_t col;
  float operator()(uint32_t stream) const { return tbl[int64_t(stream - base) * stride + col]; }
};

// Row passes: branch-free loops over the target columns, compiled for AVX-512, AVX2 and the
// baseline ISA and picked at load time (GCC target_clones), so the wheel still runs on any
// x86-64. No FMA in any clone: -ffp-contract=off, and no clone enables "fma".
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LEMON_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define LEMON_CLONES
#endif

// val[j] = S'[r, col_map[j]] (* rf) (* cf[j]), float32.
LEMON_CLONES void gather_row(const float* __restrict sv, const int32_t* __restrict cidx,
                             const float* __restrict cf, float* __restrict val, int64_t n) {
  if (cf) for (int64_t j = 0; j < n; ++j) val[j] = sv[cidx[j]] * cf[j];
  else for (int64_t j = 0; j < n; ++j) val[j] = sv[cidx[j]];
}

template <int OUT>
LEMON_HD void round_t(float* __restrict val, int64_t n) {
  for (int64_t j = 0; j < n; ++j) val[j] = round_out<OUT>(val[j]);
}
LEMON_CLONES void round_row(float* __restrict val, int64_t n, int out) {
  if (out == kOutBF16) round_t<kOutBF16>(val, n);
  else if (out == kOutF16) round_t<kOutF16>(val, n);
}

// One level of the LEMON tree for every column (split_lemon's loop body, as selects).
template <int OUT>
LEMON_HD void lemon_level_t(const float* __restrict tbl, const int32_t* __restrict off,
                            const float* __restrict base, const uint8_t* __restrict flags,
                            float* __restrict val, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float u = tbl[off[j]];
    const int f = flags[j];
    const bool even = f & 2, left = f & 4;
    const bool swap = even && u >= 0.5f;
    const float a_even = 0.5f + 0.25f * (2.0f * u - (swap ? 1.0f : 0.0f));
    const float b = base[j];
    const float a_odd = b + (b - 0.5f) * (2.0f * u - 1.0f);
    const float x = val[j];
    const float first = round_out<OUT>((even ? a_even : a_odd) * x);
    const float second = x - first;
    const float nv = (left != swap) ? first : second;
    val[j] = (f & 1) ? nv : x;
  }
}
LEMON_CLONES void lemon_level(const float* tbl, const int32_t* off, const float* base,
                              const uint8_t* flags, float* val, int64_t n, int out) {
  if (out == kOutBF16) lemon_level_t<kOutBF16>(tbl, off, base, flags, val, n);
  else if (out == kOutF16) lemon_level_t<kOutF16>(tbl, off, base, flags, val, n);
  else lemon_level_t<kOutF32>(tbl, off, base, flags, val, n);
}

template <int OUT>
LEMON_HD void encode_t(const float* __restrict val, void* out, int64_t n) {
  auto* o = static_cast<typename OutT<OUT>::type*>(out);
  for (int64_t j = 0; j < n; ++j) o[j] = encode<OUT>(val[j]);
}
LEMON_CLONES void encode_row(const float* val, void* out, int64_t n, int kind) {
  if (kind == kOutBF16) encode_t<kOutBF16>(val, out, n);
  else if (kind == kOutF16) encode_t<kOutF16>(val, out, n);
  else encode_t<kOutF32>(val, out, n);
}

// dst[4q + l] = U(row, 4q + l, stream) for the listed quads: one Philox call per quad. Blocks of
// 64 quads in structure-of-arrays form so the 10 rounds vectorise (32x32->64 multiplies).
LEMON_CLONES void philox_quads(const int32_t* __restrict quads, int64_t nq, uint32_t row,
                               uint32_t stream, PhiloxKey key, float* __restrict dst) {
  constexpr int B = 64;
  float u[4][B];
  for (int64_t k0 = 0; k0 < nq; k0 += B) {
    const int nb = int(nq - k0 < B ? nq - k0 : B);
    for (int k = 0; k < nb; ++k) {
      const Words w = philox(uint32_t(quads[k0 + k]), row, stream, 0u, key.k0, key.k1);
      u[0][k] = to_uniform(w.w[0]); u[1][k] = to_uniform(w.w[1]);
      u[2][k] = to_uniform(w.w[2]); u[3][k] = to_uniform(w.w[3]);
    }
    for (int k = 0; k < nb; ++k) {
      float* d = dst + 4 * int64_t(quads[k0 + k]);
      d[0] = u[0][k]; d[1] = u[1][k]; d[2] = u[2][k]; d[3] = u[3][k];
    }
  }
}

// Target rows [begin, end). MODE 0: no split, 1: LEMON, 2: any split (scalar, runtime switch).
template <int OUT, int MODE>
void expand_rows(const CpuArgs& a, const CpuPlan& p, int64_t begin, int64_t end) {
  using O = typename OutT<OUT>::type;
  std::vector<float> srow(a.cs + 2), val(a.ct);
  std::vector<float> tbl(size_t(p.slots) * p.quads * 4);
  const int64_t stride = p.quads * 4;
  for (int64_t i = begin; i < end; ++i) {
    O* __restrict out = static_cast<O*>(a.out) + i * a.ct;
    const int64_t r = a.row_map[i];
    if (r == kZero) { std::fill(out, out + a.ct, encode<OUT>(0.0f)); continue; }
    const bool has_rf = a.row_factor != nullptr;
    stage_row(a, r, has_rf, has_rf ? a.row_factor[i] : 1.0f, srow.data());
    const uint32_t row = uint32_t(uint64_t(i + a.row_offset));
    for (int t = 0; t < p.slots; ++t)
      philox_quads(p.slot_quads[t].data(), int64_t(p.slot_quads[t].size()), row, p.base + uint32_t(t),
                   a.key, tbl.data() + t * stride);
    gather_row(srow.data(), p.cidx.data(), a.col_factor, val.data(), a.ct);
    if constexpr (MODE == 1) {
      round_row(val.data(), a.ct, OUT);
      for (int d = 0; d < p.depth; ++d)
        lemon_level(tbl.data(), p.lv_off[d].data(), p.lv_base[d].data(), p.lv_flags[d].data(),
                    val.data(), a.ct, OUT);
    } else if constexpr (MODE == 2) {
      for (int64_t j = 0; j < a.ct; ++j) {
        const TableDraws U{tbl.data(), stride, p.base, p.ucol[j]};
        val[j] = split_value<OUT>(a.split, val[j], p.gsize[j], p.gpos[j], a.noise_std, U);
      }
    }
    encode_row(val.data(), out, a.ct, OUT);
    for (int64_t j : p.zero_cols) out[j] = encode<OUT>(0.0f);
    int64_t last_quad = -1;
    Words w{};
    for (int64_t j : p.free_cols) {  // free columns: draws per *target* column quad
      const uint64_t col = uint64_t(j + a.col_offset);
      if (a.noise_std != 0.0f && int64_t(col >> 2) != last_quad) {
        last_quad = int64_t(col >> 2);
        w = philox(uint32_t(col >> 2), row, kStreamFree, 0u, a.key.k0, a.key.k1);
      }
      out[j] = encode<OUT>(free_value(to_uniform(w.w[col & 3]), a.noise_std));
    }
  }
}

}  // namespace lemon
