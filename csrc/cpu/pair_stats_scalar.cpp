// pair_stats CPU loops on one-lane "vectors" that call the shared header's scalar functions (the
// ones the CUDA kernels run). Selected only by MMIM_EXT_CPU_CAPABILITY=scalar; the tests use it
// to check that scalar math against the reference on a machine without a GPU.
//
// Without GCC's RTL global CSE passes, for compile time, as in pair_stats_base.cpp: this build is
// checked for its results, never timed.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-gcse", "no-gcse-after-reload")
#endif
#include "cpu/pair_stats_cpu.h"

#define MMIM_CPU_CAPABILITY scalar
#define MMIM_VEC_SCALAR 1
#include "cpu/pair_stats_cpu_impl.h"

MMIM_INSTANTIATE_PAIR_STATS_CPU(scalar)
