"""The CUDA kernels compiled at run time through CuPy (NVRTC), for installs
whose operator library was built without CUDA (no nvcc at build time) on a
machine that has a GPU and CuPy.

The kernels are the same source nvcc compiles: the device headers of
``csrc/neuron/`` (arithmetic, neuron step, kernel argument structs, element
functions) and ``csrc/neuron/cuda/neuron_kernels.cuh`` (the ``__global__``
wrappers), inlined into one NVRTC program so that CuPy's kernel
cache is keyed on their exact text. They run on torch's tensors in place
(raw device pointers, no copies) on torch's current stream, and are registered
as the CUDA implementations of the ``fastspike::`` operators, so the fake
kernels and the autograd registered in :mod:`fastspike.ops` (and the backward
ops, themselves run here) work unchanged.

The choice (see ``ops._use_reference``): a CUDA tensor meets a library without
CUDA kernels -> :func:`ensure_registered` tries CuPy once; if CuPy, a GPU or
the compile is missing, the reference loop runs instead and
:func:`status` says why. ``FASTSPIKE_CUPY=0`` disables this path;
``FASTSPIKE_CUPY=force`` uses it even where the library has CUDA kernels (to
compare the two builds on one machine).

Rounding: NVRTC gets ``--fmad=false`` as nvcc does, and the math uses the
explicitly rounded intrinsics, so results agree bit for bit with the
reference (docs/design.md §2).
"""

from __future__ import annotations

import functools
import glob
import os
import re
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import _build
from .checks import check_compact, check_out_overlaps, check_residual, check_state, out_buffers
from .reference import _FLOATS, accumulation_dtype, broadcast_threshold

__all__ = [
    "NVRTC_OPTIONS",
    "device_source",
    "kernel_source",
    "kernel_names",
    "include_options",
    "struct_fields",
    "struct_dtype",
    "expected_offsets",
    "threshold_layout",
    "available",
    "ensure_registered",
    "status",
    "neuron_forward",
    "neuron_forward_out",
    "neuron_backward_surrogate",
    "neuron_backward_rate",
]

# Launch rules of the CUDA launcher (csrc/neuron/neuron_dispatch.h), repeated
# here because Python cannot include the header; a test checks they agree.
THREADS_PER_BLOCK = 256
FORWARD_VECTOR_WIDTH = 4
BLOCKS_PER_SM = 32

# --fmad=false: no contraction into fused multiply-adds (docs/design.md §2), as the
# nvcc build; no --use_fast_math. CuPy adds -arch for the current device.
NVRTC_OPTIONS: Tuple[str, ...] = ("-std=c++17", "--fmad=false")

# The device headers in include order (each after what it includes), then the kernels.
_ARGS_FILE = os.path.join("neuron", "neuron_args.h")
_KERNEL_FILES = (
    os.path.join("neuron", "neuron_arith.h"),
    os.path.join("neuron", "neuron_step.h"),
    _ARGS_FILE,
    os.path.join("neuron", "neuron_elements.h"),
    os.path.join("neuron", "cuda", "neuron_kernels.cuh"),
)

_SCALAR_C_TYPES = {
    torch.float32: "float",
    torch.float64: "double",
    torch.float16: "__half",
    torch.bfloat16: "__nv_bfloat16",
}

# The kernel argument structs of neuron_args.h are passed by value, laid out
# in Python from their declarations in that header (read at run time, so the
# layout follows the source that is compiled). The generated program checks
# the field names and the size at compile time and fastspike_layout_probe
# the exact offsets on the device, so a declaration this parser misreads
# fails loudly instead of passing garbage to a kernel. Fields a caller does
# not set are zero (nullptr / false / 0), which the structs define as "off".
_STRUCTS = ("ForwardArgs", "SurrogateBackwardArgs", "RateBackwardArgs")
_FIELD_CODES = {"int64_t": "i8", "int": "i4", "int32_t": "i4", "bool": "?", "acc_t": "acc"}


