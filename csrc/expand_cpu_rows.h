// Row loop of the C++ CPU kernel of lemon_ext::expand (no torch headers: see expand_cpu.cpp).
//
// Per target row i: stage the source row once in float32 (times row_factor[i]); compute the
// Philox draws it needs, one call per (source-column quad, stream) for the quads some column
// reads, into a small table (philox_simd.h, 4 words per call, all kept); gather the staged row
// into the target columns (contiguous copies along runs of the column map); apply the split as
// branch-free column passes (ColumnPass: one per LEMON tree level, or one for cancelling
// pairs); round and store. Widths up to 2x (one pass) run gather, round and pass as one fused
// loop instead (fused_row), LEMON pairs with a coefficient per draw (pair_coefficients). The plan
// (which staged slot, which draws and which pass parameters each target column uses) depends
// only on the column map, so it is built once per call (CpuPlan) and shared by every row and
// thread. TSC ticks per target element (2.596 GHz), one thread, warm, 512x1408 -> 1024x2816
// bf16, circular maps + LEMON (benchmarks/stage_counters.py, commit 0dfc18c): stage 0.12, Philox
// 0.59, fused 0.64, encode 0.27 (1.62 in all; the staged passes 1.97). The passes were scalar
// before -fno-trapping-math (116M -> 32M instructions for this tensor in callgrind's AVX2 run).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>
#include <string>

#include "expand_math.h"
#include "philox_simd.h"
#include "stage_tsc.h"

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

// An index array cut into segments: "runs" (idx[j0 + t] == idx[j0] + t for t < len, read with
// contiguous loads) and stretches of short runs (read by gathering). Column maps from the
// engine (V_circ, head blocks) are a few long runs; random maps mix both. Measured on the dev VM
// (AMD EPYC): an auto-vectorised gather costs ~1.7 ns per column, a contiguous read ~0.2 ns.
struct IndexRuns {
  std::vector<int32_t> start, len;
  std::vector<char> contiguous;
};

// Runs along which every array of `idx` steps by one at once (one array: its own runs).
inline IndexRuns make_runs(const std::vector<const int32_t*>& idx, int64_t n) {
  constexpr int64_t kMinRun = 16;  // shorter runs are cheaper to gather than to loop over
  IndexRuns r;
  auto steps = [&](int64_t e) {
    for (const int32_t* a : idx)
      if (a[e] != a[e - 1] + 1) return false;
    return true;
  };
  int64_t j = 0;
  while (j < n) {
    int64_t e = j + 1;
    while (e < n && steps(e)) ++e;
    const bool run = e - j >= kMinRun;
    if (!run && !r.start.empty() && !r.contiguous.back()) {
      r.len.back() += int32_t(e - j);  // extend the current gather stretch
    } else {
      r.start.push_back(int32_t(j));
      r.len.push_back(int32_t(e - j));
      r.contiguous.push_back(run);
    }
    j = e;
  }
  return r;
}

// One pass over the target columns for a split mode, as per-column parameters, so every pass is
// a branch-free loop of the same float ops for every column (vectorises; walking each column's
// tree instead mispredicts the random swaps, measured 4x slower). `off[j]` is the draws-table
// entry column j reads. Columns a pass leaves alone get parameters that reproduce their value
// (LEMON: a = 1) and the next table entry, so runs of `off` stay long.
//  LEMON level:  s = u >= 1/2 ? e : 0;  a = p + q * (2u - (s + 1 - e));
//                first = round(a x); x <- (l != s) ? first : x - first
//                (even split: p = 1/2, q = 1/4, e = 1; odd: p = n_l/cnt, q = p - 1/2, e = 0;
//                 l = 1 when the column is in the left part; untouched: p = 1, q = 0, e = 0, l = 1)
//  cancel:       x <- z ? 0 : sign * round((p + q u) x)   (p = 1/2; q = 1/4, or 0 for "equal")
struct ColumnPass {
  std::vector<int32_t> off;
  std::vector<float> p, q, e, l;  // cancel: e = sign, l = zero flag
  IndexRuns runs;
  // Deep LEMON levels of random maps touch few columns (1024 -> 2048 random: 82%, 34%, 2% of the
  // columns at levels 0-2): below 1 in 8 the pass visits only those, one by one.
  std::vector<int32_t> active;
  bool sparse = false;
};

