"""The argument checks of :func:`fastspike.neuron` and the nn modules, in one place.

They run in Python before any backend is called (the C++ extension, the CuPy
kernels or the reference loop), so that a mistake raises the same exception
from every backend: ``TypeError`` for an argument of the wrong type,
``ValueError`` for a wrong value, each naming the argument, what was expected
and what was given.

Two rules keep them usable everywhere:

* under ``torch.compile`` / ``torch.export`` / fake tensors they look at tensor
  metadata only (device, dtype, shape) and never branch on a traced value: a
  symbolic number (``torch.SymInt``/``SymFloat`` from ``dynamic=True``) is
  passed on unchecked, and a threshold tensor's values are read only for real
  CPU tensors outside tracing (the compiled operators check them again at run
  time, on the CPU);
* they are cheap: a call with plain arguments pays a few type tests, and a
  threshold tensor's values are read once per version of that tensor (the
  result is remembered on the tensor, keyed by its version counter and data
  pointer), not at every call.
"""

from __future__ import annotations

import math
import numbers
import weakref
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

__all__ = ["FLOAT_DTYPES", "MAX_GROUP_SIZE", "MAX_COMPACT_GROUP", "check_x", "check_real", "check_int",
           "check_bool", "check_choice", "check_threshold", "check_threshold_values", "check_state",
           "check_like_x", "check_compact", "check_neuron_call", "check_residual",
           "check_out_overlaps", "out_buffers"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_GROUP_SIZE = 2**20
# int8 holds the signed counts |k⁺ − k⁻| ≤ m only up to m = 127.
MAX_COMPACT_GROUP = 127
GRAD_MODES = ("none", "surrogate", "rate")
SURROGATES = ("sigmoid", "atan")

_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)
_FLOAT32_MAX = torch.finfo(torch.float32).max
_SMALLEST = 2.0**-149  # the smallest float32 (subnormal): a smaller threshold rounds to 0 there
_MAX = {torch.float32: torch.finfo(torch.float32).max, torch.float64: torch.finfo(torch.float64).max}
# Threshold tensors whose values were checked: id -> (weak reference, version, data
# pointer, accumulation dtype). Kept beside the tensors, not on them (an attribute
# would travel into torch.save and deepcopy); cleared when it grows large.
_CHECKED: Dict[int, Tuple[Any, int, int, torch.dtype]] = {}
_CHECKED_MAX = 4096


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _got(value: Any) -> str:
    """What was given, for a TypeError: the type, and the value when it is short."""
    if isinstance(value, torch.Tensor):
        return f"a tensor ({value.dtype}, shape {list(value.shape)})"
    text = repr(value)
    return f"{type(value).__name__} {text}" if len(text) <= 40 else type(value).__name__


def check_x(x_seq: Any, name: str = "x_seq") -> None:
    if not isinstance(x_seq, torch.Tensor):
        raise TypeError(f"{name} must be a floating-point tensor of shape [T, ...], got {_got(x_seq)}")
    if x_seq.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {x_seq.dtype}")
    if x_seq.dim() < 1:
        raise ValueError(f"{name} must have a leading time axis, shape [T, ...], got a 0-dim tensor")


def check_real(value: Any, name: str, expect: str, *, minimum: Optional[float] = None, strict: bool = False,
               dtype: torch.dtype = torch.float64) -> None:
    """``value`` must be a real number (not a bool), finite, >= ``minimum`` (>
    when ``strict``) and representable in the arithmetic of ``dtype`` (float32
    for all but float64 inputs). ``expect`` says what is expected, for the message."""
    kind = type(value)
    if kind is float or kind is int:
        # The common case in one comparison chain (NaN fails every comparison).
        if (-_FLOAT32_MAX <= value <= _FLOAT32_MAX and (minimum is None or value > minimum
                                                        or (not strict and value == minimum))):
            return
    elif isinstance(value, _SYMBOLIC):
        return  # dynamic=True under torch.compile: checked by the operator at run time
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expect}, a real number; got {_got(value)}")
    if torch.compiler.is_compiling():
        return  # Dynamo sees a dynamic number as a float: no branching on it (the operator checks it)
    if not math.isfinite(value) or (minimum is not None and (value <= minimum if strict else value < minimum)):
        raise ValueError(f"{name} must be {expect}, got {value!r}")
    acc = _acc(dtype)
    if abs(value) > _MAX[acc]:
        raise ValueError(f"{name} must be {expect}, at most {_MAX[acc]:.6g} in magnitude (the largest {acc}, "
                         f"the arithmetic of x_seq's dtype {dtype}), got {value!r}")