@functools.lru_cache(maxsize=None)
def struct_fields(struct: str, csrc: str = _build.CSRC) -> Tuple[Tuple[str, str], ...]:
    """(name, numpy code) of each field of ``struct`` in neuron_args.h, in
    declaration order; pointers are "u8", the accumulation type "acc". Read
    once per process (like the compiled module it must match)."""
    path = os.path.join(csrc, _ARGS_FILE)
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    match = re.search(r"struct\s+%s\s*\{(.*?)\n\};" % struct, text, re.S)
    if match is None:
        raise RuntimeError(f"struct {struct} not found in {path}")
    fields = []
    for decl in re.sub(r"//[^\n]*", "", match.group(1)).split(";"):
        decl = decl.split("=")[0].strip()
        if not decl:
            continue
        parsed = re.fullmatch(r"(.+?)\s*\b([A-Za-z_]\w*)", decl, re.S)
        ctype, name = " ".join(parsed.group(1).split()), parsed.group(2)
        if "*" in ctype:
            fields.append((name, "u8"))
        elif ctype in _FIELD_CODES:
            fields.append((name, _FIELD_CODES[ctype]))
        else:
            raise RuntimeError(f"cannot lay out field '{ctype} {name}' of {struct} in {path}")
    return tuple(fields)


_SURROGATES = {"sigmoid": 0, "atan": 1}


@functools.lru_cache(maxsize=None)
def struct_dtype(struct: str, acc: torch.dtype) -> np.dtype:
    """The numpy dtype laid out like ``fastspike::<struct><scalar_t, acc_t>``
    (C alignment rules), passed to a kernel by value as a 1-element array."""
    acc_code = "f8" if acc == torch.float64 else "f4"
    fields = [(name, acc_code if kind == "acc" else kind) for name, kind in struct_fields(struct)]
    return np.dtype(fields, align=True)


def _c_types(scalar: torch.dtype) -> Tuple[str, str]:
    return _SCALAR_C_TYPES[scalar], "double" if scalar == torch.float64 else "float"


def _layout_checks(scalar: torch.dtype) -> str:
    c_scalar, c_acc = _c_types(scalar)
    # NVRTC has no offsetof: the names and sizes are checked here at compile
    # time, the exact offsets on the device by the probe (see _module).
    lines = []
    probe = ['extern "C" __global__ void fastspike_layout_probe(long long* out) {']
    index = 0
    for struct in _STRUCTS:
        dtype = struct_dtype(struct, accumulation_dtype(scalar))
        ctype = f"fastspike::{struct}<{c_scalar}, {c_acc}>"
        message = f'"{struct} changed: fastspike/cupy_backend.py misreads it"'
        lines.append(f"static_assert(sizeof({ctype}) == {dtype.itemsize}, {message});")
        probe.append(f"  {{ {ctype} s; const char* base = reinterpret_cast<const char*>(&s);")
        for name in dtype.names:
            lines.append(f"static_assert(sizeof(&{ctype}::{name}) > 0, {message});")
            probe.append(f"    out[{index}] = reinterpret_cast<const char*>(&s.{name}) - base;")
            index += 1
        probe.append("  }")
    probe.append("}")
    return "\n".join(lines + probe)


def expected_offsets(scalar: torch.dtype) -> List[int]:
    """The field offsets fastspike_layout_probe must report, in its order."""
    acc = accumulation_dtype(scalar)
    return [struct_dtype(struct, acc).fields[name][1]
            for struct in _STRUCTS for name in struct_dtype(struct, acc).names]


def kernel_names(scalar: torch.dtype) -> List[str]:
    """The template instantiations compiled for one input dtype (NVRTC name
    expressions): forward for signed/unsigned × group 1/general × vector
    width 4/1, surrogate backward for the four neuron variants, rate backward."""
    s, a = _c_types(scalar)
    names = []
    for signed in ("true", "false"):
        for group in (1, 0):
            for vec in (FORWARD_VECTOR_WIDTH, 1):
                names.append(f"fastspike::neuron_forward_kernel<{s}, {a}, {signed}, {group}, {vec}>")
            names.append(f"fastspike::neuron_backward_surrogate_kernel<{s}, {a}, {signed}, {group}>")
    names.append(f"fastspike::neuron_backward_rate_kernel<{s}, {a}>")
    names.append("fastspike_layout_probe")
    return names


