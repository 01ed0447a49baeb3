"""Typed wrappers around the fastspike operators, their fake (meta) kernels and
their autograd registration, plus the choice of backend.

The operators (schemas in csrc/neuron/neuron.cpp) are

``fastspike::neuron_forward(x_seq, threshold, v_init, count_init, group_size,
signed, init_fraction, neg_margin, grad_mode, residual=None, compact=False)``
    -> (spikes, v_final, count_final, membrane_seq, negative_open_seq, input_mean)

    The kernel. ``residual`` (x_seq's shape and dtype) charges the neurons with
    x_seq + residual without storing the sum; ``compact`` returns the spikes as
    int8 counts k⁺ − k⁻ (inference only). x_seq and residual may be time
    broadcasts (stride 0 along dim 0), read at every step without a copy.
    ``grad_mode`` says what to record for a backward; the kernel has no
    derivative of its own (calling it with inputs that require grad raises).

``fastspike::neuron(x_seq, threshold, v_init, count_init, group_size, signed,
init_fraction, neg_margin, grad, surrogate, alpha, residual=None)``
    -> (spikes, v_final, count_final)

    The differentiable neuron: a CompositeImplicitAutograd operator whose kernel
    (registered here) is an autograd function that runs ``neuron_forward`` and
    keeps ``surrogate`` and ``alpha``, which only the backward reads, in its
    context. Eager calls, TorchScript, jit.trace, torch.compile and export all
    reach it through the dispatcher.

``fastspike::neuron_forward.out(x_seq, threshold, v_init, count_init, group_size,
signed, init_fraction, neg_margin, residual=None, compact=False, *,
Tensor(a!) spikes, Tensor(b!) v_final, Tensor(c!) count_final)`` -> ()

    The out= overload (inference only, so no grad_mode or surrogate): writes into
    the caller's buffers; spikes may be x_seq or residual itself (int8 when
    compact), v_final / count_final may be v_init / count_init themselves (a loop
    over chunks of time that reuses its buffers allocates nothing). It returns
    nothing, not aliases of the buffers: torch's functionalization rejects custom
    operators whose outputs carry alias annotations.

``fastspike::neuron_backward_surrogate(grad_spikes, grad_v_final, membrane_seq,
negative_open_seq, threshold, group_size, signed, neg_margin, surrogate, alpha)``
    -> (grad_x, grad_v_init)

``fastspike::neuron_backward_rate(grad_spikes, input_mean, threshold)`` -> grad_x

Most users call :func:`neuron`, which picks the operator, the grad mode and the
backend.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import warnings
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch

from . import _backend, cupy_backend
from .checks import (GRAD_MODES, SURROGATES, check_choice, check_compact, check_neuron_call, check_out_overlaps,
                     check_real, check_residual, check_state, out_buffers)
from .reference import (
    DEFAULT_ALPHA,
    NeuronResult,
    Threshold,
    accumulation_dtype,
    neuron_reference,
    threshold_tensor,
)

__all__ = ["neuron", "backend_info", "NeuronResult", "use_reference"]

_STATE = _backend.load()
_warned_cuda_fallback = False


def _empty(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return like.new_empty((0,), dtype=dtype)


def _check_fake_inputs(x_seq, threshold, v_init, count_init, residual=None) -> None:
    """The device and state checks of the C++ wrappers, for the fake kernels
    (a tensor on another device than x_seq may route a call there)."""
    if threshold.device != x_seq.device:
        raise RuntimeError(
            f"threshold must be on the same device as x_seq ({x_seq.device}), got {threshold.device}"
        )
    check_state(v_init, x_seq, accumulation_dtype(x_seq.dtype), "v_init")
    check_state(count_init, x_seq, torch.int32, "count_init")
    check_residual(residual, x_seq)


if _STATE.name == "extension":

    @torch.library.register_fake("fastspike::neuron_forward")
    def _neuron_forward_fake(
        x_seq, threshold, v_init, count_init, group_size, signed, init_fraction, neg_margin,
        grad_mode, residual=None, compact=False,
    ):
        _check_fake_inputs(x_seq, threshold, v_init, count_init, residual)
        check_compact(compact, group_size, grad_mode)
        acc = accumulation_dtype(x_seq.dtype)
        state_shape = x_seq.shape[1:]
        surrogate_mode = grad_mode == "surrogate"
        return (
            x_seq.new_empty(x_seq.shape, dtype=torch.int8 if compact else x_seq.dtype),
            x_seq.new_empty(state_shape, dtype=acc),
            x_seq.new_empty(state_shape, dtype=torch.int32),
            x_seq.new_empty(x_seq.shape, dtype=acc) if surrogate_mode else _empty(x_seq, acc),
            x_seq.new_empty(x_seq.shape, dtype=torch.bool)
            if surrogate_mode and signed
            else _empty(x_seq, torch.bool),
            x_seq.new_empty(state_shape, dtype=acc) if grad_mode == "rate" else _empty(x_seq, acc),
        )

    @torch.library.register_fake("fastspike::neuron_forward.out")
    def _neuron_forward_out_fake(
        x_seq, threshold, v_init, count_init, group_size, signed, init_fraction, neg_margin, residual=None,
        compact=False, *, spikes, v_final, count_final,
    ):
        _check_fake_inputs(x_seq, threshold, v_init, count_init, residual)
        check_compact(compact, group_size, "none")
        return None

    @torch.library.register_fake("fastspike::neuron_backward_surrogate")
    def _neuron_backward_surrogate_fake(
        grad_spikes, grad_v_final, membrane_seq, negative_open_seq, threshold, group_size,
        signed, neg_margin, surrogate, alpha,
    ):
        acc = accumulation_dtype(grad_spikes.dtype)
        return (
            grad_spikes.new_empty(grad_spikes.shape),
            grad_spikes.new_empty(grad_spikes.shape[1:], dtype=acc),
        )

    @torch.library.register_fake("fastspike::neuron_backward_rate")
    def _neuron_backward_rate_fake(grad_spikes, input_mean, threshold):
        return grad_spikes.new_empty(grad_spikes.shape)

    class _RateBackward(torch.autograd.Function):
        """The rate backward under create_graph=True. grad x_t = (1/T)·Σ_τ g_τ·[0 < x̄ < θ]
        is linear in g with a symmetric matrix, so its own backward is the same
        operator; the mask is piecewise constant in x (no gradient), as in the reference."""

        @staticmethod
        def forward(ctx, grad_spikes, input_mean, threshold):
            ctx.save_for_backward(input_mean, threshold)
            return torch.ops.fastspike.neuron_backward_rate(grad_spikes, input_mean, threshold)

        @staticmethod
        def backward(ctx, grad_grad_x):
            input_mean, threshold = ctx.saved_tensors
            return _RateBackward.apply(grad_grad_x, input_mean, threshold), None, None

    class _SurrogateBackward(torch.autograd.Function):
        """The surrogate backward under create_graph=True: the fused kernels have no
        second derivative, so differentiating through it raises (it would be 0)."""

        @staticmethod
        def forward(ctx, grad_spikes, grad_v, membrane_seq, negative_open_seq, threshold, group_size,
                    signed, neg_margin, surrogate, alpha):
            return torch.ops.fastspike.neuron_backward_surrogate(
                grad_spikes, grad_v, membrane_seq, negative_open_seq, threshold, group_size, signed,
                neg_margin, surrogate, alpha)

        @staticmethod
        def backward(ctx, *grads):
            raise RuntimeError(
                "fastspike.neuron(grad='surrogate'): the fused kernels have no second derivative, so a "
                "double backward (differentiating a gradient taken with create_graph=True) is not "
                "supported; run the neuron under fastspike.use_reference() (the pure-PyTorch loop, "
                "which differentiates its surrogate twice), or use grad='rate'")

    class _Neuron(torch.autograd.Function):
        """The differentiable neuron (the kernel of the ``fastspike::neuron`` operator): the
        kernel forward records what ``grad`` needs, and the surrogate shape and sharpness,
        which only the backward reads, stay here in the context, not in the kernel's schema."""

        @staticmethod
        def forward(ctx, x_seq, threshold, v_init, count_init, group_size, signed, init_fraction, neg_margin,
                    grad, surrogate, alpha, residual):
            spikes, v, count, membrane_seq, negative_open_seq, input_mean = torch.ops.fastspike.neuron_forward(
                x_seq, threshold, v_init, count_init, group_size, signed, init_fraction, neg_margin, grad, residual)
            ctx.grad_mode = grad
            ctx.params = (group_size, signed, neg_margin, surrogate, alpha)
            ctx.has_v_init, ctx.has_residual = v_init is not None, residual is not None
            ctx.save_for_backward(threshold, membrane_seq, negative_open_seq, input_mean)
            ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros
            ctx.mark_non_differentiable(count)
            if grad == "rate":
                ctx.mark_non_differentiable(v)  # the rate gradient defines none for v (as the reference)
            return spikes, v, count

        @staticmethod
        def backward(ctx, grad_spikes, grad_v, _grad_count):
            threshold, membrane_seq, negative_open_seq, input_mean = ctx.saved_tensors
            group_size, signed, neg_margin, surrogate, alpha = ctx.params
            if ctx.grad_mode == "none":
                raise RuntimeError(
                    "fastspike::neuron was called with grad='none', which records nothing for a backward; "
                    "call it with grad='surrogate' or 'rate' (fastspike.neuron does this whenever an input "
                    "requires grad)")
            if grad_spikes is None:
                grad_spikes = torch.zeros_like(membrane_seq if ctx.grad_mode == "surrogate" else input_mean)
            grad_v_init = None
            if ctx.grad_mode == "surrogate":
                args = (grad_spikes, grad_v, membrane_seq, negative_open_seq, threshold, group_size,
                        signed, neg_margin, surrogate, alpha)
                if torch.is_grad_enabled():  # create_graph=True: a double backward must not be silently 0
                    grad_x, grad_v_init = _SurrogateBackward.apply(*args)
                else:
                    grad_x, grad_v_init = torch.ops.fastspike.neuron_backward_surrogate(*args)
            elif torch.is_grad_enabled():
                grad_x = _RateBackward.apply(grad_spikes, input_mean, threshold)
            else:
                grad_x = torch.ops.fastspike.neuron_backward_rate(grad_spikes, input_mean, threshold)
            # x_seq + residual is what charges the neurons: both get the same gradient
            # (autograd sums it over T for an operand that was a time broadcast).
            return (grad_x, None, grad_v_init if ctx.has_v_init else None, None, None, None, None, None,
                    None, None, None, grad_x if ctx.has_residual else None)

    def _neuron_kernel(x_seq, threshold, v_init, count_init, group_size, signed, init_fraction, neg_margin,
                       grad, surrogate, alpha, residual=None):
        # What only this operator takes (the kernel checks the rest): refused here, before the
        # forward, not first in the backward.
        check_choice(grad, "grad", GRAD_MODES)
        check_choice(surrogate, "surrogate", SURROGATES)
        check_real(alpha, "alpha (surrogate sharpness)", "a finite number > 0", minimum=0.0, strict=True)
        return _Neuron.apply(x_seq, threshold, v_init, count_init, group_size, signed, init_fraction,
                             neg_margin, grad, surrogate, alpha, residual)

    # The kernel of fastspike::neuron (schema in csrc/neuron/neuron.cpp): composite, so that
    # autograd, TorchScript, jit.trace, torch.compile and export all reach _Neuron.
    _LIBRARY = torch.library.Library("fastspike", "IMPL")
    _LIBRARY.impl("neuron", _neuron_kernel, "CompositeImplicitAutograd")

    def _no_derivative(ctx, inputs, output):
        raise RuntimeError(
            "fastspike::neuron_forward is the kernel and has no derivative of its own (the surrogate shape "
            "is not one of its arguments): differentiate through fastspike::neuron(x_seq, threshold, v_init, "
            "count_init, group_size, signed, init_fraction, neg_margin, grad, surrogate, alpha, residual) "
            "or fastspike.neuron, or call it under torch.no_grad()")

    # Registered so that a call with inputs that require grad fails here, loudly, instead of
    # leaving outputs that silently carry no gradient.
    torch.library.register_autograd("fastspike::neuron_forward", lambda ctx, *grads: None,
                                    setup_context=_no_derivative)