// Row-independent part, built once per call from col_map / group_size / group_pos.
struct CpuPlan {
  std::vector<int32_t> cidx;  // (C_T,) staged-row slot: c, cs (ZERO/FREE: 0), cs + 1 (MEAN)
  IndexRuns cidx_runs;
  std::vector<int32_t> ucol;  // (C_T,) source column of the draws column j reads (MEAN -> 0)
  std::vector<int32_t> gsize, gpos;           // (C_T,) group size n and rank m
  std::vector<int64_t> zero_cols, free_cols;  // target columns overwritten after the row loop
  std::vector<int64_t> free_runs;  // (first column, length) of each run of consecutive FREE columns
  int slots = 0;               // streams staged: stream_base(split) + t, t < slots
  uint32_t base = 0;
  int64_t quads = 0;           // source-column quads
  int64_t stride = 0;          // draws-table row: 4 * quads floats
  // per slot, the quads some column reads, padded to a multiple of kPhiloxBlock
  std::vector<std::vector<int32_t>> slot_quads;
  std::vector<ColumnPass> passes;  // LEMON: one per tree level; cancel: one
  // Fused row path (no split, or LEMON / cancel with one dense pass: every width up to 2x the
  // source's): each target value goes gather -> round -> pass -> encode -> store in one loop, in
  // registers, along runs where the column map and the pass's draws index are both contiguous.
  bool fused = false;
  IndexRuns fused_runs;
  // LEMON in the fused row is one level of pairs (groups of at most 2, an even split): per column
  // 0 (right part), 1 (left part) or 2 (untouched: a group of one); the coefficient is computed per
  // draw (pair_coefficients), not per column.
  std::vector<float> pair_side;
};

constexpr int kMaxFusedPasses = 1;

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

inline ColumnPass empty_pass(int64_t ct, float p) {
  ColumnPass c;
  c.off.assign(ct, -1);
  c.p.assign(ct, p); c.q.assign(ct, 0.0f); c.e.assign(ct, 0.0f); c.l.assign(ct, 1.0f);
  return c;
}

// Untouched columns (off = -1) read the entry after their left neighbour's, or entry 0. Only a
// LEMON level leaves untouched columns as they are, so only LEMON levels may go sparse.
inline void finish_pass(ColumnPass& c, int64_t table_size, bool may_skip_untouched) {
  for (size_t j = 0; j < c.off.size(); ++j) {
    if (c.off[j] >= 0) c.active.push_back(int32_t(j));
    else c.off[j] = (j > 0 && c.off[j - 1] + 1 < table_size) ? c.off[j - 1] + 1 : 0;
  }
  c.runs = make_runs({c.off.data()}, int64_t(c.off.size()));
  c.sparse = may_skip_untouched && 8 * c.active.size() < c.off.size();
}

// LEMON_EXT_CPU_FUSED=0 runs the staged passes instead of the fused row (same bits: the A/B of
// benchmarks/stage_counters.py and the tests), read once.
inline bool fused_path_enabled() {
  static const bool on = [] {
    const char* env = std::getenv("LEMON_EXT_CPU_FUSED");
    return !(env && std::string(env) == "0");
  }();
  return on;
}

