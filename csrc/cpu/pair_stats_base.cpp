// pair_stats CPU loops at the baseline instruction set of the build (SSE2 on x86-64).
//
// Without GCC's RTL global CSE passes: with them this file took 104 s to compile (-ftime-report:
// 59 s in "PRE" and "load CSE after reload" on the flattened loops), without them 51 s. This
// build runs only on x86-64 CPUs without AVX2 + FMA; the AVX2 build keeps every -O3 pass.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-gcse", "no-gcse-after-reload")
#endif
#include "cpu/pair_stats_cpu.h"

#define MMIM_CPU_CAPABILITY base
#include "cpu/pair_stats_cpu_impl.h"

MMIM_INSTANTIATE_PAIR_STATS_CPU(base)