def check_int(value: Any, name: str, low: int, high: Optional[int] = None, high_text: str = "",
              note: str = "") -> None:
    """An integer (not a bool) in [low, high] (>= low without high)."""
    if type(value) is int:
        if low <= value and (high is None or value <= high):
            return
    elif isinstance(value, torch.SymInt):
        return
    span = (f"in [{low}, {high_text or high}]" if high is not None else f">= {low}") + (f" {note}" if note else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer {span}, got {_got(value)}")
    if torch.compiler.is_compiling():
        return
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer {span}, got {value!r}")


def check_bool(value: Any, name: str) -> None:
    if type(value) is not bool and not isinstance(value, torch.SymBool):
        raise TypeError(f"{name} must be True or False, got {_got(value)}")


def check_choice(value: Any, name: str, choices) -> None:
    if type(value) is not str:
        raise TypeError(f"{name} must be one of {', '.join(map(repr, choices))} (a str), got {_got(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be {' or '.join(map(repr, choices))}, got {value!r}"
                         if len(choices) == 2 else
                         f"{name} must be {', '.join(map(repr, choices[:-1]))} or {choices[-1]!r}, got {value!r}")


_PLAIN = (torch.Tensor, torch.nn.Parameter, torch.nn.Buffer) if hasattr(torch.nn, "Buffer") else (
    torch.Tensor, torch.nn.Parameter)


def _values_readable(t: torch.Tensor) -> bool:
    """Whether reading t's values is safe and cheap: a real CPU tensor, outside
    torch.compile/export, jit tracing and any dispatch mode (fake tensors)."""
    return (t.is_cpu and type(t) in _PLAIN and not torch.compiler.is_compiling() and not torch._C._is_tracing()
            and torch._C._len_torch_dispatch_stack() == 0)


def check_threshold_values(t: torch.Tensor, acc: torch.dtype, name: str = "threshold") -> None:
    """Every value of a (CPU, untraced) threshold tensor, in the accumulation
    dtype, must be finite and > 0; remembered per version of the tensor."""
    if torch.compiler.is_compiling():
        return  # (Dynamo would trace the cache's data pointer comparison)
    _check_values(t, acc, name)


def _check_values(t: torch.Tensor, acc: torch.dtype, name: str) -> None:
    checked = _CHECKED.get(id(t))
    if (checked is not None and checked[0]() is t and checked[1] == t._version and checked[3] == acc
            and checked[2] == t.data_ptr()):
        return
    if not _values_readable(t):
        return
    key = (t._version, t.data_ptr(), acc)
    with torch.no_grad():
        values = t.detach().to(acc)
        bad = ~((values > 0) & torch.isfinite(values))
        if bool(bad.any()):
            flat = bad.reshape(-1).nonzero()[0, 0].item()
            raise ValueError(
                f"{name} must be finite and > 0 everywhere (in {acc}), got {values.reshape(-1)[flat].item()} "
                f"at flat index {flat}" + (f" (from {t.reshape(-1)[flat].item()!r} in {t.dtype})"
                                           if t.dtype != acc else ""))
    if len(_CHECKED) >= _CHECKED_MAX:
        _CHECKED.clear()
    _CHECKED[id(t)] = (weakref.ref(t),) + key


def check_threshold(threshold: Any, x_seq: torch.Tensor, name: str = "threshold") -> None:
    """A number, or a tensor that is a scalar, per channel [C] (C = x_seq.size(2))
    or per neuron (x_seq.shape[2:] or x_seq.shape[1:]), on x_seq's device."""
    if type(threshold) is float and not torch.compiler.is_compiling() and _SMALLEST <= threshold <= _FLOAT32_MAX:
        return  # the common case: a plain number, valid in float32 and float64 (not symbolic)
    acc = _acc(x_seq.dtype)
    if not isinstance(threshold, torch.Tensor):
        if type(threshold) is not float and (isinstance(threshold, bool) or not isinstance(
                threshold, (numbers.Real, torch.SymFloat, torch.SymInt))):
            raise TypeError(f"{name} must be a number or a tensor (θ, finite and > 0), got {_got(threshold)}")
        check_real(threshold, name, "finite and > 0 (θ, a number or a tensor)", minimum=0.0, strict=True,
                   dtype=x_seq.dtype)
        # A value that rounds to 0 in float32 (at most half the smallest subnormal) is no threshold either.
        if (acc == torch.float32 and not torch.compiler.is_compiling() and not isinstance(threshold, _SYMBOLIC)
                and threshold <= 2.0**-150):
            raise ValueError(f"{name} must be finite and > 0 in {acc} (the arithmetic of x_seq's dtype "
                             f"{x_seq.dtype}), got {threshold!r}, which rounds to 0 there")
        return
    if not (threshold.is_cpu and x_seq.is_cpu) and threshold.device != x_seq.device:
        raise ValueError(f"{name} must be on the same device as x_seq ({x_seq.device}), got {threshold.device}")
    if threshold.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got {threshold.dtype}")
    compiling = torch.compiler.is_compiling()
    if not compiling and torch._C._is_tracing():
        return  # traced sizes: the operator checks the layout when the trace runs
    shape = threshold.shape
    if shape and len(shape) > 1 or shape and shape[0] != 1:  # not a scalar: the layout against x_seq
        x_shape = x_seq.shape
        if not ((len(shape) == 1 and len(x_shape) >= 3 and shape[0] == x_shape[2])
                or (len(x_shape) >= 3 and shape == x_shape[2:]) or (len(x_shape) >= 2 and shape == x_shape[1:])):
            _layout_error(name, shape, x_shape)
    if not compiling:
        _check_values(threshold, acc, name)


def _layout_error(name: str, shape, x_shape) -> None:
    raise ValueError(
        f"{name} must be a scalar, a per-channel tensor of shape [C] with C = x_seq.size(2), "
        "or a per-neuron tensor of shape x_seq.shape[2:] or x_seq.shape[1:]; "
        f"x_seq has shape {list(x_shape)}, {name} has shape {list(shape)}")


def check_state(state: Any, x_seq: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """v_init / count_init (or an out= state buffer): None, or a tensor with the
    shape of one time step of x_seq, on its device, of ``dtype``."""
    if state is None:
        return
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"{name} must be a {dtype} tensor of shape {list(x_seq.shape[1:])} or None, "
                        f"got {_got(state)}")
    if not (state.is_cpu and x_seq.is_cpu) and state.device != x_seq.device:
        raise ValueError(f"{name} must be on the same device as x_seq ({x_seq.device}), got {state.device}")
    if state.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} for x_seq of dtype {x_seq.dtype}, got {state.dtype}")
    if state.shape != x_seq.shape[1:]:
        raise ValueError(f"{name} must have the shape of one time step of x_seq, {list(x_seq.shape[1:])}, "
                         f"got {list(state.shape)}")


