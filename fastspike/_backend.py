"""Finds the compiled operator library, in this order:

1. the prebuilt extension ``fastspike._C`` (``pip install -e .`` / ``make`` / the wheel);
2. only when asked (``FASTSPIKE_JIT=1``, or ``FASTSPIKE_BACKEND=jit``): a JIT
   build of the sources in ``csrc/`` (``torch.utils.cpp_extension.load`` with
   ninja), cached by torch under ``TORCH_EXTENSIONS_DIR``. Importing fastspike
   never compiles anything otherwise;
3. none: the pure-PyTorch reference runs instead, with one warning.

``FASTSPIKE_BACKEND=reference`` skips 1 and 2 (to compare or to debug);
``FASTSPIKE_BACKEND=jit`` skips 1 and builds (to test the JIT build).
``FASTSPIKE_LIBRARY=/path/to/lib.so`` loads that operator library instead of 1
and 2 (``torch.ops.load_library``), e.g. the AddressSanitizer build of
``tools/sanitize.sh``; failing to load it is an error, not a silent fallback.
"""
from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from . import _build


@dataclass
class BackendState:
    name: str  # "extension" or "reference"
    source: Optional[str]  # "prebuilt", "jit", "library" (FASTSPIKE_LIBRARY) or None
    reason: str
    library: Optional[str] = None
    notes: Dict[str, str] = field(default_factory=dict)


def _has_ops() -> bool:
    return hasattr(torch.ops, "fastspike") and hasattr(torch.ops.fastspike, "neuron_forward")


def _load_prebuilt() -> BackendState:
    from . import _C  # noqa: F401  (loading registers the operators)

    return BackendState("extension", "prebuilt", "fastspike._C is installed", library=_C.__file__)


def _load_library(path: str) -> BackendState:
    """Loads an operator library named by FASTSPIKE_LIBRARY. An explicit request
    that cannot be honoured raises: falling back to another library would make
    e.g. a sanitizer run test the wrong code while looking clean."""
    if not os.path.isfile(path):
        raise ImportError(f"FASTSPIKE_LIBRARY must name an operator library file, got {path!r} (not found)")
    try:
        torch.ops.load_library(path)
    except OSError as err:
        raise ImportError(f"FASTSPIKE_LIBRARY={path!r} could not be loaded: {err}") from err
    if not _has_ops():
        raise ImportError(f"FASTSPIKE_LIBRARY={path!r} loaded but registered no fastspike operators")
    return BackendState(
        "extension", "library", "FASTSPIKE_LIBRARY names it", library=os.path.abspath(path)
    )


def _jit_wants_cuda() -> bool:
    from torch.utils import cpp_extension

    if os.environ.get("FASTSPIKE_USE_CUDA", "1") == "0":
        return False
    return torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None


def _load_jit() -> BackendState:
    from torch.utils import cpp_extension

    if not os.path.isdir(_build.CSRC):
        raise RuntimeError(f"no sources to compile at {_build.CSRC} (not a source checkout)")
    if shutil.which("ninja") is None and not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    with_cuda = _jit_wants_cuda()
    flags = _build.compile_flags(with_cuda)
    library = cpp_extension.load(
        name="fastspike_ops_jit" + ("_cuda" if with_cuda else "_cpu"),
        sources=_build.sources(with_cuda, python_module=False),
        extra_cflags=flags["cxx"],
        extra_cuda_cflags=flags.get("nvcc", []),
        extra_ldflags=["-fopenmp"],
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=os.environ.get("FASTSPIKE_JIT_VERBOSE", "0") == "1",
    )
    return BackendState(
        "extension", "jit", f"compiled from {_build.CSRC} on first import", library=str(library)
    )


def load() -> BackendState:
    """Loads the best available backend; warns once if it is the reference."""
    choice = os.environ.get("FASTSPIKE_BACKEND", "")
    if choice == "reference":
        return BackendState("reference", None, "FASTSPIKE_BACKEND=reference")
    if os.environ.get("FASTSPIKE_LIBRARY"):
        return _load_library(os.environ["FASTSPIKE_LIBRARY"])
    failures = []
    if choice == "jit":
        failures.append("prebuilt fastspike._C skipped (FASTSPIKE_BACKEND=jit)")
    else:
        try:
            return _load_prebuilt()
        except (ImportError, OSError) as err:
            failures.append(f"prebuilt fastspike._C: {err}")
    # A JIT build takes minutes: only on request, never as a side effect of importing.
    jit_asked = choice == "jit" or os.environ.get("FASTSPIKE_JIT", "0") == "1"
    if jit_asked and os.environ.get("FASTSPIKE_JIT") != "0":
        try:
            return _load_jit()
        except Exception as err:  # a failed compile must not break `import fastspike`
            failures.append(f"JIT build: {err}")
    elif jit_asked:
        failures.append("JIT build disabled by FASTSPIKE_JIT=0")
    else:
        failures.append("no JIT build (set FASTSPIKE_JIT=1 to compile csrc/ on import)")
    reason = "; ".join(failures)
    warnings.warn(
        "fastspike: no compiled operators could be loaded, falling back to the pure-PyTorch "
        f"reference loop (correct but slow). Build them with `pip install -e . "
        f"--no-build-isolation` or `make build`, or set FASTSPIKE_JIT=1 to compile them on "
        f"import. Details: {reason}",
        RuntimeWarning,
        stacklevel=3,
    )
    return BackendState("reference", None, reason)


def has_cuda_kernels() -> bool:
    """True when the loaded operator library registered CUDA implementations."""
    return _has_ops() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastspike::neuron_forward", "CUDA"
    )
