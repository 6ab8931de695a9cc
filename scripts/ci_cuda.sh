#!/usr/bin/env bash
# CUDA stage of CI: compile and link mmim_ext against a CUDA build of torch, import it from
# outside the source tree, and check that every op with a CPU kernel also has a CUDA kernel.
# Nothing CUDA runs (no GPU is needed or queried); a .cu file that fails to compile fails CI.
#
# Environment:
#   MMIM_EXT_CI_CUDA=0       skip this stage (exit 0)
#   MMIM_EXT_CI_CUDA_TORCH   torch version to build against (default 2.14.1, a CUDA 13 build)
#   MMIM_EXT_CI_CUDA_VENV    venv to use or create (default <repo>/.venv-cuda; reused when present)
#   CUDA_HOME                CUDA toolkit (default /usr/local/cuda-13.0 when it exists)
#   TORCH_CUDA_ARCH_LIST     unset -> setup.py's default (8.0;9.0+PTX)
#   MAX_JOBS                 parallel compile jobs (default 2)
#   NVCC_APPEND_FLAGS        read by nvcc itself, e.g. "-Xptxas -v" for the resource report
#
# `ci_cuda.sh --venv-only` prepares the venv (step 1) and stops: .ci/run starts it in the
# background while the CPU stage runs, so that the ~1.5 min install overlaps that stage.
set -euo pipefail

venv_only=0
case "${1:-}" in
  "") ;;
  --venv-only) venv_only=1 ;;
  *) echo "ci_cuda: unknown argument '$1' (expected nothing or --venv-only)" >&2; exit 2 ;;
esac

if [ "${MMIM_EXT_CI_CUDA:-1}" = "0" ]; then
  echo "ci_cuda: skipped (MMIM_EXT_CI_CUDA=0)"
  exit 0
fi

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TORCH_VERSION="${MMIM_EXT_CI_CUDA_TORCH:-2.14.1}"
VENV="${MMIM_EXT_CI_CUDA_VENV:-$ROOT/.venv-cuda}"
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda-13.0 ]; then
  CUDA_HOME=/usr/local/cuda-13.0
fi
: "${CUDA_HOME:?ci_cuda: set CUDA_HOME to a CUDA toolkit}"
export CUDA_HOME
export MAX_JOBS="${MAX_JOBS:-2}"
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "ci_cuda: no nvcc at $CUDA_HOME/bin/nvcc" >&2; exit 1; }