def check_like_x(tensor: Any, x_seq: torch.Tensor, name: str) -> None:
    """``tensor`` must have x_seq's device, dtype and shape (out=, residual=)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {_got(tensor)}")
    if not (tensor.is_cpu and x_seq.is_cpu) and tensor.device != x_seq.device:
        raise ValueError(f"{name} must be on the same device as x_seq ({x_seq.device}), got {tensor.device}")
    if tensor.dtype != x_seq.dtype:
        raise TypeError(f"{name} must have x_seq's dtype {x_seq.dtype}, got {tensor.dtype}")
    if tensor.shape != x_seq.shape:
        raise ValueError(f"{name} must have x_seq's shape {list(x_seq.shape)}, got {list(tensor.shape)}")


def check_compact(compact: Any, group_size: int, grad: str) -> None:
    """Compact spikes are int8 counts without a gradient."""
    check_bool(compact, "compact")
    if not compact:
        return
    if grad != "none":
        raise ValueError("compact spikes (int8 counts) are for inference and have no gradient: "
                         f"grad must be 'none' (or no input may require grad), got {grad!r}")
    if group_size > MAX_COMPACT_GROUP:
        raise ValueError(f"compact spikes are int8 counts |k| <= group_size, so group_size must be "
                         f"<= {MAX_COMPACT_GROUP}, got {group_size}")


def check_neuron_params(x_seq: Any, group_size: Any, signed: Any, init_fraction: Any, neg_margin: Any,
                        grad: Any, surrogate: Any, alpha: Any) -> None:
    """The scalar arguments of the neuron (alpha None: the surrogate's default)."""
    check_x(x_seq)
    dtype = x_seq.dtype
    check_int(group_size, "group_size", 1, MAX_GROUP_SIZE, "2^20", "(1 = plain IF)")
    check_bool(signed, "signed")
    check_real(init_fraction, "init_fraction (initial membrane as a fraction of θ/m)", "finite", dtype=dtype)
    check_real(neg_margin, "neg_margin", "a finite number >= 0 (ε: a negative spike needs v <= -ε)",
               minimum=0.0, dtype=dtype)
    check_choice(grad, "grad", GRAD_MODES)
    check_choice(surrogate, "surrogate", SURROGATES)
    if alpha is not None:
        check_real(alpha, "alpha (surrogate sharpness)", "a finite number > 0", minimum=0.0, strict=True,
                   dtype=dtype)


def check_neuron_call(x_seq: Any, threshold: Any, group_size: Any, signed: Any, init_fraction: Any,
                      neg_margin: Any, v_init: Any, count_init: Any, grad: Any, surrogate: Any, alpha: Any,
                      residual: Any, compact: Any) -> None:
    """Every argument of :func:`fastspike.neuron` but out= (and the grad-mode
    rules that need to know whether an input requires grad). Eager calls with
    plain arguments take the inline tests; anything else (and every call while
    torch.compile traces, where a number may be symbolic) the full checks."""
    check_x(x_seq)
    if torch.compiler.is_compiling():
        check_neuron_params(x_seq, group_size, signed, init_fraction, neg_margin, grad, surrogate, alpha)
    else:
        f32 = _FLOAT32_MAX
        if not (type(group_size) is int and 1 <= group_size <= MAX_GROUP_SIZE and type(signed) is bool
                and type(init_fraction) is float and -f32 <= init_fraction <= f32
                and type(neg_margin) is float and 0.0 <= neg_margin <= f32
                and type(grad) is str and grad in GRAD_MODES and type(surrogate) is str and surrogate in SURROGATES
                and (alpha is None or (type(alpha) is float and 0.0 < alpha <= f32))):
            check_neuron_params(x_seq, group_size, signed, init_fraction, neg_margin, grad, surrogate, alpha)
    check_threshold(threshold, x_seq)
    if v_init is not None:
        check_state(v_init, x_seq, _acc(x_seq.dtype), "v_init")
    if count_init is not None:
        check_state(count_init, x_seq, torch.int32, "count_init")
    if residual is not None:
        check_like_x(residual, x_seq, "residual")
    if compact is not False and compact is not True:
        check_bool(compact, "compact")


def check_residual(residual: Optional[torch.Tensor], x_seq: torch.Tensor) -> None:
    """A residual operand must match x_seq exactly: it is added elementwise in
    the kernel, with no broadcasting or type promotion."""
    if residual is not None:
        check_like_x(residual, x_seq, "residual")


def _byte_span(t: torch.Tensor) -> Tuple[int, int]:
    """[first, last) bytes a tensor's elements can touch."""
    if t.numel() == 0:
        return (t.data_ptr(), t.data_ptr())
    extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) + 1
    return (t.data_ptr(), t.data_ptr() + extent * t.element_size())


