"""The build: the compiled extension is what runs, its CUDA kernels were
compiled in wherever nvcc was found, the kernel source compiles under NVRTC,
and the JIT and CMake builds produce working operator libraries."""

import ctypes
import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import fastspike
from fastspike import cupy_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
NVCC = os.path.join(CUDA_HOME, "bin", "nvcc")


def run_python(code: str, env_extra: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_backend_is_the_compiled_extension():
    info = fastspike.backend_info()
    if os.environ.get("FASTSPIKE_BACKEND"):
        pytest.skip("FASTSPIKE_BACKEND overrides the choice")
    assert info["backend"] == "extension", info["reason"]
    assert info["source"] == "prebuilt"
    assert os.path.exists(info["library"])


@pytest.mark.skipif(
    not (os.path.exists(NVCC) and torch.version.cuda) or os.environ.get("FASTSPIKE_USE_CUDA") == "0",
    reason="no nvcc or a CPU-only torch: the CUDA kernels are not expected",
)
def test_cuda_kernels_are_compiled_in_when_nvcc_is_found():
    info = fastspike.backend_info()
    assert info["cuda_kernels"], f"nvcc at {NVCC} but the library has no CUDA kernels: {info}"
    for op in ("neuron_forward", "neuron_forward.out", "neuron_backward_surrogate", "neuron_backward_rate"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastspike::{op}", "CUDA"), op


def load_nvrtc():
    """NVRTC from the nvidia-cuda-nvrtc wheel torch depends on, or the toolkit's."""
    candidates = glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "*", "lib", "libnvrtc.so*"))
    candidates += glob.glob(os.path.join(CUDA_HOME, "lib64", "libnvrtc.so*"))
    libs = [c for c in candidates if "alt" not in os.path.basename(c) and "builtins" not in c]
    if not libs:
        pytest.skip("NVRTC is not installed")
    folder = os.path.dirname(libs[0])
    for builtins in glob.glob(os.path.join(folder, "libnvrtc-builtins.so*")):
        if "alt" not in os.path.basename(builtins):
            ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)  # NVRTC dlopens it by name
    return ctypes.CDLL(libs[0])


def nvrtc_compile(source: str, options, name_expressions=()):
    """Compiles with NVRTC (as CuPy's RawModule does, with name expressions for
    template instantiations); returns (status, log, PTX, lowered names)."""
    nvrtc = load_nvrtc()
    prog = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"neuron.cu", 0, None, None) == 0
    for name in name_expressions:
        assert nvrtc.nvrtcAddNameExpression(prog, name.encode()) == 0
    opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    status = nvrtc.nvrtcCompileProgram(prog, len(options), opts)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    ptx, lowered = "", {}
    if status == 0:
        nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetPTX(prog, buf)
        ptx = buf.value.decode()
        for name in name_expressions:
            out = ctypes.c_char_p()
            assert nvrtc.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(out)) == 0
            lowered[name] = out.value.decode()
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return status, log.value.decode(), ptx, lowered


FORWARD_KERNELS = r'''
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define FASTSPIKE_FORWARD(NAME, SCALAR, ACC, SIGNED, GROUP, VEC)                          \
  extern "C" __global__ void NAME(fastspike::ForwardArgs<SCALAR, ACC> a, long long n) {      \
    const long long stride = (long long)blockDim.x * gridDim.x;                             \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride) \
      fastspike::forward_element<SCALAR, ACC, SIGNED, GROUP, VEC>(i, a);                    \
  }
FASTSPIKE_FORWARD(forward_f32_signed_group, float, float, true, 0, 4)
FASTSPIKE_FORWARD(forward_f64_if, double, double, false, 1, 1)
FASTSPIKE_FORWARD(forward_f16_signed, __half, float, true, 1, 4)
FASTSPIKE_FORWARD(forward_bf16_group, __nv_bfloat16, float, false, 0, 1)
'''

BACKWARD_KERNELS = r'''
extern "C" __global__ void backward_f32(fastspike::SurrogateBackwardArgs<float, float> a) {
  const long long n = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (n < a.neurons) fastspike::surrogate_backward_element<float, float, true, 0>(n, a);
}
extern "C" __global__ void rate_f32(fastspike::RateBackwardArgs<float, float> a) {
  const long long n = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (n < a.neurons) fastspike::rate_backward_element<float, float>(n, a);
}
'''


def test_kernel_source_compiles_under_nvrtc():
    header = cupy_backend.device_source(os.path.join(ROOT, "csrc"))
    include = os.path.join(CUDA_HOME, "include")
    status, log, ptx, _ = nvrtc_compile(header + FORWARD_KERNELS + BACKWARD_KERNELS,
                                     ["-arch=compute_90", f"-I{include}", "--fmad=false"])
    assert status == 0, log
    for name in ("forward_f32_signed_group", "forward_f16_signed", "backward_f32", "rate_f32"):
        assert f".entry {name}" in ptx


