// pair_stats CPU loops at the baseline instruction set of the build (SSE2 on x86-64).
#include "cpu/pair_stats_cpu.h"

#define MMIM_CPU_CAPABILITY base
#include "cpu/pair_stats_cpu_impl.h"

MMIM_INSTANTIATE_PAIR_STATS_CPU(base)