def _cpu_kernels() -> str:
    """The build of the CPU lane loops that runs, by the rule of lane_build() in
    csrc/neuron/cpu/neuron_kernel.cpp: on x86-64 the widest of AVX-512 and AVX2
    that ATen's CPU capability (ATEN_CPU_CAPABILITY) allows, else the baseline.
    ATen's AVX512 capability already requires AVX-512 F, BW, VL and DQ."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return "baseline"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        return "avx512"
    return "baseline" if capability == "DEFAULT" else "avx2"


def _cpu_huge_page_outputs() -> str:
    """Whether large CPU outputs are huge-page backed, by the rule of
    huge_page_outputs_enabled() in csrc/neuron/cpu/huge_page_allocator.cpp (Linux,
    unless FASTSPIKE_HUGE_PAGES=0), with the kernel's THP mode, which decides
    whether the advice is taken ("always"/"madvise" yes, "never" no), and the
    reuse cache's size (FASTSPIKE_OUTPUT_CACHE_MB, default 64)."""
    if not sys.platform.startswith("linux"):
        return "off (not Linux)"
    if os.environ.get("FASTSPIKE_HUGE_PAGES") == "0":
        return "off (FASTSPIKE_HUGE_PAGES=0)"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
            mode = f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        mode = "unknown"
    cache_mb = os.environ.get("FASTSPIKE_OUTPUT_CACHE_MB") or "64"
    return f"on (THP {mode}), reuse cache {cache_mb} MB"


