#!/usr/bin/env bash
# Verify and measure fastspike on a GPU machine in one command, from the source tree:
#
#   benchmarks/gpu_check.sh [--quick] [--skip-build] [--out DIR]
#
# 1. builds the extension with its CUDA kernels (pip install -e . --no-build-isolation,
#    FASTSPIKE_FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST as in the Makefile) with $PYTHON
#    (default python3: a GPU box has torch installed and no internet);
# 2. runs the whole test suite (the tests taking a `device` run their CUDA cases);
# 3. runs the benchmarks on CUDA: bench_neurons.py, bench_models.py, any other
#    benchmarks/bench_*.py (e.g. bench_training.py), one profile_kernels.py configuration
#    and its Chrome trace of a converted CIFAR ResNet-18 forward.
#
# Everything goes under one folder named after the GPU (nvidia-smi --query-gpu=name),
# default benchmarks/results/gpu-check-<gpu-name>/: build.log, info.json, tests.log and
# tests.xml (JUnit), one .json/.log (and .png) per benchmark, summary.txt. A failing step
# does not stop the later ones (so one run still measures what works), but the script
# exits non-zero when any step failed; a failed build stops it at once.
#
# --quick: the benchmarks' --quick presets (minutes); without it bench_models.py's full set
# and a bench_neurons.py grid of T 1 4 8 32, N 2^16 2^20 2^24, float32/float16, forward and
# forward+backward, without torch.compile. Extra arguments per benchmark (word-split, after
# the defaults, so they override them): BENCH_NEURONS_ARGS, BENCH_MODELS_ARGS, PYTEST_ARGS.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PYTHON=${PYTHON:-python3}
quick=0
skip_build=0
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --skip-build) skip_build=1 ;;
    --out) out=${2:?--out needs a folder}; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check.sh: nvidia-smi not found: this script is for a machine with an NVIDIA GPU" >&2
  exit 2
fi
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
gpu_slug=$(printf '%s' "$gpu_name" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
out=${out:-benchmarks/results/gpu-check-${gpu_slug:-gpu}}
mkdir -p "$out"
out=$(cd "$out" && pwd)

# The same architectures as `make` (Makefile: TORCH_CUDA_ARCH_LIST ?= ...).
make_arch=$(sed -n 's/^TORCH_CUDA_ARCH_LIST ?= *//p' Makefile | head -n 1)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-${make_arch:-8.0;9.0+PTX}}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export FASTSPIKE_FORCE_CUDA=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1

failed=()
summary="$out/summary.txt"
{
  echo "fastspike gpu_check on: $gpu_name"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git diff --quiet 2>/dev/null || echo '(with local changes)')"
  echo "python: $PYTHON; TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST; quick=$quick"
} >"$summary"

# step NAME LOG CMD...: runs CMD with output to LOG (and the terminal), records pass/fail.
step() {
  local name=$1 log=$2
  shift 2
  echo "== $name: $*"
  local started=$SECONDS status
  "$@" 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  if [ "$status" -eq 0 ]; then
    echo "PASS  $name ($((SECONDS - started)) s)" | tee -a "$summary"
  else
    echo "FAIL  $name (exit $status, $((SECONDS - started)) s, see $log)" | tee -a "$summary"
    failed+=("$name")
  fi
  return "$status"
}

if [ "$skip_build" -eq 0 ]; then
  if ! step build "$out/build.log" "$PYTHON" -m pip install --no-build-isolation --no-deps -e .; then
    echo "gpu_check.sh: the build failed, nothing else to check" | tee -a "$summary" >&2
    exit 1
  fi
fi

step info "$out/info.log" "$PYTHON" -c "
import json, sys, torch, fastspike
info = fastspike.backend_info()
info['gpu'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
json.dump(info, open(sys.argv[1], 'w'), indent=1)
print(json.dumps(info, indent=1))
assert info['backend'] == 'extension' and info['cuda_kernels'] and info['cuda_available'], 'no CUDA kernels'
" "$out/info.json"

# shellcheck disable=SC2086  # PYTEST_ARGS is a list of words on purpose
step tests "$out/tests.log" "$PYTHON" -m pytest -q -rs tests --junitxml="$out/tests.xml" ${PYTEST_ARGS:-}
# The CUDA op tests under compute-sanitizer (memcheck, racecheck, initcheck, synccheck).
if [ "$quick" -eq 0 ]; then
  step sanitize_gpu "$out/sanitize_gpu.log" env PYTHON="$PYTHON" bash tools/sanitize.sh gpu
fi

if [ "$quick" -eq 1 ]; then
  neurons_args=(--quick)
  models_args=(--quick)
else
  # A GPU grid that takes minutes (the script's full default grid, with a torch.compile per
  # configuration, takes hours); BENCH_NEURONS_ARGS can widen it.
  neurons_args=(--T 1 4 8 32 --N 16 20 24 --dtypes float32 float16 --directions forward forward_backward
                --contenders fused fused_out reference seed copy copy_out)
  models_args=()
fi
# shellcheck disable=SC2086
step bench_neurons "$out/bench_neurons.log" "$PYTHON" benchmarks/bench_neurons.py --device cuda \
  "${neurons_args[@]}" --out "$out/neurons.json" ${BENCH_NEURONS_ARGS:-}
# shellcheck disable=SC2086
step bench_models "$out/bench_models.log" "$PYTHON" benchmarks/bench_models.py --device cuda \
  "${models_args[@]}" --out "$out/models.json" ${BENCH_MODELS_ARGS:-}

# Any other benchmark that appears (bench_training.py, ...): --device cuda, its JSON via --out
# when it takes one, --quick in quick mode when it takes one.
for script in benchmarks/bench_*.py; do
  base=$(basename "$script" .py)
  case "$base" in bench_neurons|bench_models) continue ;; esac
  help=$("$PYTHON" "$script" --help 2>/dev/null || true)
  args=()
  case "$help" in *--device*) args+=(--device cuda) ;; esac
  case "$help" in *--out*) args+=(--out "$out/${base#bench_}.json") ;; esac
  if [ "$quick" -eq 1 ]; then case "$help" in *--quick*) args+=(--quick) ;; esac; fi
  step "$base" "$out/$base.log" "$PYTHON" "$script" "${args[@]}"
done

step profile_kernel "$out/profile_kernel.log" "$PYTHON" benchmarks/profile_kernels.py --device cuda \
  --op signed --T 8 --N 2^24 --dtype float32 --direction forward --iters 20
step profile_trace "$out/profile_trace.log" "$PYTHON" benchmarks/profile_kernels.py --device cuda \
  --trace "$out/trace-model-forward.json" --model cifar_resnet18 --T 4 --batch 32

echo "results in $out" | tee -a "$summary"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "gpu_check.sh: FAILED steps: ${failed[*]}" | tee -a "$summary" >&2
  exit 1
fi
echo "gpu_check.sh: all steps passed" | tee -a "$summary"
