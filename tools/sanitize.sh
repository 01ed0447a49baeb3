#!/usr/bin/env bash
# Sanitizer runs of the fastspike operators (README "Reliability").
#
#   tools/sanitize.sh [cpu]   build the CPU operator library with AddressSanitizer
#                             + UndefinedBehaviorSanitizer into build/sanitize/ and
#                             run the operator and converter tests against it
#   tools/sanitize.sh gpu [TOOL...]
#                             run the CUDA test cases (`pytest -m cuda`) of the
#                             kernel tests under compute-sanitizer: memcheck,
#                             racecheck, initcheck and synccheck, or the TOOLs
#                             named (needs a GPU and the extension built with its
#                             CUDA kernels; exits 3 without a GPU)
#   tools/sanitize.sh all     both (the GPU part only where a GPU is present)
#   tools/sanitize.sh build   only build the sanitized library
#
# The sanitized library is a separate file (never fastspike/_C*.so); the tests
# load it through FASTSPIKE_LIBRARY, and the run first checks that it really is
# the library fastspike uses. No suppressions for project code: any report
# aborts the run (halt_on_error, -fno-sanitize-recover=undefined).
# Environment: PYTHON (default .venv/bin/python), MAX_JOBS (parallel compiles,
# default 2), SANITIZE_DIR (default build/sanitize), PYTEST_ARGS (extra args).
#
# Exit status of the GPU runs: 0 every tool clean; 86 a sanitizer reported an
# error (compute-sanitizer's --error-exitcode, distinct from pytest's codes);
# 1 no sanitizer error but test cases failed (or another tool failure); 3 no GPU.
# Every tool runs even after another failed, with one line per tool:
# "sanitize: <tool> clean|ERRORS|TESTS FAILED ...".
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
SANITIZE_DIR=${SANITIZE_DIR:-build/sanitize}
MAX_JOBS=${MAX_JOBS:-2}
MODE=${1:-cpu}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}  # where torch should look (docs/design.md §4)
LIB="$SANITIZE_DIR/libfastspike_sanitized.so"
# The operator and converter tests (what exercises csrc/), plus the fuzz and
# hardening tests. Two kinds skip themselves via FASTSPIKE_SANITIZED: the >2^31
# element tensors (instrumented, several times slower, on 9 GB) and the
# resident-memory test (ASan's quarantine keeps freed memory on purpose).
CPU_TESTS="tests/test_forward.py tests/test_backward.py tests/test_errors.py tests/test_semantics.py
tests/test_convert.py tests/test_fuzz.py tests/test_hardening.py"
# The kernel tests with CUDA cases; `-m cuda` selects exactly those (the
# CPU emulations of the CUDA grid, test_cuda_*_on_cpu_grid, are not re-run
# under the sanitizer for nothing). test_cupy_backend.py: the NVRTC kernels.
CUDA_TESTS="tests/test_forward.py tests/test_backward.py tests/test_errors.py tests/test_semantics.py
tests/test_fusion.py tests/test_cupy_backend.py"
SANITIZER_ERROR=86
SAN_FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"

build_sanitized() {
  mkdir -p "$SANITIZE_DIR"
  # Sources and flags from fastspike/_build.py (the ones setup.py and the JIT
  # build use), loaded by path so that importing it loads no operator library.
  local vars
  vars=$("$PYTHON" - <<'PY'
import importlib.util, shlex, torch
from torch.utils import cpp_extension
spec = importlib.util.spec_from_file_location("_build", "fastspike/_build.py")
b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
std = "c++20" if tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 13) else "c++17"
inc = " ".join("-isystem " + shlex.quote(p) for p in cpp_extension.include_paths())
libdir = cpp_extension.library_paths()[0]
print("SOURCES=" + shlex.quote(" ".join(b.sources(False, python_module=False))))
print("CXXFLAGS=" + shlex.quote(" ".join(b.compile_flags(False)["cxx"]) +
      f" -std={std} -fPIC -D_GLIBCXX_USE_CXX11_ABI={abi} {inc}"))
print("TORCH_LIBDIR=" + shlex.quote(libdir))
PY
)
  eval "$vars"
  local stamp="$SANITIZE_DIR/flags"
  local want="$CXXFLAGS $SAN_FLAGS"
  if [[ -f "$LIB" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]] &&
     [[ -z "$(find csrc fastspike/_build.py tools/sanitize.sh -newer "$LIB" -print -quit)" ]]; then
    echo "sanitize: $LIB is up to date"
    return
  fi
  echo "sanitize: compiling $(wc -w <<<"$SOURCES") sources with $SAN_FLAGS"
  local objects=()
  for src in $SOURCES; do objects+=("$SANITIZE_DIR/$(basename "${src%.cpp}").o"); done
  # shellcheck disable=SC2086,SC2016  # word splitting intended; $1.. expand in the inner sh
  printf '%s\n' $SOURCES | xargs -P "$MAX_JOBS" -I{} sh -c \
    'g++ -c "$1" -o "$2/$(basename "${1%.cpp}").o" $3' _ {} "$SANITIZE_DIR" "$CXXFLAGS $SAN_FLAGS"
  # shellcheck disable=SC2086
  g++ -shared -o "$LIB" "${objects[@]}" $SAN_FLAGS -fopenmp \
    -L"$TORCH_LIBDIR" -Wl,-rpath,"$TORCH_LIBDIR" -lc10 -ltorch_cpu
  echo "$want" >"$stamp"
}

