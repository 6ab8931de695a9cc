#!/usr/bin/env bash
# In-process A/B of the CPU loops: csrc/cpu/pair_stats_cpu_impl.h (with the headers it includes)
# at a git revision (A) against the working tree's (B), each compiled into its own object
# (kernel_ab_impl.cpp), linked into one binary with the driver (kernel_ab.cpp) and timed
# alternately.
#
#   benchmarks/kernel_ab/run.sh REV [options]     e.g. run.sh HEAD --pairs 16000 --trials 40
#
# REV = the working tree's own HEAD with an unmodified header is an A/A run: it shows the
# harness's noise. Options go to the binary (--m --B --K --R --pairs --trials --shared --need-h
# --need-params --json; see kernel_ab.cpp). Needs g++ (or $CXX) and an x86-64 CPU with AVX2 and
# FMA; no Python, no torch.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: $0 REV [options]   (REV: the git revision whose pair_stats_cpu_impl.h is version A)" >&2
  exit 2
fi
rev=$1
shift
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
# The loops are csrc/cpu/pair_stats_cpu_impl.h and the headers by role it includes (every
# csrc/cpu/pair_stats_cpu_*.h; one file before they were split). Each version's set goes to its own
# include directory, searched before the working tree's csrc (which supplies pair_stats_cpu.h and
# pair_stats_math.h to both).
impl=csrc/cpu/pair_stats_cpu_impl.h
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/a/cpu" "$work/b/cpu"
if ! git -C "$root" cat-file -e "$rev:$impl" 2>/dev/null; then
  echo "$0: cannot read $impl at revision '$rev'" >&2
  exit 2
fi
git -C "$root" ls-tree --name-only "$rev" csrc/cpu/ | grep -E '^csrc/cpu/pair_stats_cpu_[a-z0-9_]+\.h$' |
  while read -r f; do git -C "$root" show "$rev:$f" >"$work/a/cpu/$(basename "$f")"; done
cp "$root"/csrc/cpu/pair_stats_cpu_*.h "$work/b/cpu/"
# The extension's flags (setup.py): -O3, FMA contraction on, hidden visibility. The two versions
# compile in parallel (each is most of the build time), then link with the driver.
cxx="${CXX:-g++}"
flags=(-O3 -std=c++17 -ffp-contract=fast -fvisibility=hidden -Wno-psabi -falign-loops=64 -falign-functions=64
  -pthread)
pids=()
for v in a b; do
  "$cxx" "${flags[@]}" -I"$work/$v" -I"$root/csrc" -DIMPL='"cpu/pair_stats_cpu_impl.h"' \
    -DMMIM_CPU_CAPABILITY="impl_$v" -c "$root/benchmarks/kernel_ab/kernel_ab_impl.cpp" -o "$work/impl_$v.o" &
  pids+=($!)
done
"$cxx" "${flags[@]}" -I"$root/csrc" -c "$root/benchmarks/kernel_ab/kernel_ab.cpp" -o "$work/driver.o"
for pid in "${pids[@]}"; do wait "$pid"; done
"$cxx" "${flags[@]}" "$work/driver.o" "$work/impl_a.o" "$work/impl_b.o" -o "$work/kernel_ab"
echo "A = $impl at $rev ($(git -C "$root" rev-parse --short "$rev")), B = working tree"
"$work/kernel_ab" "$@"
