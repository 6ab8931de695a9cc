#!/usr/bin/env bash
# The GPU check: on a machine with one CUDA GPU, in about 8 minutes and with no network,
#   1. build mmim_ext in place for this GPU's architecture only (TORCH_CUDA_ARCH_LIST from
#      torch.cuda.get_device_capability(); pip --no-build-isolation against the installed torch),
#   2. run the CUDA tests: tests/test_cuda.py, then the CUDA-parametrized cases (-k cuda) of
#      tests/test_pair_stats.py, tests/test_op_contract.py and tests/test_properties.py (if present),
#   3. time fused CUDA against torch.compile(reference) (benchmarks/gpu_bench.py: m = 1024 and
#      4096, B = 256, K = 16, R = 1, forward and forward+backward, medians),
#   4. print one summary table, and write logs and JSON to results/gpu_check/ (git-ignored).
#
# Without a CUDA device it prints "gpu_check: SKIPPED (...)" and exits 0 at once, so CI can call it
# anywhere.
#
# Exit status: 0 = every stage passed, or skipped for want of a GPU; 1 = a stage failed (build,
# tests, or the benchmark's fused-vs-reference check); 2 = bad usage or a GPU whose Python
# environment cannot run the check (no torch, no CUDA toolkit to build with).
#
# Environment:
#   MMIM_EXT_PYTHON     interpreter with a CUDA build of torch (>= 2.11), pytest and hypothesis
#                       (default: python3)
#   MMIM_EXT_GPU_CHECK_OUT       folder for logs and JSON (default <repo>/results/gpu_check)
#   MMIM_EXT_GPU_CHECK_BUDGET    seconds for the whole check (default 470); the benchmark gets what the
#                       build and tests leave and stops repeating when it runs out
#   MAX_JOBS            parallel compile jobs (default: the number of CPUs)
#   CUDA_HOME           CUDA toolkit for the build (default: torch's guess)
set -uo pipefail

case "${1:-}" in
  "") ;;
  -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
  *) echo "gpu_check: unknown argument '$1' (expected none; see --help)" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${MMIM_EXT_PYTHON:-python3}"
OUT="${MMIM_EXT_GPU_CHECK_OUT:-$ROOT/results/gpu_check}"
BUDGET="${MMIM_EXT_GPU_CHECK_BUDGET:-470}"
start=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
at_least() { local l; l=$(left); echo $(( l - $2 > $1 ? l - $2 : $1 )); }  # max(min_s, left - reserve_s)

# 0. Is there a GPU torch can use? (No NVIDIA device node and no nvidia-smi: skip before even
# importing torch.)
if ! ls /dev/nvidia[0-9]* /dev/dxg >/dev/null 2>&1 && ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: SKIPPED (no NVIDIA device on this machine)"
  exit 0