def backend_info() -> Dict[str, Any]:
    """Which implementation runs the neuron operators, and why.

    Keys: ``backend`` ("extension" or "reference"), ``source`` ("prebuilt",
    "jit", "library" (``FASTSPIKE_LIBRARY``) or None), ``reason``, ``library`` (path of the loaded library),
    ``cuda_kernels`` (the library has CUDA implementations),
    ``cuda_available`` (torch sees a GPU), ``cpu_kernels`` ("avx512",
    "avx2" or "baseline": the instruction set of the CPU lane loops), ``cpu_huge_page_outputs``
    (whether operator outputs of 4 MB or more are advised for transparent huge pages, the
    kernel's THP mode and the size of the cache that keeps freed ones for reuse:
    "on (THP madvise), reuse cache 64 MB", "off (FASTSPIKE_HUGE_PAGES=0)", ...), ``cupy`` (whether the CuPy/NVRTC
    kernels serve CUDA tensors, and why; see :mod:`fastspike.cupy_backend`),
    ``torch`` (version).
    """
    return {
        "backend": _STATE.name,
        "source": _STATE.source,
        "reason": _STATE.reason,
        "library": _STATE.library,
        "cuda_kernels": _backend.has_cuda_kernels(),
        "cuda_available": torch.cuda.is_available(),
        "cpu_kernels": _cpu_kernels(),
        "cpu_huge_page_outputs": _cpu_huge_page_outputs(),
        "cupy": cupy_backend.status(),
        "torch": torch.__version__,
    }