run_cpu() {
  local start=$SECONDS
  build_sanitized
  local built=$((SECONDS - start))
  # Instrumented, not merely linked: the compiler inserted ASan checks and UBSan handlers.
  # (The symbol list is read whole first: `nm | grep -q` under pipefail fails
  # whenever grep exits early and nm dies of SIGPIPE.)
  local symbols
  symbols=$(nm -D "$LIB")
  grep -q "__asan_report_load" <<<"$symbols" || { echo "sanitize: $LIB has no ASan checks" >&2; exit 1; }
  grep -q "__ubsan_handle" <<<"$symbols" || { echo "sanitize: $LIB has no UBSan checks" >&2; exit 1; }
  local asan_rt cxx_rt
  asan_rt=$(gcc -print-file-name=libasan.so)
  cxx_rt=$(gcc -print-file-name=libstdc++.so)
  [[ -f "$asan_rt" ]] || { echo "sanitize: no ASan runtime ($asan_rt)" >&2; exit 1; }
  # detect_leaks=0: CPython (and torch's global registries) deliberately never
  # free interpreter-lifetime objects, so LeakSanitizer reports them at exit;
  # leaks of the operators are measured by tests/test_hardening.py instead.
  # libstdc++ preloaded with it: ASan resolves the real __cxa_throw when it
  # starts, and python itself does not link libstdc++, so without it the first
  # C++ exception (any TORCH_CHECK) dies in ASan's interceptor instead of
  # reaching Python (the known google/sanitizers issue with dlopen-ed C++).
  export LD_PRELOAD="$asan_rt:$cxx_rt"
  export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
  export FASTSPIKE_LIBRARY="$PWD/$LIB" FASTSPIKE_SANITIZED=1
  # Every output its own exact-size allocation: the huge-page blocks are rounded
  # up to 2 MB and reused, which would hide a write past an output's end.
  export FASTSPIKE_HUGE_PAGES=0
  "$PYTHON" - <<'PY'
import os, fastspike
info = fastspike.backend_info()
want = os.environ["FASTSPIKE_LIBRARY"]
assert info["backend"] == "extension" and info["source"] == "library", info
assert os.path.samefile(info["library"], want), (info["library"], want)
maps = open("/proc/self/maps").read()
assert "libasan" in maps and want in maps, "the ASan runtime or the sanitized library is not mapped"
assert "fastspike/_C" not in maps, "the prebuilt fastspike._C was loaded as well"
print(f"sanitize: fastspike runs {info['library']} (ASan runtime preloaded)")
PY
  # shellcheck disable=SC2086
  "$PYTHON" -m pytest -q -p no:cacheprovider $CPU_TESTS ${PYTEST_ARGS:-}
  echo "sanitize: CPU run clean in $((SECONDS - start)) s (build $built s)"
}

gpu_present() {
  # No driver tool or no visible device: no GPU, without the seconds of importing torch.
  command -v nvidia-smi >/dev/null 2>&1 && [[ ${CUDA_VISIBLE_DEVICES-unset} != "" ]] || return 1
  "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"
}

run_gpu() {
  local tools=("$@") tool
  [[ ${#tools[@]} -gt 0 ]] || tools=(memcheck racecheck initcheck synccheck)
  for tool in "${tools[@]}"; do
    case "$tool" in
      memcheck|racecheck|initcheck|synccheck) ;;
      *) echo "sanitize: unknown compute-sanitizer tool '$tool' (memcheck, racecheck, initcheck, synccheck)" >&2
         return 2 ;;
    esac
  done
  local cs
  cs=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  if ! gpu_present; then
    echo "sanitize: no GPU (no nvidia-smi, CUDA_VISIBLE_DEVICES empty, or torch sees none): no compute-sanitizer run" >&2
    return 3
  fi
  [[ -x "$cs" ]] || { echo "sanitize: compute-sanitizer not found ($cs)" >&2; return 1; }
  # Every tensor its own cudaMalloc, so that memcheck sees an access past a
  # tensor's end instead of landing in the caching allocator's pool.
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  local start status worst=0
  for tool in "${tools[@]}"; do
    start=$SECONDS
    local extra=()
    # racecheck checks shared memory, which the kernels do not use today: it
    # guards the day they do. No --leak-check: torch keeps allocations (the
    # CUDA context, library workspaces) alive at exit by design; host-side
    # leaks are measured by tests/test_hardening.py.
    [[ $tool == racecheck ]] && extra=(--racecheck-report all)
    # --kernel-name kns=neuron: check only the fastspike kernels (the mangled
    # names contain "neuron"), not torch's own, which initcheck would flag for
    # padding reads it does on purpose.
    status=0
    # shellcheck disable=SC2086
    "$cs" --tool "$tool" "${extra[@]}" --kernel-name kns=neuron --error-exitcode "$SANITIZER_ERROR" \
      --target-processes all \
      "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda --continue-on-collection-errors $CUDA_TESTS \
      ${PYTEST_ARGS:-} || status=$?
    if [[ $status -eq 0 ]]; then
      echo "sanitize: $tool clean ($((SECONDS - start)) s)"
    elif [[ $status -eq $SANITIZER_ERROR ]]; then
      echo "sanitize: $tool ERRORS: compute-sanitizer reported errors ($((SECONDS - start)) s)"
      worst=$SANITIZER_ERROR
    else
      echo "sanitize: $tool TESTS FAILED: pytest exit $status, no sanitizer error ($((SECONDS - start)) s)"
      [[ $worst -eq $SANITIZER_ERROR ]] || worst=1
    fi
  done
  return "$worst"
}

case "$MODE" in
  cpu) run_cpu ;;
  gpu) shift; run_gpu "$@" ;;
  all) run_cpu; if gpu_present; then run_gpu; else echo "sanitize: no GPU, no compute-sanitizer run"; fi ;;
  build) build_sanitized ;;
  *) echo "usage: $0 [cpu | gpu [TOOL...] | all | build]" >&2; exit 2 ;;
esac