def test_forward_math_is_never_contracted_into_fma():
    """Even with nvcc's default --fmad=true, the explicitly rounded intrinsics
    keep v − k⁺·u a separate multiply and subtract (docs/design.md §2)."""
    header = cupy_backend.device_source(os.path.join(ROOT, "csrc"))
    include = os.path.join(CUDA_HOME, "include")
    status, log, ptx, _ = nvrtc_compile(header + FORWARD_KERNELS, ["-arch=compute_90", f"-I{include}", "--fmad=true"])
    assert status == 0, log
    assert "mul.rn.f32" in ptx and "sub.rn.f32" in ptx
    assert "fma.rn.f32" not in ptx and "fma.rn.f64" not in ptx


CHECK_AGAINST_REFERENCE = """
    import torch
    from fastspike.reference import neuron_reference
    x = torch.randn(6, 2, 3, 50) * 0.8
    thr = torch.rand(3) + 0.5
    spikes, v, count, *_ = torch.ops.fastspike.neuron_forward(
        x, thr, None, None, 2, True, 0.5, 1e-3, "none")
    ref = neuron_reference(x, thr, group_size=2, signed=True, grad="none")
    assert torch.equal(spikes, ref.spikes) and torch.equal(v, ref.v) and torch.equal(count, ref.count)
"""


@pytest.mark.skipif(shutil.which("ninja") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "ninja")),
                    reason="ninja is not installed")
def test_jit_build_compiles_and_loads_the_operators(tmp_path):
    code = "import json, fastspike\ninfo = fastspike.backend_info()\n" + textwrap.dedent(CHECK_AGAINST_REFERENCE) + "\nprint(json.dumps(info))\n"
    result = run_python(code, {"FASTSPIKE_BACKEND": "jit", "FASTSPIKE_USE_CUDA": "0",
                               "TORCH_EXTENSIONS_DIR": str(tmp_path),
                               "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]})
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["backend"] == "extension" and info["source"] == "jit", info


def test_reference_fallback_warns_once_and_computes():
    code = """
        import warnings, torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastspike
            x = torch.randn(4, 10)
            a = fastspike.neuron(x, 1.0, signed=True)
            b = fastspike.neuron(x, 1.0, signed=True)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "falling back to the pure-PyTorch reference" in messages[0], messages
        assert fastspike.backend_info()["backend"] == "reference"
        ref = fastspike.neuron_reference(x, 1.0, signed=True, grad="none")
        assert torch.equal(a.spikes, ref.spikes)
    """
    result = run_python(code, {"FASTSPIKE_BACKEND": "jit", "FASTSPIKE_JIT": "0"})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_a_loadable_operator_library(tmp_path):
    build = tmp_path / "cmake"
    env = dict(os.environ, CUDA_HOME=CUDA_HOME)
    configure = subprocess.run(
        ["cmake", "-S", ROOT, "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
         f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
        capture_output=True, text=True, env=env, timeout=600)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    compiled = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True,
                              env=env, timeout=900)
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    library = build / "libfastspike_ops.so"
    code = f"import torch\ntorch.ops.load_library({str(library)!r})\n" + textwrap.dedent(CHECK_AGAINST_REFERENCE)
    # FASTSPIKE_BACKEND=reference keeps the package from loading its own copy.
    result = run_python(code, {"FASTSPIKE_BACKEND": "reference"})
    assert result.returncode == 0, result.stderr[-3000:]


def test_import_compiles_nothing_and_loads_no_training_code(tmp_path):
    """Importing fastspike has no side effects (issue 17 item 6): without the
    prebuilt library it falls back to the reference instead of starting a JIT
    build, unless FASTSPIKE_JIT=1 asks for one; training modules load on first use."""
    code = """
        import sys, warnings
        class NoPrebuilt:  # as if fastspike._C were not built
            def find_spec(self, name, path=None, target=None):
                if name == "fastspike._C":
                    raise ImportError("no prebuilt library (test)")
        sys.meta_path.insert(0, NoPrebuilt())
        import torch.utils.cpp_extension as ext
        def no_build(*args, **kwargs):
            raise AssertionError("import fastspike started a JIT build")
        ext.load = no_build
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastspike
        assert fastspike.backend_info()["backend"] == "reference"
        assert any("FASTSPIKE_JIT=1" in str(w.message) for w in caught)
        assert "fastspike.train" not in sys.modules and "fastspike.finetune" not in sys.modules
        assert fastspike.TrainConfig.__module__ == "fastspike.train"  # still there, on first use
        assert fastspike.checkpoint.save_checkpoint
    """
    result = run_python(code, {"TORCH_EXTENSIONS_DIR": str(tmp_path), "FASTSPIKE_BACKEND": "", "FASTSPIKE_JIT": "",
                               "FASTSPIKE_LIBRARY": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert not any(tmp_path.iterdir())
