// pair_stats CPU loops compiled for AVX2 + FMA. Used only when the running CPU has both
// (pair_stats_kernel.cpp checks at run time); other x86-64 CPUs get the baseline build.
#include "cpu/pair_stats_cpu.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MMIM_HAVE_AVX2_BUILD 1

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define MMIM_CPU_CAPABILITY avx2
#define MMIM_VEC_AVX2 1
#include "cpu/pair_stats_cpu_impl.h"

MMIM_INSTANTIATE_PAIR_STATS_CPU(avx2)
#pragma GCC pop_options
#endif