def check_out_overlaps(buffers: Sequence[torch.Tensor], x: torch.Tensor,
                       v_init: Optional[torch.Tensor], count_init: Optional[torch.Tensor],
                       residual: Optional[torch.Tensor] = None, threshold: Optional[torch.Tensor] = None) -> None:
    """The overlap rules of the out= form, as check_forward_out in
    csrc/neuron/neuron.cpp: the (spikes, v, count) buffers may coincide exactly
    with what they replace element for element (spikes: x or residual; v: v_init;
    count: count_init), and overlap nothing else the kernel reads or writes. x,
    v_init, count_init, residual and threshold are the tensors the kernel reads
    in place (None: it reads a copy)."""
    spikes, v, count = buffers
    names = {id(spikes): "spikes (the out= tensor)", id(v): "v (the out= state)",
             id(count): "count (the out= state)", id(x): "x_seq", id(v_init): "v_init",
             id(count_init): "count_init", id(residual): "residual", id(threshold): "threshold"}
    pairs = [(spikes, x, True), (spikes, residual, True), (spikes, v_init, False), (spikes, count_init, False),
             (spikes, threshold, False), (v, x, False), (v, residual, False), (v, spikes, False),
             (v, v_init, True), (v, count_init, False), (v, threshold, False), (count, x, False),
             (count, residual, False), (count, spikes, False), (count, v, False),
             (count, count_init, True), (count, v_init, False), (count, threshold, False)]
    for buffer, other, allowed_full in pairs:
        if other is None or buffer.numel() == 0 or other.numel() == 0:
            continue
        (a0, a1), (b0, b1) = _byte_span(buffer), _byte_span(other)
        if a1 <= b0 or b1 <= a0:
            continue
        if allowed_full and (a0, a1) == (b0, b1) and buffer.stride() == other.stride():
            continue
        raise ValueError(f"{names[id(buffer)]} overlaps {names[id(other)]} in memory"
                         + (" other than element for element" if allowed_full else "")
                         + "; pass separate buffers" + (" (or exactly the same tensor)" if allowed_full else ""))


