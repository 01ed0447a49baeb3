"""Builds fastspike._C: the CPU operators everywhere, the CUDA kernels too
where torch has CUDA and nvcc is found.

Environment switches:
  FASTSPIKE_USE_CUDA=0     build the CPU operators only
  FASTSPIKE_FORCE_CUDA=1   build the CUDA kernels even without a visible GPU
                           (fails loudly if torch or nvcc lack CUDA)
  FASTSPIKE_DEBUG=1        -O0 -g instead of -O3
  TORCH_CUDA_ARCH_LIST     GPU architectures (the Makefile sets 8.0;9.0+PTX)
"""

import importlib.util
import os

from setuptools import setup
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


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
