#!/usr/bin/env bash
# The one-command GPU check: verify and measure fastspike on a GPU machine within one
# device call (10 minutes at most), from the source tree, every result in one folder.
#
#   benchmarks/gpu_check.sh --out DIR [--budget SECONDS] [--dry-run]
#
# Steps, in priority order, each under its own time cap (timeout(1)); a step is SKIPPED when
# the budget left (default 540 s, less 20 s kept for the report) is below its minimum:
#   a_build              the extension with its CUDA kernels: setup.py build_ext --inplace,
#                        MAX_JOBS = nproc, TORCH_CUDA_ARCH_LIST = the GPU's compute capability.
#                        A prebuilt fastspike/_C*.so is used instead when it loads under the
#                        installed torch with CUDA kernels (and, where build/gpu_check-extension.json
#                        exists, was built for that torch from these sources). If this fails,
#                        every later step is SKIPPED.
#   b_tests              pytest -m cuda tests: every CUDA test case (JUnit XML)
#   b_equivalence        benchmarks/check_equivalence.py: CUDA kernels == CPU kernels == reference
#                        (on CUDA and on the CPU), bit for bit, every neuron kind, dtype, threshold
#                        layout; gradients within tolerance
#   c_memcheck           tools/sanitize.sh gpu memcheck (the kernel tests' CUDA cases)
#   c_racecheck          tools/sanitize.sh gpu racecheck
#   d_neurons_bandwidth  bench_neurons.py, T=8, N=2^24 2^26, float32 bfloat16, IF/signed/group,
#                        forward: fused, fused_out, eager reference, copy, copy_out
#   d_neurons_compile    bench_neurons.py, T=8, N=2^24, float32 bfloat16, signed, forward+backward
#                        and forward: fused vs eager reference vs torch.compile
#   e_models             bench_models.py: cifar_resnet18 and resnet18 (224 px) at T=4: quantized
#                        ANN, SNN, stepped
#   f_cupy               FASTSPIKE_CUPY=force pytest -m cuda tests/test_cupy_backend.py
#   c_initcheck          tools/sanitize.sh gpu initcheck   (last: only if time is left)
#   c_synccheck          tools/sanitize.sh gpu synccheck
#
# Into DIR go three files: summary.txt (pass/fail per step, the headline numbers against the
# targets), gpu_check.json (every figure, with the device name) and logs.tar.gz (one log per
# step, the raw JSON and JUnit files). The summary is printed at the end too. Exit status: 1 if
# any executed step failed (FAIL, TIMEOUT, or NOGPU), 0 otherwise; 2 for bad arguments.
#
# --dry-run rehearses the same control flow on the CPU (CUDA_VISIBLE_DEVICES=""), in under a
# minute: nothing is compiled (a usable prebuilt extension is required), and every GPU step
# must end NOGPU, i.e. get as far as finding no GPU; it exits 0 when they all do.
#
# Environment: PYTHON (default python3: a GPU box has torch installed and no internet);
# FASTSPIKE_COMMIT (the commit line of the summary; else the first line of a file COMMIT in the
# repository root; else git; else "unknown"); MAX_JOBS, TORCH_CUDA_ARCH_LIST, CUDA_HOME
# (defaults: nproc, the GPU's capability, /usr/local/cuda).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
root=$PWD
PYTHON=${PYTHON:-python3}
RESERVE=20  # seconds kept for the report and the tarball