def _check_out(out: torch.Tensor, x_seq: torch.Tensor, needs_grad: bool, compact: bool) -> None:
    if needs_grad:
        raise ValueError("out= is for inference and does not record a backward; "
                         "call without out= or under torch.no_grad()")
    if compact:  # the int8 counts k⁺ − k⁻; TypeError for the dtype, ValueError for the rest, as check_like_x
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"spikes (the out= tensor) must be a tensor, got {type(out).__name__}")
        if out.dtype != torch.int8:
            raise TypeError(f"spikes (the out= tensor) of compact=True must have dtype torch.int8, got {out.dtype}")
        if out.device != x_seq.device or out.shape != x_seq.shape:
            raise ValueError(f"spikes (the out= tensor) of compact=True must have x_seq's shape {list(x_seq.shape)} "
                             f"on {x_seq.device}, got shape {list(out.shape)} on {out.device}")
    else:
        check_like_x(out, x_seq, "spikes (the out= tensor)")
    if not out.is_contiguous():
        raise ValueError("spikes (the out= tensor) must be contiguous")


def _check_state_out(buffer: Any, x_seq: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    if not isinstance(buffer, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(buffer).__name__}")
    check_state(buffer, x_seq, dtype, name)
    if not buffer.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def out_buffers(out: Any, x_seq: torch.Tensor, needs_grad: bool,
                compact: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(spikes, v, count) buffers for out=: a tensor is the spikes buffer (v and count
    are then allocated); a sequence of three (e.g. an earlier NeuronResult) gives all.
    With ``compact`` the spikes buffer holds int8 counts."""
    if isinstance(out, torch.Tensor):
        spikes = out
        acc = _acc(x_seq.dtype)
        v = x_seq.new_empty(x_seq.shape[1:], dtype=acc)
        count = x_seq.new_empty(x_seq.shape[1:], dtype=torch.int32)
    elif isinstance(out, (tuple, list)) and len(out) == 3:
        spikes, v, count = out
        if not isinstance(spikes, torch.Tensor):
            raise TypeError(f"out[0] (the spikes buffer) must be a tensor, got {type(spikes).__name__}")
        _check_state_out(v, x_seq, _acc(x_seq.dtype), "v (the out= state)")
        _check_state_out(count, x_seq, torch.int32, "count (the out= state)")
    else:
        raise TypeError("out must be a spikes tensor or a (spikes, v, count) sequence, got "
                        f"{type(out).__name__}" + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))
    _check_out(spikes, x_seq, needs_grad, compact)
    return spikes, v, count