t0=$(date +%s)
stamp() { echo "ci_cuda: $1 ($(( $(date +%s) - t0 )) s so far)"; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/mmim_ci_cuda.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# 1. venv with the CUDA build of torch.
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" numpy setuptools wheel ninja
"$VENV/bin/python" - <<EOF
import torch
assert torch.__version__.split("+")[0] == "$TORCH_VERSION", torch.__version__
assert torch.version.cuda is not None, "ci_cuda: torch $TORCH_VERSION in $VENV is not a CUDA build"
print(f"ci_cuda: torch {torch.__version__} (CUDA {torch.version.cuda})")
EOF
t_venv=$(date +%s)
stamp "venv ready"
if [ "$venv_only" = "1" ]; then
  exit 0
fi

# 2. A copy of the tree (tracked and untracked-but-not-ignored files: no venvs, builds, .so).
mkdir -p "$WORK/src"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$WORK/src"
else
  tar -C "$ROOT" --exclude='./.venv*' --exclude='./build' --exclude='*.so' --exclude='./.git' -cf - . | tar -xf - -C "$WORK/src"
fi
ls "$WORK/src/csrc/cuda/"*.cu >/dev/null 2>&1 || { echo "ci_cuda: no csrc/cuda/*.cu in the tree" >&2; exit 1; }

# 3. Build with the CUDA extension (FORCE_CUDA: never guess from a GPU).
echo "ci_cuda: building with CUDA_HOME=$CUDA_HOME MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<setup.py default>}"
build_start=$(date +%s)
(cd "$WORK/src" && PATH="$CUDA_HOME/bin:$PATH" FORCE_CUDA=1 \
  "$VENV/bin/python" -m pip install --no-build-isolation --no-deps -v . > "$WORK/build.log" 2>&1) || {
  echo "ci_cuda: BUILD FAILED; last 80 lines of the log:" >&2
  grep -E "error|Error|FAILED" "$WORK/build.log" | head -40 >&2 || true
  tail -80 "$WORK/build.log" >&2
  exit 1
}
build_end=$(date +%s)
echo "ci_cuda: build (compile + link, all sources) took $(( build_end - build_start )) s"
grep -E "ptxas info|bytes stack frame" "$WORK/build.log" > "$WORK/ptxas.txt" || true
if [ -s "$WORK/ptxas.txt" ]; then
  echo "ci_cuda: ptxas resource report per kernel (NVCC_APPEND_FLAGS=${NVCC_APPEND_FLAGS:-})"
  "$VENV/bin/python" - "$WORK/ptxas.txt" <<'EOF'
import re
import sys

rows, cur = [], None
for line in open(sys.argv[1]):
    m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
    if m:
        name = m.group(1)
        # Readable name: the kernel's identifier and its first template argument (f/d).
        k = re.search(r"\d([a-z][a-z_]*_kernel)(?:I([a-z])(?:Lb([01])E)?)?", name)
        label = name
        if k is not None:
            targs = [{"f": "float", "d": "double"}.get(k.group(2), k.group(2))] if k.group(2) else []
            targs += [("false", "true")[int(k.group(3))]] if k.group(3) else []
            label = k.group(1) + (f"<{', '.join(targs)}>" if targs else "")
        cur = {"kernel": label, "arch": m.group(2), "regs": "?", "smem": "0", "stack": "0", "spill_st": "0", "spill_ld": "0"}
        rows.append(cur)
        continue
    if cur is None:
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m:
        cur["stack"], cur["spill_st"], cur["spill_ld"] = m.groups()
    m = re.search(r"Used (\d+) registers", line)
    if m:
        cur["regs"] = m.group(1)
        sm = re.search(r"(\d+) bytes smem", line)
        cur["smem"] = sm.group(1) if sm else "0"
print(f"{'kernel':34s} {'arch':6s} {'regs':>5s} {'smem B':>7s} {'stack B':>8s} {'spill st/ld B':>14s}")
for r in rows:
    print(f"{r['kernel']:34s} {r['arch']:6s} {r['regs']:>5s} {r['smem']:>7s} {r['stack']:>8s} {r['spill_st'] + '/' + r['spill_ld']:>14s}")
EOF
fi

# 4. Import from outside the source tree and check the registrations.
mkdir -p "$WORK/run"
check_rc=0
(cd "$WORK/run" && "$VENV/bin/python" - <<'EOF'
import os
import sys

import torch

import mmim_ext
from mmim_ext import _extension

here = os.path.dirname(os.path.abspath(mmim_ext.__file__))
assert "site-packages" in here, f"mmim_ext imported from the source tree: {here}"
assert _extension.extension_loaded(), f"mmim_ext._C did not load: {_extension.load_error()}"
import mmim_ext._C as C

schemas = [s for s in torch._C._jit_get_all_schemas() if s.name.startswith("mmim_ext::")]
names = sorted({s.name for s in schemas})
assert names, "no mmim_ext ops are registered"
failures, checked = [], []
for s in sorted(schemas, key=lambda s: s.name):
    # Ops with no tensor arguments (e.g. cpu_capability) are CompositeImplicit: no device kernel.
    has_tensor = any("Tensor" in str(a.type) for a in s.arguments)
    if not has_tensor:
        print(f"ci_cuda: {s.name}: no tensor arguments, skipped")
        continue
    cpu = torch._C._dispatch_has_kernel_for_dispatch_key(s.name, "CPU")
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key(s.name, "CUDA")
    checked.append(s.name)
    print(f"ci_cuda: {s.name}: CPU={cpu} CUDA={cuda}")
    if not cpu or not cuda:
        failures.append(s.name)
print(f"ci_cuda: extension {C.__file__}")
print(f"ci_cuda: torch.cuda.is_available() = {torch.cuda.is_available()} (not required)")
if failures:
    sys.exit(f"ci_cuda: ops missing a CPU or CUDA kernel: {failures}")
print(f"ci_cuda: all {len(checked)} tensor ops have CPU and CUDA kernels")
EOF
) || check_rc=$?
end=$(date +%s)
echo "ci_cuda: timings: venv $(( t_venv - t0 )) s, build $(( build_end - build_start )) s, total $(( end - t0 )) s"
if [ "$check_rc" != "0" ]; then
  echo "ci_cuda: FAILED (registration check)" >&2
  exit "$check_rc"
fi
echo "ci_cuda: OK"