# name cap min: seconds a step may take at most, and the least worth starting it with
STEPS="
a_build              300  60
b_tests              150  30
b_equivalence        120  20
c_memcheck           120  40
c_racecheck           90  40
d_neurons_bandwidth  100  30
d_neurons_compile    150  45
e_models             150  45
f_cupy                60  20
c_initcheck           90  40
c_synccheck           90  40
"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
out=""
budget=540
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "gpu_check.sh: --out needs a folder" >&2; exit 2; }; out=$2; shift ;;
    --budget)
      [ $# -ge 2 ] && [[ $2 =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: --budget needs a number of seconds" >&2; exit 2; }
      budget=$2; shift ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$out" ] || { echo "gpu_check.sh: --out DIR is required (see --help)" >&2; exit 2; }
if [ "$dry_run" -eq 0 ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check.sh: nvidia-smi not found: this is for a machine with an NVIDIA GPU" \
       "(--dry-run rehearses it on the CPU)" >&2
  exit 2
fi
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
mkdir -p "$work/logs"
: >"$work/steps.tsv"
started=$SECONDS

commit_line() {
  if [ -n "${FASTSPIKE_COMMIT:-}" ]; then
    echo "$FASTSPIKE_COMMIT"
  elif [ -s COMMIT ]; then
    head -n 1 COMMIT
  elif git rev-parse --verify -q HEAD >/dev/null 2>&1; then
    local dirty=""
    git diff --quiet HEAD 2>/dev/null || dirty=" (with local changes)"
    echo "$(git rev-parse HEAD)$dirty"
  else
    echo "unknown"
  fi
}

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # benchmarks/*.py import fastspike from this tree
export PYTHONUNBUFFERED=1
export FASTSPIKE_JIT=0  # a library that fails to load must fail the steps, not start a JIT build
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export FASTSPIKE_FORCE_CUDA=1
dry_flag=()
if [ "$dry_run" -eq 1 ]; then
  export CUDA_VISIBLE_DEVICES=""
  dry_flag=(--dry-run)
  arch=""
else
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
fi
make_arch=$(sed -n 's/^TORCH_CUDA_ARCH_LIST ?= *//p' Makefile 2>/dev/null | head -n 1)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-${arch:-${make_arch:-8.0;9.0+PTX}}}

# record NAME STATE SECONDS CAP RC NOTE KIND ARTIFACT: one line of steps.tsv
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$work/steps.tsv"; }
cap_of() { awk -v n="$1" '$1 == n { print $2 }' <<<"$STEPS"; }
min_of() { awk -v n="$1" '$1 == n { print $3 }' <<<"$STEPS"; }
stop_reason=""

# run_step NAME KIND ARTIFACT CMD...: CMD under the step's cap, its output in logs/NAME.log.
# KIND tells the report how to read the outcome: cmd, pytest (ARTIFACT: the JUnit file) or
# sanitizer (tools/sanitize.sh's exit codes).
run_step() {
  local name=$1 kind=$2 artifact=$3
  shift 3
  local cap min left limit t0 rc=0
  cap=$(cap_of "$name")
  min=$(min_of "$name")
  left=$((budget - (SECONDS - started) - RESERVE))
  if [ -n "$stop_reason" ]; then
    record "$name" skipped 0 "$cap" "" "$stop_reason" "$kind" "$artifact"
    echo "-- $name: SKIPPED ($stop_reason)"
    return
  fi
  if [ "$left" -lt "$min" ]; then
    record "$name" skipped 0 "$cap" "" "budget: $left s left, needs $min s" "$kind" "$artifact"
    echo "-- $name: SKIPPED (budget: $left s left, needs $min s)"
    return
  fi
  limit=$((cap < left ? cap : left))
  echo "== $name (cap $limit s): $*"
  t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$work/logs/$name.log" 2>&1 || rc=$?
  record "$name" ran $((SECONDS - t0)) "$limit" "$rc" "" "$kind" "$artifact"
  echo "   $name: exit $rc after $((SECONDS - t0)) s"
}

# a: the extension (reused when usable; never compiled in a dry run)
t0=$SECONDS
if timeout 120 "$PYTHON" benchmarks/gpu_check_report.py extension >"$work/logs/a_extension_check.log" 2>&1; then
  record a_build ran $((SECONDS - t0)) "$(cap_of a_build)" 0 "$(tail -n 1 "$work/logs/a_extension_check.log")" build ""
  echo "== a_build: $(tail -n 1 "$work/logs/a_extension_check.log")"
elif [ "$dry_run" -eq 1 ]; then
  record a_build ran $((SECONDS - t0)) "$(cap_of a_build)" 1 \
    "no usable prebuilt extension ($(tail -n 1 "$work/logs/a_extension_check.log")); a dry run does not build" build ""
  stop_reason="no extension"
else
  echo "   no usable prebuilt extension: $(tail -n 1 "$work/logs/a_extension_check.log")"
  run_step a_build build "" bash -c '"$1" setup.py build_ext --inplace && "$1" benchmarks/gpu_check_report.py record-build &&
    "$1" benchmarks/gpu_check_report.py extension' _ "$PYTHON"
  if ! tail -n 1 "$work/steps.tsv" | awk -F'\t' '$2 == "ran" && $5 == 0 { ok = 1 } END { exit !ok }'; then
    stop_reason="no extension (the build failed or did not fit)"
  fi
fi
timeout 120 "$PYTHON" benchmarks/gpu_check_report.py info --out "$work/info.json" --commit "$(commit_line)" \
  --budget "$budget" "${dry_flag[@]}" >"$work/logs/info.log" 2>&1 ||
  echo "   (device information incomplete: see logs/info.log)"

# b: correctness on the GPU
# --continue-on-collection-errors: a module that cannot be imported there (a missing test
# dependency) is reported as an error with its name, and every other CUDA case still runs.
run_step b_tests pytest tests.xml "$PYTHON" -m pytest -q -rs -p no:cacheprovider -m cuda tests \
  --continue-on-collection-errors --junitxml="$work/tests.xml"
run_step b_equivalence cmd equivalence.json "$PYTHON" benchmarks/check_equivalence.py --device cuda \
  --out "$work/equivalence.json"
# c: the sanitizers that matter most (initcheck and synccheck at the end, if time is left)
run_step c_memcheck sanitizer "" env PYTHON="$PYTHON" bash tools/sanitize.sh gpu memcheck
run_step c_racecheck sanitizer "" env PYTHON="$PYTHON" bash tools/sanitize.sh gpu racecheck
# d: the neuron operator's speed
run_step d_neurons_bandwidth cmd neurons_bandwidth.json "$PYTHON" benchmarks/bench_neurons.py --device cuda \
  --T 8 --N 24 26 --dtypes float32 bfloat16 --kinds signed if group --directions forward \
  --contenders fused fused_out reference copy copy_out --rounds 5 --min-time 0.05 \
  --out "$work/neurons_bandwidth.json"
run_step d_neurons_compile cmd neurons_compile.json "$PYTHON" benchmarks/bench_neurons.py --device cuda \
  --T 8 --N 24 --dtypes float32 bfloat16 --kinds signed --directions forward_backward forward \
  --contenders fused reference compiled --rounds 5 --min-time 0.05 --out "$work/neurons_compile.json"
# e: whole converted networks
run_step e_models cmd models.json "$PYTHON" benchmarks/bench_models.py --device cuda \
  --models cifar_resnet18 resnet18 --T 4 --contenders ann snn stepped --no-plot --out "$work/models.json"
# f: the CuPy/NVRTC kernels
run_step f_cupy pytest cupy.xml env FASTSPIKE_CUPY=force "$PYTHON" -m pytest -q -rs -p no:cacheprovider -m cuda \
  tests/test_cupy_backend.py --junitxml="$work/cupy.xml"
run_step c_initcheck sanitizer "" env PYTHON="$PYTHON" bash tools/sanitize.sh gpu initcheck
run_step c_synccheck sanitizer "" env PYTHON="$PYTHON" bash tools/sanitize.sh gpu synccheck

# The report, then the logs in one tarball (a log over 4 MB keeps its first 1 MB and last 3 MB).
status=0
"$PYTHON" benchmarks/gpu_check_report.py report --work "$work" --out "$out" "${dry_flag[@]}" || status=$?
for log in "$work"/logs/*.log; do
  if [ "$(stat -c %s "$log")" -gt 4194304 ]; then
    { head -c 1048576 "$log"; printf '\n[... truncated by gpu_check.sh ...]\n'; tail -c 3145728 "$log"; } >"$log.cut"
    mv "$log.cut" "$log"
  fi
done
tar -czf "$out/logs.tar.gz" -C "$work" . || status=1
rm -rf "$work"
echo "gpu_check.sh: results in $out ($((SECONDS - started)) s)"
exit "$status"