OutBuffers = Union[torch.Tensor, Sequence[torch.Tensor]]


def _read_operand(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The memory the operator reads for x_seq / v_init / count_init: the tensor
    itself when contiguous, its one step when a time broadcast (time_stream in
    neuron.cpp), else None (the operator reads a copy, which nothing can overlap)."""
    if t is None:
        return None
    if t.dim() >= 1 and t.shape[0] > 1 and t.stride(0) == 0:
        step = t.select(0, 0)
        return step if step.is_contiguous() else None
    return t if t.is_contiguous() else None


def _check_out_memory(out: Tuple[torch.Tensor, torch.Tensor, torch.Tensor], x_seq: torch.Tensor,
                      v_init: Optional[torch.Tensor], count_init: Optional[torch.Tensor],
                      residual: Optional[torch.Tensor], threshold: torch.Tensor) -> None:
    """The overlap rules of the out= buffers (check_forward_out in neuron.cpp), in
    Python before any backend so that every backend raises the same ValueError."""
    if torch.compiler.is_compiling() or any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in out):
        # Fake tensors have no data pointers; and compiled, functionalization hands the operator
        # fresh buffers and copies back, so an overlap cannot corrupt the result there.
        return
    # The threshold is read in place when already contiguous in the accumulation dtype.
    read_threshold = threshold if (threshold.dtype == accumulation_dtype(x_seq.dtype)
                                   and threshold.is_contiguous()) else None
    check_out_overlaps(out, _read_operand(x_seq), _read_operand(v_init), _read_operand(count_init),
                       _read_operand(residual), read_threshold)


_forced_reference = 0  # depth of nested use_reference() blocks


@contextlib.contextmanager
def use_reference() -> Iterator[None]:
    """Within this block every neuron call runs the pure-PyTorch reference loop,
    e.g. to time a converted network against the loop it replaces or to check
    gradients. Not thread-safe: it switches a module-level flag."""
    global _forced_reference
    _forced_reference += 1
    try:
        yield
    finally:
        _forced_reference -= 1


def _use_reference(x_seq: torch.Tensor) -> bool:
    global _warned_cuda_fallback
    if _STATE.name != "extension" or _forced_reference:
        return True
    if not x_seq.is_cuda:
        return False
    # The same kernel source compiled at run time by CuPy/NVRTC serves the
    # CUDA key when the library has no CUDA kernels (FASTSPIKE_CUPY=0: never).
    # One dispatcher query per call: this runs on every CUDA neuron call.
    has_cuda_kernels = _backend.has_cuda_kernels()
    if cupy_backend.ensure_registered(has_cuda_kernels):
        return False
    if not has_cuda_kernels:
        if not _warned_cuda_fallback:
            warnings.warn(
                "fastspike: the operator library was built without CUDA kernels; CUDA tensors "
                "run on the pure-PyTorch reference. Rebuild with nvcc available "
                "(FASTSPIKE_FORCE_CUDA=1) or install CuPy for the fused kernels "
                f"(CuPy path: {cupy_backend.status()['reason']}).",
                RuntimeWarning,
                stacklevel=3,
            )
            _warned_cuda_fallback = True
        return True
    return False


def _mark_written(buffers: Sequence[torch.Tensor]) -> None:
    """Bump the version counters of out= buffers the C++ operator wrote: a C++
    custom op's mutation is invisible to autograd's saved-tensor check otherwise,
    and a buffer that some graph saved for backward would then give a silently
    wrong gradient instead of autograd's "modified by an inplace operation" error."""
    if not torch.compiler.is_compiling():
        for buffer in buffers:
            torch.autograd.graph.increment_version(buffer)


def _below_autograd_unless(needs_grad: bool) -> Any:
    """A call that records no backward skips the autograd layer in front of the
    operators (the Python kernel torch.library.register_autograd installs, which
    runs even under torch.no_grad() and cost ~28 of ~48 us a call on a small
    layer), as torch.inference_mode() would, but the outputs stay ordinary tensors
    that later autograd code may use. While torch.compile traces, the plain call
    is kept for Dynamo to see."""
    if needs_grad or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()


def _traced_with_grad(grad: str, compact: bool) -> bool:
    """Under torch.jit.trace the op records its backward whatever this call needs:
    a trace must not depend on grad mode (its check re-runs the model under
    torch.no_grad() and compares the graphs), and the traced module may train."""
    return grad != "none" and not compact and torch.jit.is_tracing()


def neuron(
    x_seq: torch.Tensor,
    threshold: Threshold,
    *,
    group_size: int = 1,
    signed: bool = False,
    init_fraction: float = 0.5,
    neg_margin: float = 1e-3,
    v_init: Optional[torch.Tensor] = None,
    count_init: Optional[torch.Tensor] = None,
    grad: str = "surrogate",
    surrogate: str = "sigmoid",
    alpha: Optional[float] = None,
    out: Optional[OutBuffers] = None,
    residual: Optional[torch.Tensor] = None,
    compact: bool = False,
) -> NeuronResult:
    """Runs a layer of spiking neurons over all T time steps in one call.

    Args:
        x_seq: input currents, shape [T, ...] (time leading; typically
            [T, B, C, H, W]); float16, bfloat16, float32 or float64.
        threshold: θ > 0: a number, a tensor of one element, a per-channel
            tensor [C] (C = x_seq.size(2)), or a per-neuron tensor of shape
            x_seq.shape[2:] (shared over the batch) or x_seq.shape[1:].
        group_size: m ≥ 1 members sharing one membrane with thresholds
            θ/m, 2θ/m … θ (group neurons); 1 is plain IF.
        signed: emit negative spikes to undo earlier positive ones (Fast-SNN).
        init_fraction: initial membrane φ as a fraction of u = θ/m (0.5 as in
            QCFS); ignored when v_init is given.
        neg_margin: ε, a negative spike needs v ≤ −ε (1e-3 as in Fast-SNN).
        v_init, count_init: state to start from (the v and count of an earlier
            call), shapes x_seq.shape[1:]; v in float32 (float64 for float64
            input), count int32. Running T1 then T2 steps from the returned
            state equals running T1 + T2 steps.
        grad: gradient used when an input requires grad: "surrogate" (BPTT
            with a smooth step derivative) or "rate" (straight-through on the
            time average, as Fast-SNN's fine-tuning). "none" forbids backward.
        surrogate, alpha: surrogate shape, "sigmoid" (α = 4 by default) or
            "atan" (α = 2).
        out: preallocated buffers for inference loops that reuse them (not
            differentiable): a [T, ...] tensor (x_seq's dtype, int8 when
            compact; contiguous) for the spikes, which may be x_seq (or
            residual) itself; or a sequence (spikes, v,
            count), e.g. the NeuronResult of an earlier call, to receive the
            final state too (contiguous, the dtypes of v_init/count_init), so
            nothing is allocated; v and count may be v_init and count_init
            themselves (the state is updated in place).
        residual: optional second operand, x_seq's shape and dtype (strides
            free): the neurons are charged with x_seq + residual, rounded in
            x_seq's dtype exactly as ``neuron(x_seq + residual)`` would, but
            the sum is never written to memory (the residual join of a ResNet
            block). Both operands receive the same gradient.
        compact: return the spikes as the int8 signed counts k⁺ − k⁻ per step
            (1 byte instead of (k⁺ − k⁻)·u in x_seq's dtype; the consumer
            applies u = θ/m). Inference only (no input may require grad);
            group_size ≤ 127.

    x_seq and residual may be time broadcasts, e.g.
    ``x.unsqueeze(0).expand(T, *x.shape)`` for an input that is the same at
    every step: they are read at every step with time stride 0 and never
    copied T times; the gradient of such an operand sums over T.

    Returns:
        NeuronResult(spikes [T, ...] in x_seq's dtype (int8 when compact),
        v [...], count [...]).
    """
    # Every argument is checked here, before any backend runs: the same TypeError /
    # ValueError from the C++ extension, the CuPy kernels and the reference.
    check_neuron_call(x_seq, threshold, group_size, signed, init_fraction, neg_margin, v_init, count_init,
                      grad, surrogate, alpha, residual, compact)
    alpha = DEFAULT_ALPHA[surrogate] if alpha is None else (alpha if type(alpha) is float else float(alpha))
    if type(group_size) is not int and not isinstance(group_size, torch.SymInt):
        group_size = int(group_size)  # e.g. a NumPy integer, which the operator schema does not take
    threshold = threshold_tensor(threshold, x_seq)
    needs_grad = torch.is_grad_enabled() and (
        x_seq.requires_grad
        or (v_init is not None and v_init.requires_grad)
        or (residual is not None and residual.requires_grad)
    )
    if needs_grad and grad == "none":
        raise ValueError("grad='none' was given but an input requires grad; use 'surrogate' or 'rate'")
    check_compact(compact, group_size, grad if needs_grad else "none")
    if out is not None:
        out = out_buffers(out, x_seq, needs_grad, bool(compact))
        _check_out_memory(out, x_seq, v_init, count_init, residual, threshold)
    if _use_reference(x_seq):
        result = neuron_reference(
            x_seq, threshold, group_size=group_size, signed=signed, init_fraction=init_fraction,
            neg_margin=neg_margin, v_init=v_init, count_init=count_init,
            grad=grad if needs_grad else "none", surrogate=surrogate, alpha=alpha,
            residual=residual, compact=compact,
        )
        if out is not None:
            for buffer, value in zip(out, result):
                buffer.copy_(value)
            return NeuronResult(*out)
        return result
    with _below_autograd_unless(needs_grad or _traced_with_grad(grad, compact)):
        if out is not None:
            spikes, v, count = out
            torch.ops.fastspike.neuron_forward.out(
                x_seq, threshold, v_init, count_init, group_size, bool(signed), float(init_fraction),
                float(neg_margin), residual, bool(compact), spikes=spikes, v_final=v, count_final=count,
            )
            _mark_written(out)
            return NeuronResult(*out)
        if needs_grad or _traced_with_grad(grad, compact):
            # The differentiable operator (a trace records it, so that the traced module trains).
            spikes, v, count = torch.ops.fastspike.neuron(
                x_seq, threshold, v_init, count_init, group_size, bool(signed), float(init_fraction),
                float(neg_margin), grad, surrogate, alpha, residual)
        else:
            spikes, v, count, _, _, _ = torch.ops.fastspike.neuron_forward(
                x_seq, threshold, v_init, count_init, group_size, bool(signed), float(init_fraction),
                float(neg_margin), "none", residual, bool(compact))
    return NeuronResult(spikes, v, count)