def device_source(csrc: str = _build.CSRC) -> str:
    """The kernel headers' text in include order, as one NVRTC-ready source: their
    quoted includes (each other, and the host-only cpu/host_memory.h, which sits
    inside ``#ifndef __CUDA_ARCH__`` and NVRTC never needs) and include guards dropped."""
    parts = []
    for relative in _KERNEL_FILES:
        path = os.path.join(csrc, relative)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"the CuPy backend compiles the kernel source at run time and needs {path}: "
                "run from a source checkout (or an editable install)"
            )
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        parts.append(re.sub(r'^(#include\s+"[^"]*"|#pragma once)\s*$', "", text, flags=re.MULTILINE))
    return "\n".join(parts)


def kernel_source(scalar: torch.dtype, csrc: str = _build.CSRC) -> str:
    """One self-contained NVRTC program for ``scalar``: :func:`device_source`, then
    the struct layout checks and the layout probe. The templates of
    :func:`kernel_names` are instantiated through NVRTC name expressions
    (RawModule's name_expressions)."""
    if scalar not in _SCALAR_C_TYPES:
        raise TypeError(f"scalar must be one of {list(_SCALAR_C_TYPES)}, got {scalar}")
    parts = ["#include <cuda_fp16.h>", "#include <cuda_bf16.h>", device_source(csrc), _layout_checks(scalar)]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------
# Availability and registration

_lock = threading.Lock()
_state: Dict[str, Any] = {"registered": False, "reason": "not tried yet (no CUDA tensor met a "
                          "library without CUDA kernels)", "library": None}
_modules: Dict[Tuple[int, torch.dtype], Any] = {}


def _mode() -> str:
    mode = os.environ.get("FASTSPIKE_CUPY", "auto").lower()
    return mode if mode in ("0", "force") else "auto"


def available() -> Tuple[bool, str]:
    """(True, version) when CuPy imports and sees a GPU, else (False, why)."""
    if _mode() == "0":
        return False, "disabled by FASTSPIKE_CUPY=0"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    try:
        import cupy
    except Exception as err:  # ImportError, or a CuPy built for another CUDA failing to load
        return False, f"CuPy is not importable ({type(err).__name__}: {err}); pip install cupy-cuda13x"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:
        return False, f"CuPy sees no CUDA device ({type(err).__name__}: {err})"
    if count < 1:
        return False, "CuPy sees no CUDA device"
    return True, f"CuPy {cupy.__version__}"


def ensure_registered(library_has_cuda: bool) -> bool:
    """True when the CuPy kernels serve CUDA tensors, registering them the
    first time this is asked and possible. ``library_has_cuda``: the loaded
    operator library has its own CUDA kernels (then only FASTSPIKE_CUPY=force
    registers these over them)."""
    if _state["registered"]:
        return True
    mode = _mode()
    if mode == "0" or (library_has_cuda and mode != "force") or _state.get("tried"):
        return False
    with _lock:
        if _state["registered"] or _state.get("tried"):
            return _state["registered"]
        _state["tried"] = True
        ok, why = available()
        if not ok:
            _state["reason"] = why
            return False
        try:
            missing = [relative for relative in _KERNEL_FILES
                       if not os.path.isfile(os.path.join(_build.CSRC, relative))]
            if missing:
                raise FileNotFoundError(f"kernel source not found under {_build.CSRC}: {missing}")
            # Compile (and check the struct layout) now, so a source NVRTC rejects leaves the
            # reference running rather than failing the first call; other dtypes compile on use.
            _module(torch.device("cuda", torch.cuda.current_device()), torch.float32)
            library = torch.library.Library("fastspike", "IMPL")
            library.impl("neuron_forward", neuron_forward, "CUDA")
            library.impl("neuron_forward.out", neuron_forward_out, "CUDA")
            library.impl("neuron_backward_surrogate", neuron_backward_surrogate, "CUDA")
            library.impl("neuron_backward_rate", neuron_backward_rate, "CUDA")
        except Exception as err:  # a missing schema, source or compile must leave the reference working
            _state["reason"] = f"CuPy path unavailable: {type(err).__name__}: {err}"
            return False
        _state.update(registered=True, library=library,
                      reason=f"{why}: kernels compiled at run time by NVRTC from {_build.CSRC}")
        return True