inline CpuPlan make_plan(const int64_t* col_map, const int32_t* gsize, const int32_t* gpos,
                         int64_t ct, int64_t cs, int split, int max_n) {
  CpuPlan p;
  p.cidx.resize(ct); p.ucol.resize(ct); p.gsize.assign(gsize, gsize + ct); p.gpos.assign(gpos, gpos + ct);
  p.slots = num_stream_slots(split, max_n);
  p.base = stream_base(split);
  p.quads = (cs + 3) / 4;
  p.stride = 4 * p.quads;
  const int64_t table_size = std::max<int64_t>(p.slots, 1) * p.stride;
  std::vector<std::vector<char>> need(p.slots, std::vector<char>(p.quads, 0));
  std::vector<int> s;
  for (int64_t j = 0; j < ct; ++j) {
    const int64_t c = col_map[j];
    p.cidx[j] = staged_slot(c, cs);
    p.ucol[j] = int32_t(c >= 0 ? c : 0);
    if (c == kZero) p.zero_cols.push_back(j);
    if (c == kFree) p.free_cols.push_back(j);
    if (c == kZero || c == kFree || p.slots == 0 || cs == 0) continue;
    slots_read(split, gsize[j], gpos[j], s);
    for (int t : s) need[t][p.ucol[j] >> 2] = 1;
  }
  p.cidx_runs = make_runs({p.cidx.data()}, ct);
  for (size_t k = 0; k < p.free_cols.size(); ++k) {
    if (k > 0 && p.free_cols[k] == p.free_cols[k - 1] + 1) ++p.free_runs.back();
    else p.free_runs.insert(p.free_runs.end(), {p.free_cols[k], 1});
  }
  if (split == kSplitLemon) {
    int depth = 0;
    for (int n = 2; n <= max_n; ++n) { int d = 0; for (int c = n; c > 1; c = (c + 1) / 2) ++d; depth = std::max(depth, d); }
    p.passes.assign(depth, empty_pass(ct, 1.0f));
    for (int64_t j = 0; j < ct; ++j) {
      if (col_map[j] == kZero || col_map[j] == kFree) continue;
      int cnt = gsize[j], lo = 0, node = 0, d = 0;
      const int m = gpos[j];
      while (cnt > 1) {
        const int nl = (cnt + 1) / 2, nr = cnt / 2;
        const bool left = m < lo + nl;
        ColumnPass& c = p.passes[d];
        c.off[j] = int32_t(node * p.stride + p.ucol[j]);
        const float base = float(nl) / float(cnt);
        c.p[j] = nl == nr ? 0.5f : base;
        c.q[j] = nl == nr ? 0.25f : base - 0.5f;
        c.e[j] = nl == nr ? 1.0f : 0.0f;
        c.l[j] = left ? 1.0f : 0.0f;
        lo = left ? lo : lo + nl;
        node = left ? 2 * node + 1 : 2 * node + 2;
        cnt = left ? nl : nr;
        ++d;
      }
    }
  } else if (split == kSplitCancel || split == kSplitCancelEqual) {
    ColumnPass c = empty_pass(ct, 0.5f);
    for (int64_t j = 0; j < ct; ++j) {
      const int n = gsize[j], m = gpos[j];
      c.l[j] = (n <= 1 || (m == n - 1 && (n & 1))) ? 1.0f : 0.0f;  // zero flag
      c.e[j] = (m & 1) ? -1.0f : 1.0f;                               // sign
      if (split == kSplitCancel && c.l[j] == 0.0f && col_map[j] >= 0) {
        c.q[j] = 0.25f;
        c.off[j] = int32_t((m / 2) * p.stride + p.ucol[j]);
      }
    }
    p.passes.push_back(std::move(c));
  }
  for (ColumnPass& c : p.passes) finish_pass(c, table_size, split == kSplitLemon);
  const bool dense = std::none_of(p.passes.begin(), p.passes.end(), [](const ColumnPass& c) { return c.sparse; });
  const bool fusable_split =
      split == kSplitNone || split == kSplitLemon || split == kSplitCancel || split == kSplitCancelEqual;
  p.fused = fused_path_enabled() && fusable_split && dense && p.passes.size() <= size_t(kMaxFusedPasses);
  if (p.fused) {
    std::vector<const int32_t*> idx{p.cidx.data()};
    for (const ColumnPass& c : p.passes) idx.push_back(c.off.data());
    p.fused_runs = make_runs(idx, ct);
    if (split == kSplitLemon && !p.passes.empty()) {
      const ColumnPass& c = p.passes[0];
      p.pair_side.assign(ct, 2.0f);
      for (const int32_t j : c.active) p.pair_side[j] = c.l[j];
    }
  }
  p.slot_quads.resize(p.slots);
  for (int t = 0; t < p.slots; ++t) {
    auto& list = p.slot_quads[t];
    for (int64_t q = 0; q < p.quads; ++q)
      if (need[t][q]) list.push_back(int32_t(q));
    while (!list.empty() && list.size() % kPhiloxBlock) list.push_back(list.back());
  }
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
// x86-64. No FMA in any clone: -ffp-contract=off, and no clone enables "fma". LEMON_NO_CLONES
// compiles one plain copy (tests/native/isa_variants.cpp builds it for baseline x86-64).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(LEMON_NO_CLONES)
#define LEMON_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define LEMON_CLONES
#endif

// val[j] = S'[r, col_map[j]] (* rf) (* cf[j]), float32: contiguous copies along runs.
LEMON_CLONES void gather_row(const float* __restrict sv, const int32_t* __restrict cidx,
                             const IndexRuns& runs, const float* __restrict cf,
                             float* __restrict val) {
  for (size_t r = 0; r < runs.start.size(); ++r) {
    const int64_t j0 = runs.start[r], len = runs.len[r];
    float* __restrict to = val + j0;
    const float* __restrict f = cf ? cf + j0 : nullptr;
    if (runs.contiguous[r]) {
      const float* __restrict from = sv + cidx[j0];
      if (f) for (int64_t t = 0; t < len; ++t) to[t] = from[t] * f[t];
      else for (int64_t t = 0; t < len; ++t) to[t] = from[t];
    } else {
      const int32_t* __restrict ix = cidx + j0;
      if (f) for (int64_t t = 0; t < len; ++t) to[t] = sv[ix[t]] * f[t];
      else for (int64_t t = 0; t < len; ++t) to[t] = sv[ix[t]];
    }
  }
}

template <int OUT>
LEMON_HD void round_t(float* __restrict val, int64_t n) {
  for (int64_t j = 0; j < n; ++j) val[j] = round_out<OUT>(val[j]);
}
LEMON_CLONES void round_row(float* __restrict val, int64_t n, int out) {
  if (out == kOutBF16) round_t<kOutBF16>(val, n);
  else if (out == kOutF16) round_t<kOutF16>(val, n);
}

// val[j] = STEP(tbl[off[j]], params[j], val[j]) with lemon_step / cancel_step (expand_math.h):
// contiguous table reads along runs of off.
template <int OUT, bool LEMON>
LEMON_HD void pass_t(const float* __restrict tbl, const ColumnPass& c, float* __restrict val) {
  const float *__restrict P = c.p.data(), *__restrict Q = c.q.data(), *__restrict E = c.e.data(),
              *__restrict L = c.l.data();
  auto step = [](float u, float p, float q, float e, float l, float x) {
    return LEMON ? lemon_step<OUT>(u, p, q, e, l, x) : cancel_step<OUT>(u, p, q, e, l, x);
  };
  if (c.sparse) {
    for (const int32_t j : c.active) val[j] = step(tbl[c.off[j]], P[j], Q[j], E[j], L[j], val[j]);
    return;
  }
  for (size_t r = 0; r < c.runs.start.size(); ++r) {
    const int64_t j0 = c.runs.start[r], len = c.runs.len[r];
    float* __restrict x = val + j0;
    const float *__restrict p = P + j0, *__restrict q = Q + j0, *__restrict e = E + j0, *__restrict l = L + j0;
    if (c.runs.contiguous[r]) {
      const float* __restrict u = tbl + c.off[j0];
      for (int64_t t = 0; t < len; ++t) x[t] = step(u[t], p[t], q[t], e[t], l[t], x[t]);
    } else {
      const int32_t* __restrict off = c.off.data() + j0;
      for (int64_t t = 0; t < len; ++t) x[t] = step(tbl[off[t]], p[t], q[t], e[t], l[t], x[t]);
    }
  }
}
LEMON_CLONES void column_pass(const float* tbl, const ColumnPass& c, bool lemon, float* val, int out) {
  if (lemon) {
    if (out == kOutBF16) pass_t<kOutBF16, true>(tbl, c, val);
    else if (out == kOutF16) pass_t<kOutF16, true>(tbl, c, val);
    else pass_t<kOutF32, true>(tbl, c, val);
  } else {
    if (out == kOutBF16) pass_t<kOutBF16, false>(tbl, c, val);
    else if (out == kOutF16) pass_t<kOutF16, false>(tbl, c, val);
    else pass_t<kOutF32, false>(tbl, c, val);
  }
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

// The fused row: val[j] = STEP(draw, params[j], round(S'[r, col_map[j]] (* cf[j]))) for the
// columns of one run (KIND 0: no split, no pass; 1: LEMON pairs; 2: cancel). CONTIG: the run's
// source values and draws are contiguous from sv / tbl (the caller offsets them), else indexed
// through cidx / off. KIND 1 reads the per-draw coefficient a and swap s (tbl = a, S = s; see
// pair_coefficients) and the column's side L: first = round(a x), (L != s) ? first : x - first,
// or x for L = 2; lemon_step's float ops on the same operands, so the same bits. One loop: the
// value stays in a register from the gather to the result (the staged passes write and re-read
// the row between stages). The encode to the output dtype stays a
// separate sweep: storing from this loop into fresh output pages measured slower (whole Llama of
// issue 14 in a fresh process: 383-391M TSC ticks for fused + store, against 78-84M fused + the
// same 236M for the encode sweep as the staged path).
template <int OUT, int KIND, bool CONTIG, bool HAS_CF, bool NO_NAN>
LEMON_HD void fused_t(const float* __restrict sv, const int32_t* __restrict cidx, const float* __restrict cf,
                      const float* __restrict tbl, const float* __restrict S, const int32_t* __restrict off,
                      const float* __restrict P, const float* __restrict Q, const float* __restrict E,
                      const float* __restrict L, float* __restrict val, int64_t len) {
  for (int64_t t = 0; t < len; ++t) {
    float x = CONTIG ? sv[t] : sv[cidx[t]];
    if constexpr (HAS_CF) x = x * cf[t];
    if constexpr (KIND == 1) {
      x = NO_NAN ? round_out_no_nan<OUT>(x) : round_out<OUT>(x);
      const float a = CONTIG ? tbl[t] : tbl[off[t]], swap = CONTIG ? S[t] : S[off[t]];
      const float first = NO_NAN ? round_out_no_nan<OUT>(a * x) : round_out<OUT>(a * x);
      const float split = (L[t] != swap) ? first : x - first;
      x = L[t] == 2.0f ? x : split;
    } else if constexpr (KIND == 2) {
      x = round_out<OUT>(x);
      const float u = CONTIG ? tbl[t] : tbl[off[t]];
      x = cancel_step<OUT>(u, P[t], Q[t], E[t], L[t], x);
    }
    val[t] = x;
  }
}

template <int OUT, int KIND, bool HAS_CF, bool NO_NAN>
LEMON_HD void fused_row_t(const float* sv, const CpuPlan& p, const float* cf, const float* tbl, const float* swaps,
                          float* val) {
  const ColumnPass* c = p.passes.empty() ? nullptr : &p.passes[0];
  const int32_t* cidx = p.cidx.data();
  const IndexRuns& runs = p.fused_runs;
  for (size_t r = 0; r < runs.start.size(); ++r) {
    const int64_t j0 = runs.start[r], len = runs.len[r];
    const int32_t* off = c ? c->off.data() + j0 : nullptr;
    const float *P = c ? c->p.data() + j0 : nullptr, *Q = c ? c->q.data() + j0 : nullptr,
                *E = c ? c->e.data() + j0 : nullptr;
    const float* L = KIND == 1 ? p.pair_side.data() + j0 : c ? c->l.data() + j0 : nullptr;
    const float* f = HAS_CF ? cf + j0 : nullptr;
    if (runs.contiguous[r])
      fused_t<OUT, KIND, true, HAS_CF, NO_NAN>(sv + cidx[j0], nullptr, f, c ? tbl + off[0] : tbl,
                                               c ? swaps + off[0] : swaps, nullptr, P, Q, E, L, val + j0, len);
    else
      fused_t<OUT, KIND, false, HAS_CF, NO_NAN>(sv, cidx + j0, f, tbl, swaps, off, P, Q, E, L, val + j0, len);
  }
}

template <int OUT, int KIND>
LEMON_HD void fused_row_k(const float* sv, const CpuPlan& p, const float* cf, const float* tbl, const float* swaps,
                          float* val, bool no_nan) {
  if (KIND == 1 && no_nan) {
    if (cf) fused_row_t<OUT, KIND, true, true>(sv, p, cf, tbl, swaps, val);
    else fused_row_t<OUT, KIND, false, true>(sv, p, cf, tbl, swaps, val);
  } else {
    if (cf) fused_row_t<OUT, KIND, true, false>(sv, p, cf, tbl, swaps, val);
    else fused_row_t<OUT, KIND, false, false>(sv, p, cf, tbl, swaps, val);
  }
}

// True when none of x[0, n) is inf or NaN (exponent bits all ones), branch-free so it vectorises.
LEMON_CLONES bool all_finite(const float* __restrict x, int64_t n) {
  uint32_t bad = 0;
  for (int64_t k = 0; k < n; ++k) bad |= uint32_t((f2u(x[k]) & 0x7F800000u) == 0x7F800000u);
  return bad == 0;
}

// Per-draw coefficients of a LEMON pair (an even split: p = 1/2, q = 1/4, e = 1 in lemon_step):
// s = u >= 1/2, a = 1/2 + 1/4 (2u - (s + (1 - 1))) for every draws-table entry; a pair's two
// columns share the entry, so at 2x width this is half the per-column work.
LEMON_CLONES void pair_coefficients(const float* __restrict u, float* __restrict a, float* __restrict s, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const float swap = u[k] >= 0.5f ? 1.0f : 0.0f;
    s[k] = swap;
    a[k] = 0.5f + 0.25f * (2.0f * u[k] - (swap + (1.0f - 1.0f)));
  }
}

// kind: 0 no split (or no pass), 1 LEMON pairs (tbl: coefficients a, swaps: s), 2 cancel (tbl: draws).
// no_nan: the staged row and the column factors are finite (all_finite), so nothing rounded is NaN.
LEMON_CLONES void fused_row(const float* sv, const CpuPlan& p, const float* cf, const float* tbl, const float* swaps,
                            float* out, int kind, int out_kind, bool no_nan) {
  if (out_kind == kOutBF16) {
    if (kind == 1) fused_row_k<kOutBF16, 1>(sv, p, cf, tbl, swaps, out, no_nan);
    else if (kind == 2) fused_row_k<kOutBF16, 2>(sv, p, cf, tbl, swaps, out, no_nan);
    else fused_row_k<kOutBF16, 0>(sv, p, cf, tbl, swaps, out, no_nan);
  } else if (out_kind == kOutF16) {
    if (kind == 1) fused_row_k<kOutF16, 1>(sv, p, cf, tbl, swaps, out, no_nan);
    else if (kind == 2) fused_row_k<kOutF16, 2>(sv, p, cf, tbl, swaps, out, no_nan);
    else fused_row_k<kOutF16, 0>(sv, p, cf, tbl, swaps, out, no_nan);
  } else {
    if (kind == 1) fused_row_k<kOutF32, 1>(sv, p, cf, tbl, swaps, out, no_nan);
    else if (kind == 2) fused_row_k<kOutF32, 2>(sv, p, cf, tbl, swaps, out, no_nan);
    else fused_row_k<kOutF32, 0>(sv, p, cf, tbl, swaps, out, no_nan);
  }
}

// out[t] = FREE value of draw u[t], t < n (a run of consecutive FREE columns), vectorised: the
// tails of widths that are no multiple of the source's are FREE (a third of a 1.5x stream
// tensor), and one column at a time they cost 61M TSC ticks of a 1.5x Llama's 150M.
template <int OUT>
LEMON_HD void free_run_t(const float* __restrict u, float noise_std, typename OutT<OUT>::type* __restrict out,
                         int64_t n) {
  for (int64_t t = 0; t < n; ++t) out[t] = encode<OUT>(free_value(u[t], noise_std));
}
LEMON_CLONES void free_run(const float* u, float noise_std, void* out, int64_t n, int out_kind) {
  if (out_kind == kOutBF16) free_run_t<kOutBF16>(u, noise_std, static_cast<uint16_t*>(out), n);
  else if (out_kind == kOutF16) free_run_t<kOutF16>(u, noise_std, static_cast<uint16_t*>(out), n);
  else free_run_t<kOutF32>(u, noise_std, static_cast<float*>(out), n);
}

// FREE columns of a row: draws per *target* column quad (c0 = (j + col_offset) >> 2). With noise
// on, the distinct quads (padded to kPhiloxBlock) go through the vectorised Philox into a table
// (word l of quad q at 4 (q - q0) + l) and the plan's runs of FREE columns are written by free_run;
// one scalar Philox call per quad cost ~52 ns, and a 1.5x-wide Llama's stream tails (FREE) made
// its expand_state_dict 3.6x the fresh-output floor. Quads past int32 (the Philox lists' type)
// and noise off keep the scalar loop.
struct FreeColumns {
  std::vector<int32_t> quads;
  int64_t q0 = 0;
  bool vectorised = false;
  std::vector<float> draws;

  FreeColumns(const CpuArgs& a, const CpuPlan& p) {
    if (p.free_cols.empty()) return;
    q0 = (p.free_cols.front() + a.col_offset) >> 2;
    vectorised = a.noise_std != 0.0f && ((p.free_cols.back() + a.col_offset) >> 2) < (int64_t(1) << 31);
    if (!vectorised) return;
    for (int64_t j : p.free_cols) {
      const int32_t q = int32_t((j + a.col_offset) >> 2);
      if (quads.empty() || quads.back() != q) quads.push_back(q);
    }
    while (quads.size() % kPhiloxBlock) quads.push_back(quads.back());
    draws.resize(4 * (quads.back() - q0 + 1));
  }

  template <int OUT>
  void write(const CpuArgs& a, const CpuPlan& p, PhiloxQuadsFn philox_quads, uint32_t row,
             typename OutT<OUT>::type* out) {
    if (vectorised) {
      philox_quads(quads.data(), int64_t(quads.size()), row, kStreamFree, a.key, draws.data(), q0);
      for (size_t k = 0; k < p.free_runs.size(); k += 2)
        free_run(draws.data() + (p.free_runs[k] + a.col_offset - 4 * q0), a.noise_std, out + p.free_runs[k],
                 p.free_runs[k + 1], OUT);
      return;
    }
    int64_t last_quad = -1;
    Words w{};
    for (int64_t j : p.free_cols) {
      const uint64_t col = uint64_t(j + a.col_offset);
      if (a.noise_std != 0.0f && int64_t(col >> 2) != last_quad) {
        last_quad = int64_t(col >> 2);
        w = philox(uint32_t(col >> 2), row, kStreamFree, 0u, a.key.k0, a.key.k1);
      }
      out[j] = encode<OUT>(free_value(to_uniform(w.w[col & 3]), a.noise_std));
    }
  }
};

// Target rows [begin, end). MODE 0: no split, 1: LEMON, 3: cancel (both vectorised column
// passes), 2: any other split (scalar, runtime switch).
template <int OUT, int MODE>
void expand_rows(const CpuArgs& a, const CpuPlan& p, int64_t begin, int64_t end) {
  using O = typename OutT<OUT>::type;
  std::vector<float> srow(a.cs + 2), val(a.ct);
  std::vector<float> tbl(std::max<size_t>(size_t(std::max(p.slots, 1)) * p.stride, 4));  // >= 1 entry
  std::vector<float> coef(p.fused && MODE == 1 ? size_t(p.stride) : 0), swaps(coef.size());
  const bool cf_finite = !(p.fused && MODE == 1) || !a.col_factor || all_finite(a.col_factor, a.ct);
  const PhiloxQuadsFn philox_quads = philox_quads_best();
  FreeColumns free_columns(a, p);
  // First touch of the output pages in a tight loop, one block of rows (~128 KiB) ahead of the
  // compute: a fresh output (at::empty above a few hundred KB) faults in zeroed pages on its first
  // write; back to back those faults cost less than spread between row computations, and a block
  // that fits the L2 keeps the zeroed lines there for the stores (issue 14's Llama,
  // expand_state_dict in a fresh process, medians of 7 alternating runs: 82.5 ms without, 73.6 ms
  // touching the task's whole range first, 69.5-71.2 ms in 64-256 KiB blocks; the fill of the
  // same fresh tensors 38.6 ms). Every byte is overwritten below; a task touches only its own rows;
  // recycled pages cost one store per 4 KiB.
  constexpr int64_t kTouchBlockBytes = 128 << 10;
  const int64_t block_rows = std::max<int64_t>(1, kTouchBlockBytes / std::max<int64_t>(1, a.ct * int64_t(sizeof(O))));
  int64_t touched = begin;
  for (int64_t i = begin; i < end; ++i) {
    if (i == touched) {
      touched = std::min(end, i + block_rows);
      char* lo = reinterpret_cast<char*>(static_cast<O*>(a.out) + i * a.ct);
      char* hi = reinterpret_cast<char*>(static_cast<O*>(a.out) + touched * a.ct);
      for (char* q = lo; q < hi; q += 4096) *reinterpret_cast<volatile char*>(q) = 0;
    }
    O* __restrict out = static_cast<O*>(a.out) + i * a.ct;
    const int64_t r = a.row_map[i];
    if (r == kZero) { std::fill(out, out + a.ct, encode<OUT>(0.0f)); continue; }
    LEMON_TSC_START;
    const bool has_rf = a.row_factor != nullptr;
    stage_row(a, r, has_rf, has_rf ? a.row_factor[i] : 1.0f, srow.data());
    LEMON_TSC_MARK(kTscStage);
    const uint32_t row = uint32_t(uint64_t(i + a.row_offset));
    for (int t = 0; t < p.slots; ++t)
      philox_quads(p.slot_quads[t].data(), int64_t(p.slot_quads[t].size()), row, p.base + uint32_t(t), a.key,
                   tbl.data() + t * p.stride, 0);
    LEMON_TSC_MARK(kTscPhilox);
    if (p.fused) {
      // MODE 0 or no pass: kind 0 (encode(round(x)) == encode(x): the rounding is idempotent)
      const int kind = p.passes.empty() ? 0 : MODE == 1 ? 1 : 2;
      if (kind == 1) pair_coefficients(tbl.data(), coef.data(), swaps.data(), p.stride);
      const bool no_nan = kind == 1 && cf_finite && all_finite(srow.data(), a.cs + 2);
      fused_row(srow.data(), p, a.col_factor, kind == 1 ? coef.data() : tbl.data(), swaps.data(), val.data(), kind, OUT,
                no_nan);
      LEMON_TSC_MARK(kTscFused);
    } else {
      gather_row(srow.data(), p.cidx.data(), p.cidx_runs, a.col_factor, val.data());
      LEMON_TSC_MARK(kTscGather);
      if constexpr (MODE == 1 || MODE == 3) {
        round_row(val.data(), a.ct, OUT);
        LEMON_TSC_MARK(kTscRound);
        for (const ColumnPass& c : p.passes) column_pass(tbl.data(), c, MODE == 1, val.data(), OUT);
      } else if constexpr (MODE == 2) {
        for (int64_t j = 0; j < a.ct; ++j) {
          const TableDraws U{tbl.data(), p.stride, p.base, p.ucol[j]};
          val[j] = split_value<OUT>(a.split, val[j], p.gsize[j], p.gpos[j], a.noise_std, U);
        }
      }
      LEMON_TSC_MARK(kTscPass);
    }
    encode_row(val.data(), out, a.ct, OUT);
    LEMON_TSC_MARK(kTscEncode);
    for (int64_t j : p.zero_cols) out[j] = encode<OUT>(0.0f);
    free_columns.write<OUT>(a, p, philox_quads, row, out);
    LEMON_TSC_MARK(kTscTail);
  }
}

}  // namespace lemon
