"""Sources and compiler flags of the operator library, shared by setup.py and
the JIT build in fastspike/_backend.py so that both compile the same thing."""

import glob
import os
from typing import Dict, List

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
# The kernel sources: the checkout's csrc/, or the copy an installed wheel carries.
CSRC = (os.path.join(os.path.dirname(_PACKAGE), "csrc")
        if os.path.isdir(os.path.join(os.path.dirname(_PACKAGE), "csrc", "neuron"))
        else os.path.join(_PACKAGE, "_csrc", "csrc"))
# The benchmark scripts `fastspike bench` runs: the checkout's, or the wheel's copy.
BENCHMARKS = (os.path.join(os.path.dirname(_PACKAGE), "benchmarks")
              if os.path.isdir(os.path.join(os.path.dirname(_PACKAGE), "benchmarks"))
              else os.path.join(_PACKAGE, "_benchmarks"))

# -ffp-contract=off: the neuron math must not be fused into multiply-adds, so
# that CPU, CUDA and the PyTorch reference round alike (docs/design.md §2).
# -fno-trapping-math: floating-point exceptions are never observed, so GCC may
# evaluate both sides of a select; without it the lane loops of the group
# neurons are not vectorised. It changes no rounding: results stay bit-exact.
# The C++ standard is left to torch (C++17 up to 2.12, C++20 after).
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp"]
# --fmad=false for the same reason; the kernels also use explicitly rounded
# intrinsics, this covers any arithmetic outside them.
NVCC_FLAGS = ["-O3", "--fmad=false", "-lineinfo"]


def sources(with_cuda: bool, csrc: str = CSRC, python_module: bool = True) -> List[str]:
    """Every .cpp under csrc/, plus the .cu files when with_cuda. The
    python_module.cpp stub (PyInit__C) only belongs in the fastspike._C module."""
    found = sorted(glob.glob(os.path.join(csrc, "**", "*.cpp"), recursive=True))
    if not python_module:
        found = [f for f in found if os.path.basename(f) != "python_module.cpp"]
    if with_cuda:
        found += sorted(glob.glob(os.path.join(csrc, "**", "*.cu"), recursive=True))
    return found


def compile_flags(with_cuda: bool, debug: bool = False) -> Dict[str, List[str]]:
    opt = ["-O0", "-g"] if debug else []
    cxx = [f for f in CXX_FLAGS if not (debug and f == "-O3")] + opt
    flags = {"cxx": cxx}
    if with_cuda:
        flags["nvcc"] = [f for f in NVCC_FLAGS if not (debug and f == "-O3")] + opt
    return flags