fi
probe=$("$PY" - 2>/dev/null <<'EOF'
import torch
if torch.cuda.is_available() and torch.version.cuda is not None:
    major, minor = torch.cuda.get_device_capability()
    print(f"gpu {major}.{minor} {torch.__version__} {torch.version.cuda} {torch.cuda.device_count()} "
          f"{torch.cuda.get_device_name().replace(' ', '_')}")
else:
    print(f"nogpu {torch.__version__} {torch.version.cuda}")
EOF
) || probe=""
if [ -z "$probe" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
    echo "gpu_check: a GPU is present but '$PY' cannot import torch; set MMIM_EXT_PYTHON" >&2
    exit 2
  fi
  echo "gpu_check: SKIPPED (no CUDA device, and '$PY' cannot import torch)"
  exit 0
fi
read -r kind arch torch_version cuda_version ndev gpu_name <<< "$probe"
if [ "$kind" != "gpu" ]; then
  echo "gpu_check: SKIPPED (no CUDA device visible to torch $arch, CUDA build: $torch_version)"
  exit 0
fi
mkdir -p "$OUT"
echo "gpu_check: $gpu_name (sm_${arch/./}, $ndev device(s)), torch $torch_version, CUDA $cuda_version; logs in $OUT"

declare -a names statuses secs details
record() { names+=("$1"); statuses+=("$2"); secs+=("$3"); details+=("$4"); }
failed=0

# 1. Build in place for this GPU only.
t0=$(date +%s)
cuda_home="${CUDA_HOME:-$("$PY" -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or "")' 2>/dev/null)}"
if [ -z "$cuda_home" ] || [ ! -x "$cuda_home/bin/nvcc" ]; then
  echo "gpu_check: no CUDA toolkit (nvcc) found (CUDA_HOME='$cuda_home'); cannot build the CUDA kernels" >&2
  exit 2
fi
ninja=$("$PY" -c 'from torch.utils.cpp_extension import is_ninja_available as f; print("ninja" if f() else "no ninja: serial build")' 2>/dev/null)
jobs="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}"
build_env=(env CUDA_HOME="$cuda_home" PATH="$cuda_home/bin:$PATH" FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch"
           MAX_JOBS="$jobs")
echo "gpu_check: building (TORCH_CUDA_ARCH_LIST=$arch, MAX_JOBS=$jobs, $ninja, nvcc from $cuda_home)"
rm -f "$ROOT"/mmim_ext/_C*.so
if "$PY" -m pip --version >/dev/null 2>&1; then
  build_cmd=("$PY" -m pip install --no-build-isolation --no-deps --no-index -e .)
else  # no pip: setuptools directly, in place as well
  build_cmd=("$PY" setup.py build_ext --inplace)
fi
(cd "$ROOT" && timeout "$(at_least 120 0)" "${build_env[@]}" "${build_cmd[@]}") > "$OUT/build.log" 2>&1
build_rc=$?
loaded=$(cd "$ROOT" && PYTHONPATH="$ROOT" "$PY" -c \
  'import mmim_ext; print(int(mmim_ext.fused_available("cuda")))' 2>>"$OUT/build.log")
if [ "$build_rc" = "0" ] && [ "$loaded" = "1" ]; then
  record build OK $(( $(date +%s) - t0 )) "sm_${arch/./} only, $ninja"
else
  grep -E "error|Error" "$OUT/build.log" | head -20 >&2
  tail -30 "$OUT/build.log" >&2
  record build FAILED $(( $(date +%s) - t0 )) "rc=$build_rc, CUDA kernels loaded=${loaded:-no}; see build.log"
  failed=1
fi

# 2. Tests (only with a build).
run_pytest() {  # name, seconds, pytest arguments...
  local name=$1 limit=$2; shift 2
  local t1 rc summary
  t1=$(date +%s)
  (cd "$ROOT" && PYTHONPATH="$ROOT" timeout "$limit" "$PY" -m pytest -q -rfE "$@") > "$OUT/$name.log" 2>&1
  rc=$?
  summary=$(grep -E "^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)" "$OUT/$name.log" | tail -1 | tr -d '=')
  [ "$rc" = "124" ] && summary="TIMED OUT after ${limit} s; ${summary:-no summary}"
  if [ "$rc" = "0" ]; then
    record "$name" OK $(( $(date +%s) - t1 )) "${summary:-?}"
  else
    tail -25 "$OUT/$name.log" >&2
    record "$name" FAILED $(( $(date +%s) - t1 )) "rc=$rc: ${summary:-see $name.log}"
    failed=1
  fi
}
if [ "$failed" = "0" ]; then
  # The tests get what is left after keeping time for the rest (at least 90 s / 60 s).
  run_pytest test_cuda "$(at_least 90 200)" tests/test_cuda.py
  extra=(tests/test_pair_stats.py tests/test_op_contract.py)
  [ -f "$ROOT/tests/test_properties.py" ] && extra+=(tests/test_properties.py)
  run_pytest tests_k_cuda "$(at_least 60 130)" "${extra[@]}" -k cuda
fi

# 3. Benchmark.
if [ "$failed" = "0" ] || [ "${statuses[0]:-}" = "OK" ]; then
  t1=$(date +%s)
  budget=$(at_least 30 20)
  (cd "$ROOT" && PYTHONPATH="$ROOT" timeout "$(( budget + 60 ))" "$PY" benchmarks/gpu_bench.py \
    --time-budget "$budget" --json "$OUT/bench.json") 2>&1 | tee "$OUT/bench.log"
  bench_rc=${PIPESTATUS[0]}
  if [ "$bench_rc" = "0" ]; then
    record bench OK $(( $(date +%s) - t1 )) "fused vs torch.compile(reference): table below"
  else
    record bench FAILED $(( $(date +%s) - t1 )) "rc=$bench_rc; see bench.log"
    failed=1
  fi
fi

# 4. One summary table (stages, then the benchmark's rows), and a JSON of the stages.
total=$(( $(date +%s) - start ))
echo
echo "gpu_check summary: $gpu_name (sm_${arch/./}), torch $torch_version, CUDA $cuda_version, $(nproc) CPUs, ${total} s"
printf '%-14s %-7s %6s  %s\n' stage status seconds detail
printf '%-14s %-7s %6s  %s\n' -------------- ------- ------ ------------------------------------------
for i in "${!names[@]}"; do
  printf '%-14s %-7s %6s  %s\n' "${names[$i]}" "${statuses[$i]}" "${secs[$i]}" "${details[$i]}"
done
if [ -f "$OUT/bench.json" ]; then
  echo
  PYTHONPATH="$ROOT/benchmarks:$ROOT" "$PY" -c '
import json, sys
import gpu_bench
gpu_bench.print_table(json.load(open(sys.argv[1]))["rows"])' "$OUT/bench.json"
fi
{
  printf '{"gpu": "%s", "capability": "%s", "torch": "%s", "cuda": "%s", "total_s": %s, "stages": [' \
    "$gpu_name" "$arch" "$torch_version" "$cuda_version" "$total"
  for i in "${!names[@]}"; do
    [ "$i" -gt 0 ] && printf ', '
    printf '{"stage": "%s", "status": "%s", "seconds": %s, "detail": "%s"}' \
      "${names[$i]}" "${statuses[$i]}" "${secs[$i]}" "${details[$i]//\"/\'}"
  done
  printf '], "bench_json": "%s"}\n' "$([ -f "$OUT/bench.json" ] && echo "$OUT/bench.json")"
} > "$OUT/summary.json"
echo "gpu_check: $([ "$failed" = "0" ] && echo OK || echo FAILED); summary in $OUT/summary.json"
exit "$failed"
