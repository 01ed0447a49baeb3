"""Builds fastspike._C: the CPU operators everywhere, the CUDA kernels too
where torch has CUDA and nvcc is found.

Environment switches:
  FASTSPIKE_USE_CUDA=0     build the CPU operators only
  FASTSPIKE_FORCE_CUDA=1   build the CUDA kernels even without a visible GPU
                           (fails loudly if torch or nvcc lack CUDA)
  FASTSPIKE_DEBUG=1        -O0 -g instead of -O3
  TORCH_CUDA_ARCH_LIST     GPU architectures (the Makefile sets 8.0;9.0+PTX)
  FASTSPIKE_PREBUILT=1     package the fastspike/_C*.so already built in place
                           (`make build`) instead of compiling again (`make wheel`)

The wheel carries what the package reads at run time besides its modules: the
kernel sources the CuPy/NVRTC backend compiles (csrc/neuron/ headers, as
fastspike/_csrc/) and the benchmark scripts `fastspike bench` runs (as
fastspike/_benchmarks/).
"""

import glob
import importlib.util
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    if os.environ.get("FASTSPIKE_USE_CUDA", "1") == "0":
        return False
    if os.environ.get("FASTSPIKE_FORCE_CUDA", "0") == "1":
        if cpp_extension.CUDA_HOME is None:
            raise RuntimeError("FASTSPIKE_FORCE_CUDA=1 but no CUDA toolkit (nvcc) was found; "
                               "set CUDA_HOME=/usr/local/cuda")
        return True
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def load_build_config():
    """fastspike/_build.py without importing the package (which needs _C)."""
    spec = importlib.util.spec_from_file_location(
        "fastspike_build", os.path.join(ROOT, "fastspike", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension():
    build = load_build_config()
    with_cuda = want_cuda()
    debug = os.environ.get("FASTSPIKE_DEBUG", "0") == "1"
    cls = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    return cls(
        name="fastspike._C",
        sources=[os.path.relpath(s, ROOT) for s in build.sources(with_cuda)],
        extra_compile_args=build.compile_flags(with_cuda, debug),
        extra_link_args=["-fopenmp"],
    )


# Run-time files from outside the package, copied into it in the built tree:
# (source glob relative to the root, destination package directory).
RUNTIME_FILES = [("csrc/neuron/**/*.h", "fastspike/_csrc"), ("csrc/neuron/**/*.cuh", "fastspike/_csrc"),
                 ("benchmarks/bench_*.py", "fastspike/_benchmarks")]


class BuildPyWithRuntimeFiles(build_py):
    def run(self):
        super().run()
        for pattern, dest in RUNTIME_FILES:
            base = pattern.split("/")[0]
            for path in glob.glob(os.path.join(ROOT, pattern), recursive=True):
                relative = os.path.relpath(path, os.path.join(ROOT, base))
                target = os.path.join(self.build_lib, dest, base if base == "csrc" else "", relative)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copyfile(path, target)


class BuildExtension(cpp_extension.BuildExtension):
    """With FASTSPIKE_PREBUILT=1, packages the in-place build instead of compiling."""

    def build_extension(self, ext):
        if os.environ.get("FASTSPIKE_PREBUILT") != "1":
            return super().build_extension(ext)
        built = glob.glob(os.path.join(ROOT, "fastspike", "_C*.so"))
        if len(built) != 1:
            raise RuntimeError(f"FASTSPIKE_PREBUILT=1 needs exactly one fastspike/_C*.so (make build), found {built}")
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(built[0], target)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension, "build_py": BuildPyWithRuntimeFiles},
)
