// Per-stage TSC counters of the CPU row loop, compiled in only with -DLEMON_STAGE_TSC
// (benchmarks/stage_counters.py builds such a copy of the extension; the shipped one has none).
// TSC ticks count at the nominal clock (2.596 GHz on the dev VM), so ticks per target element are
// comparable between runs on one machine whatever the load; the totals print at process exit.
#pragma once
#include <cstdint>

#ifdef LEMON_STAGE_TSC
#include <x86intrin.h>

#include <cstdio>

namespace lemon {
enum TscStage : int {
  kTscStage = 0, kTscPhilox, kTscGather, kTscRound, kTscPass, kTscEncode, kTscTail, kTscFused, kTscCount
};
struct TscTotals {
  uint64_t ticks[kTscCount] = {};
  ~TscTotals() {
    std::fprintf(stderr,
                 "LEMON_STAGE_TSC stage=%llu philox=%llu gather=%llu round=%llu pass=%llu encode=%llu tail=%llu "
                 "fused=%llu\n",
                 (unsigned long long)ticks[0], (unsigned long long)ticks[1], (unsigned long long)ticks[2],
                 (unsigned long long)ticks[3], (unsigned long long)ticks[4], (unsigned long long)ticks[5],
                 (unsigned long long)ticks[6], (unsigned long long)ticks[7]);
  }
};
inline TscTotals g_tsc_totals;
}  // namespace lemon
#define LEMON_TSC_START uint64_t lemon_tsc_last_ = __rdtsc()
#define LEMON_TSC_MARK(stage)                                                                   \
  do {                                                                                          \
    const uint64_t now_ = __rdtsc();                                                           \
    __atomic_fetch_add(&::lemon::g_tsc_totals.ticks[::lemon::stage], now_ - lemon_tsc_last_, __ATOMIC_RELAXED); \
    lemon_tsc_last_ = now_;                                                                    \
  } while (0)
#else
#define LEMON_TSC_START do {} while (0)
#define LEMON_TSC_MARK(stage) do {} while (0)
#endif