def status() -> Dict[str, Any]:
    """Whether the CuPy kernels serve CUDA tensors (``active``), why or why
    not (``reason``), and the FASTSPIKE_CUPY mode."""
    return {"active": bool(_state["registered"]), "reason": _state["reason"], "mode": _mode()}


def include_options() -> List[str]:
    """-I for a folder with cuda_fp16.h / cuda_bf16.h (NVRTC does not always
    find them itself): $CUDA_HOME or $CUDA_PATH, /usr/local/cuda, or the
    nvidia-* wheels torch depends on."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates = [os.path.join(r, "include") for r in roots if r]
    candidates += sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "*", "include")))
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, "cuda_fp16.h")):
            return [f"-I{os.path.abspath(folder)}"]
    return []


def _module(device: torch.device, scalar: torch.dtype):
    """The compiled RawModule for (device, dtype), compiled on first use
    (CuPy also caches the binary on disk, keyed on source and options)."""
    key = (device.index if device.index is not None else torch.cuda.current_device(), scalar)
    module = _modules.get(key)
    if module is None:
        import cupy

        with cupy.cuda.Device(key[0]):
            module = cupy.RawModule(code=kernel_source(scalar), options=NVRTC_OPTIONS + tuple(include_options()),
                                    name_expressions=kernel_names(scalar))
            module.compile()
            offsets = torch.empty(len(expected_offsets(scalar)), dtype=torch.int64, device=f"cuda:{key[0]}")
            module.get_function("fastspike_layout_probe")((1,), (1,), (np.uint64(offsets.data_ptr()),))
            cupy.cuda.Device(key[0]).synchronize()
        if offsets.tolist() != expected_offsets(scalar):
            raise RuntimeError(
                f"the kernel argument structs of neuron_args.h have field offsets {offsets.tolist()} but "
                f"fastspike/cupy_backend.py lays them out as {expected_offsets(scalar)}: see struct_fields()"
            )
        _modules[key] = module
    return module


def _launch(name: str, tensor: torch.Tensor, work_items: int, args: Sequence[Any]) -> None:
    """Launches kernel ``name`` over ``work_items`` on torch's current stream of
    ``tensor``'s device, with the launcher's grid (neuron_dispatch.h)."""
    import cupy

    device = tensor.device
    kernel = _module(device, tensor.dtype).get_function(name)
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    blocks = max(1, min(-(-work_items // THREADS_PER_BLOCK), sm_count * BLOCKS_PER_SM))
    with cupy.cuda.Device(device.index):
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream, device.index)
        with stream:
            kernel((blocks,), (THREADS_PER_BLOCK,), tuple(args))


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


def _pack(struct: str, acc: torch.dtype, **values: Any) -> np.ndarray:
    packed = np.zeros(1, dtype=struct_dtype(struct, acc))
    for name, value in values.items():
        packed[name] = value
    return packed


def _c_bool(flag: bool) -> str:
    return "true" if flag else "false"


# ---------------------------------------------------------------------------
# Input checks: the plan_* functions of csrc/neuron/neuron.cpp, in Python.


def _check_x(x: torch.Tensor, name: str) -> None:
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
                        f"float64), got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a leading time axis, shape [T, ...], got a 0-dim tensor")


def _check_params(group_size: int, neg_margin: float) -> None:
    if not 1 <= group_size <= 2**20:
        raise ValueError(f"group_size must be an integer in [1, 2^20] (1 = plain IF), got {group_size}")
    if not (np.isfinite(neg_margin) and neg_margin >= 0):
        raise ValueError(f"neg_margin must be a finite number >= 0, got {neg_margin}")


def _surrogate_code(surrogate: str, alpha: float) -> int:
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha (surrogate sharpness) must be a finite number > 0, got {alpha}")
    if surrogate not in _SURROGATES:
        raise ValueError(f"surrogate must be 'sigmoid' or 'atan', got {surrogate!r}")
    return _SURROGATES[surrogate]


def threshold_layout(threshold: torch.Tensor, x_seq: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
    """(values flat in the accumulation dtype, inner, size) as
    resolve_threshold in neuron.cpp: neuron n uses values[(n // inner) % size]."""
    broadcast_threshold(threshold, x_seq)  # the shape, dtype and device checks with their messages
    values = threshold.to(accumulation_dtype(x_seq.dtype)).contiguous().view(-1)
    if threshold.numel() == 1 and threshold.dim() <= 1:
        return values, 1, 1
    if threshold.dim() == 1 and x_seq.dim() >= 3 and threshold.shape[0] == x_seq.shape[2]:
        inner = 1
        for size in x_seq.shape[3:]:
            inner *= size
        return values, inner, threshold.shape[0]
    return values, 1, threshold.numel()


def _neurons(seq: torch.Tensor) -> int:
    n = 1
    for size in seq.shape[1:]:
        n *= size
    return n


def _aligned(t: Optional[torch.Tensor], itemsize: int) -> bool:
    # alignof(Pack<T, 4>) = min(4·sizeof(T), 16), as forward_vector_width in neuron_dispatch.h.
    return t is None or t.numel() == 0 or t.data_ptr() % min(itemsize * FORWARD_VECTOR_WIDTH, 16) == 0


def _time_stream(seq: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """A time broadcast (stride 0 along dim 0) is kept as one contiguous step
    read at every t (time_stream in neuron.cpp); anything else is made contiguous."""
    constant = seq.dim() >= 1 and seq.shape[0] > 1 and seq.stride(0) == 0
    return (seq.select(0, 0).contiguous(), True) if constant else (seq.contiguous(), False)


def _run_forward(x_seq, threshold, v_init, count_init, group_size, signed, init_fraction,
                 neg_margin, grad_mode, out_buffers, residual=None, compact=False):
    _check_x(x_seq, "x_seq")
    _check_params(group_size, neg_margin)
    if not np.isfinite(init_fraction):
        raise ValueError(f"init_fraction (initial membrane as a fraction of θ/m) must be finite, got {init_fraction}")
    if grad_mode not in ("none", "surrogate", "rate"):
        raise ValueError(f"grad_mode must be 'none', 'surrogate' or 'rate', got '{grad_mode}'")
    acc = accumulation_dtype(x_seq.dtype)
    check_state(v_init, x_seq, acc, "v_init")
    check_state(count_init, x_seq, torch.int32, "count_init")
    fields = {name for name, _ in struct_fields("ForwardArgs")}
    if residual is not None or compact:
        # the residual/compact checks live beside the reference's (added with those options)
        check_residual(residual, x_seq)
        check_compact(compact, group_size, grad_mode)
    values, inner, size = threshold_layout(threshold, x_seq)
    x, x_constant = _time_stream(x_seq) if "x_constant" in fields else (x_seq.contiguous(), False)
    r, r_constant = _time_stream(residual) if residual is not None else (None, False)
    if (residual is not None and "residual" not in fields) or (compact and "spike_counts" not in fields):
        raise RuntimeError(f"the kernel source under {_build.CSRC} has no residual/compact fields in "
                           "ForwardArgs; it is older than the operator schema")
    v_init = v_init.contiguous() if v_init is not None else None
    count_init = count_init.contiguous() if count_init is not None else None
    seq_shape, state_shape = x_seq.shape, x_seq.shape[1:]
    if out_buffers is not None:
        spikes, v_final, count_final = out_buffers
        check_out_overlaps(out_buffers, x, v_init, count_init, r, values)
    else:
        spikes = x.new_empty(seq_shape, dtype=torch.int8 if compact else x.dtype)
        v_final = x.new_empty(state_shape, dtype=acc)
        count_final = x.new_empty(state_shape, dtype=torch.int32)
    surrogate_mode = grad_mode == "surrogate"
    membrane = x.new_empty(seq_shape, dtype=acc) if surrogate_mode else x.new_empty((0,), dtype=acc)
    negative_open = (x.new_empty(seq_shape, dtype=torch.bool) if surrogate_mode and signed
                     else x.new_empty((0,), dtype=torch.bool))
    input_mean = x.new_empty(state_shape, dtype=acc) if grad_mode == "rate" else x.new_empty((0,), dtype=acc)
    neurons = _neurons(x_seq)
    if neurons > 0:
        extra = {}
        if "x_constant" in fields:
            extra.update(x_constant=x_constant)
        if residual is not None:
            extra.update(residual=_ptr(r), residual_constant=r_constant)
        if compact:
            extra.update(spike_counts=_ptr(spikes))
        args = _pack(
            "ForwardArgs", acc, x=_ptr(x), spikes=0 if compact else _ptr(spikes), threshold=_ptr(values),
            threshold_inner=inner, threshold_size=size, v_init=_ptr(v_init),
            count_init=_ptr(count_init), v_final=_ptr(v_final), count_final=_ptr(count_final),
            membrane_seq=_ptr(membrane), negative_open_seq=_ptr(negative_open),
            input_mean=_ptr(input_mean), time_steps=seq_shape[0], neurons=neurons,
            group_size=group_size, init_fraction=init_fraction, neg_margin=neg_margin, **extra,
        )
        itemsize = x.element_size()
        aligned = (_aligned(x, itemsize) and _aligned(r, itemsize)
                   and _aligned(spikes, spikes.element_size()))
        width = FORWARD_VECTOR_WIDTH if neurons % FORWARD_VECTOR_WIDTH == 0 and aligned else 1
        work_items = neurons // width
        scalar, acc_c = _c_types(x.dtype)
        group = 1 if group_size == 1 else 0
        name = f"fastspike::neuron_forward_kernel<{scalar}, {acc_c}, {_c_bool(signed)}, {group}, {width}>"
        _launch(name, x, work_items, (args, np.int64(work_items)))
    return spikes, v_final, count_final, membrane, negative_open, input_mean


def neuron_forward(x_seq: torch.Tensor, threshold: torch.Tensor, v_init: Optional[torch.Tensor],
                   count_init: Optional[torch.Tensor], group_size: int, signed: bool,
                   init_fraction: float, neg_margin: float, grad_mode: str,
                   residual: Optional[torch.Tensor] = None,
                   compact: bool = False) -> Tuple[torch.Tensor, ...]:
    """CUDA implementation of ``fastspike::neuron_forward`` (same schema)."""
    return _run_forward(x_seq, threshold, v_init, count_init, group_size, signed, init_fraction,
                        neg_margin, grad_mode, None, residual, compact)


def neuron_forward_out(x_seq: torch.Tensor, threshold: torch.Tensor, v_init: Optional[torch.Tensor],
                       count_init: Optional[torch.Tensor], group_size: int, signed: bool,
                       init_fraction: float, neg_margin: float, residual: Optional[torch.Tensor] = None,
                       compact: bool = False, *, spikes: torch.Tensor, v_final: torch.Tensor,
                       count_final: torch.Tensor) -> None:
    """CUDA implementation of ``fastspike::neuron_forward.out`` (spikes and final state
    written into the caller's buffers)."""
    _check_x(x_seq, "x_seq")
    buffers = out_buffers((spikes, v_final, count_final), x_seq, needs_grad=False, compact=compact)
    _run_forward(x_seq, threshold, v_init, count_init, group_size, signed, init_fraction,
                 neg_margin, "none", buffers, residual, compact)


def neuron_backward_surrogate(grad_spikes: torch.Tensor, grad_v_final: Optional[torch.Tensor],
                              membrane_seq: torch.Tensor, negative_open_seq: torch.Tensor,
                              threshold: torch.Tensor, group_size: int, signed: bool,
                              neg_margin: float, surrogate: str,
                              alpha: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """CUDA implementation of ``fastspike::neuron_backward_surrogate``."""
    _check_x(grad_spikes, "grad_spikes")
    _check_params(group_size, neg_margin)
    acc = accumulation_dtype(grad_spikes.dtype)
    if membrane_seq.device != grad_spikes.device or membrane_seq.dtype != acc or membrane_seq.shape != grad_spikes.shape:
        raise ValueError(f"membrane_seq must be the {acc} tensor of shape {list(grad_spikes.shape)} on "
                         f"{grad_spikes.device} recorded by neuron_forward(grad_mode='surrogate'), got "
                         f"{membrane_seq.dtype} of shape {list(membrane_seq.shape)} on {membrane_seq.device}")
    if signed and (negative_open_seq.device != grad_spikes.device or negative_open_seq.dtype != torch.bool
                   or negative_open_seq.shape != grad_spikes.shape):
        raise ValueError(f"negative_open_seq must be the bool tensor of shape {list(grad_spikes.shape)} "
                         "recorded by neuron_forward(grad_mode='surrogate', signed=True), got "
                         f"{negative_open_seq.dtype} of shape {list(negative_open_seq.shape)}")
    check_state(grad_v_final, grad_spikes, acc, "grad_v_final")
    code = _surrogate_code(surrogate, alpha)
    values, inner, size = threshold_layout(threshold, grad_spikes)
    grad_spikes = grad_spikes.contiguous()
    grad_v_final = grad_v_final.contiguous() if grad_v_final is not None else None
    membrane_seq = membrane_seq.contiguous()
    negative_open_seq = negative_open_seq.contiguous() if signed else negative_open_seq
    grad_x = torch.empty_like(grad_spikes)
    grad_v_init = grad_spikes.new_empty(grad_spikes.shape[1:], dtype=acc)
    neurons = _neurons(grad_spikes)
    if neurons > 0:
        args = _pack(
            "SurrogateBackwardArgs", acc, grad_spikes=_ptr(grad_spikes), grad_v_final=_ptr(grad_v_final),
            membrane_seq=_ptr(membrane_seq), negative_open_seq=_ptr(negative_open_seq) if signed else 0,
            threshold=_ptr(values), threshold_inner=inner, threshold_size=size, grad_x=_ptr(grad_x),
            grad_v_init=_ptr(grad_v_init), time_steps=grad_spikes.shape[0], neurons=neurons,
            group_size=group_size, neg_margin=neg_margin, surrogate=code, alpha=alpha,
        )
        scalar, acc_c = _c_types(grad_spikes.dtype)
        group = 1 if group_size == 1 else 0
        name = f"fastspike::neuron_backward_surrogate_kernel<{scalar}, {acc_c}, {_c_bool(signed)}, {group}>"
        _launch(name, grad_spikes, neurons, (args,))
    return grad_x, grad_v_init


def neuron_backward_rate(grad_spikes: torch.Tensor, input_mean: torch.Tensor,
                         threshold: torch.Tensor) -> torch.Tensor:
    """CUDA implementation of ``fastspike::neuron_backward_rate``."""
    _check_x(grad_spikes, "grad_spikes")
    acc = accumulation_dtype(grad_spikes.dtype)
    check_state(input_mean, grad_spikes, acc, "input_mean")
    values, inner, size = threshold_layout(threshold, grad_spikes)
    grad_spikes = grad_spikes.contiguous()
    input_mean = input_mean.contiguous()
    grad_x = torch.empty_like(grad_spikes)
    neurons = _neurons(grad_spikes)
    if neurons > 0:
        args = _pack(
            "RateBackwardArgs", acc, grad_spikes=_ptr(grad_spikes), input_mean=_ptr(input_mean),
            threshold=_ptr(values), threshold_inner=inner, threshold_size=size, grad_x=_ptr(grad_x),
            time_steps=grad_spikes.shape[0], neurons=neurons,
        )
        scalar, acc_c = _c_types(grad_spikes.dtype)
        _launch(f"fastspike::neuron_backward_rate_kernel<{scalar}, {acc_c}>", grad_spikes, neurons, (args,))
    return grad_x
