"""The pure-PyTorch time loop of the generalised spiking neuron (docs/design.md §2).

This module defines what fastspike computes. It is

* the semantics oracle: every kernel is tested against it (bit for bit in
  float32/float64, since it performs the same roundings in the same order);
* the fallback when no compiled operator library is available;
* the baseline the benchmarks compare against.

One neuron covers IF (group_size=1), signed IF (signed=True, Fast-SNN's
negative spikes) and group neurons (group_size=m > 1, Lv et al.): per step

1. charge        h = v + x_t
2. fire          k⁺ = Σ_{j=1..m} [h ≥ j·u],  u = θ/m
3. reset         v = h − k⁺·u,  c = c + k⁺
4. (signed)      k⁻ = min(c, Σ_{j=1..m} [v ≤ −ε − (j−1)·u]),  v = v + k⁻·u,  c = c − k⁻
5. output        s_t = (k⁺ − k⁻)·u

Gradients: ``grad="surrogate"`` backpropagates through time with each step
function [a ≥ b] given the derivative φ'((a − b)/u)/u of a smooth surrogate φ
(sigmoid or arctan, sharpness α) and the reset path detached; the count c and
the cap min(c, ·) carry no gradient (k⁻ depends on v only while it is below
c). ``grad="rate"`` is Fast-SNN's straight-through rule on the time average:
grad x_t = (1/T)·Σ_τ g_τ·[0 < x̄ < θ]. The threshold receives no gradient.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Tuple, Union

import torch

from .checks import MAX_COMPACT_GROUP, check_compact, check_state  # noqa: F401 (MAX_COMPACT_GROUP re-exported)

__all__ = [
    "NeuronResult",
    "accumulation_dtype",
    "neuron_reference",
    "seed_style_loop",
    "DEFAULT_ALPHA",
]

# Sharpness defaults as in SpikingJelly's surrogate functions.
DEFAULT_ALPHA = {"sigmoid": 4.0, "atan": 2.0}
# |α·z| beyond which the sigmoid surrogate's derivative is 0 (kSigmoidTailCut in C++).
SIGMOID_TAIL_CUT = 40.0

Threshold = Union[float, torch.Tensor]


class NeuronResult(NamedTuple):
    """Output of a multi-step neuron call."""

    spikes: torch.Tensor  #: [T, ...], x_seq's dtype: (k⁺ − k⁻)·u per step (int8 k⁺ − k⁻ if compact)
    v: torch.Tensor  #: [...], float32 (float64 for float64 input): final membrane
    count: torch.Tensor  #: [...], int32: final net spike count c


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16/bfloat16/float32, float64 for float64 (docs/design.md §2)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def threshold_tensor(threshold: Threshold, x_seq: torch.Tensor) -> torch.Tensor:
    """Turns a Python number into a 0-dim tensor on x_seq's device, checking it
    on the host first so that no device value is ever read back."""
    if isinstance(threshold, torch.Tensor):
        return threshold
    if type(threshold) is not float and (isinstance(threshold, bool) or not isinstance(
            threshold, (numbers.Real, torch.SymFloat, torch.SymInt))):
        raise TypeError(f"threshold must be a number or a tensor, got {type(threshold).__name__}")
    # Under torch.compile(dynamic=True) the number may be symbolic: no branching on it there.
    if not torch.compiler.is_compiling() and not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be finite and > 0 everywhere, got {threshold}")
    # scalar_tensor: half the cost of torch.tensor here, and a fill (no host copy) on CUDA.
    return torch.scalar_tensor(float(threshold), dtype=accumulation_dtype(x_seq.dtype), device=x_seq.device)


def broadcast_threshold(threshold: torch.Tensor, x_seq: torch.Tensor) -> torch.Tensor:
    """The threshold in the accumulation dtype, shaped to broadcast against one
    time step x_seq[t]: scalar, per channel [C] (dim 2 of x_seq), or per neuron
    (shape x_seq.shape[2:] or x_seq.shape[1:])."""
    if threshold.device != x_seq.device:
        raise ValueError(
            f"threshold must be on the same device as x_seq ({x_seq.device}), got {threshold.device}"
        )
    if threshold.dtype not in _FLOATS:
        raise TypeError(f"threshold must be a floating-point tensor, got {threshold.dtype}")
    acc = accumulation_dtype(x_seq.dtype)
    shape, x_shape = tuple(threshold.shape), tuple(x_seq.shape)
    if threshold.numel() == 1 and threshold.dim() <= 1:
        out = threshold.reshape(())
    elif threshold.dim() == 1 and len(x_shape) >= 3 and shape[0] == x_shape[2]:
        out = threshold.reshape((shape[0],) + (1,) * (len(x_shape) - 3))
    elif (len(x_shape) >= 3 and shape == x_shape[2:]) or (len(x_shape) >= 2 and shape == x_shape[1:]):
        out = threshold
    else:
        raise ValueError(
            "threshold must be a scalar, a per-channel tensor of shape [C] with C = x_seq.size(2), "
            "or a per-neuron tensor of shape x_seq.shape[2:] or x_seq.shape[1:]; "
            f"x_seq has shape {list(x_shape)}, threshold has shape {list(shape)}"
        )
    from .checks import check_threshold_values

    # Values are read on the CPU only, and not while torch.compile/export trace.
    check_threshold_values(threshold, acc)
    return out.to(acc)


def surrogate_derivative(z: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """φ'(z) of the surrogate step, z in units of u."""
    if kind == "atan":
        w = (math.pi / 2) * alpha * z
        return alpha / (2 * (1 + w * w))
    a = alpha * z
    s = torch.sigmoid(a)
    # The far tail (below α·e^-40) is cut to exactly 0, as kSigmoidTailCut in
    # csrc/neuron/neuron_step.h: otherwise it leaves denormal gradients that make
    # the next layer's backward crawl on Intel CPUs.
    return torch.where(a.abs() > SIGMOID_TAIL_CUT, torch.zeros_like(s), alpha * s * (1 - s))


class _StepGe(torch.autograd.Function):
    """[a ≥ b] with the surrogate derivative ±φ'((a − b)/u)/u."""

    @staticmethod
    def forward(ctx, a, b, unit, kind: str, alpha: float):
        ctx.save_for_backward(a, b, unit)
        ctx.kind, ctx.alpha = kind, alpha
        return (a >= b).to(a.dtype)

    @staticmethod
    def backward(ctx, grad):
        a, b, unit = ctx.saved_tensors
        d = grad * surrogate_derivative((a - b) / unit, ctx.kind, ctx.alpha) / unit
        return (
            d if ctx.needs_input_grad[0] else None,
            -d if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
        )


def exact_div(a: torch.Tensor, n: Union[int, float]) -> torch.Tensor:
    """a / n correctly rounded (IEEE division) on every device, as the kernels'
    div_rn. Dividing by the Python number n would not be: PyTorch's CUDA div
    of a tensor by a CPU scalar multiplies by the rounded reciprocal 1/n (one
    ulp off for about a third of the values when n = 3), while the CPU divides
    (docs/design.md §4). A 0-dim tensor on a's own device is no CPU scalar, so CUDA
    divides too. ``a`` must be in its accumulation dtype (float32/float64)."""
    return a / torch.scalar_tensor(n, dtype=a.dtype, device=a.device)


def _unit(theta: torch.Tensor, group_size: int) -> torch.Tensor:
    """u = θ/m, correctly rounded on every device (exact_div); NaN where θ is
    not finite and > 0 (what the kernels do on CUDA, where threshold values are
    not checked)."""
    unit = exact_div(theta, group_size)
    return torch.where((unit > 0) & torch.isfinite(unit), unit, torch.full_like(unit, math.nan))


def _run(
    x_seq: torch.Tensor,
    theta: torch.Tensor,
    group_size: int,
    signed: bool,
    init_fraction: float,
    neg_margin: float,
    v_init: Optional[torch.Tensor],
    count_init: Optional[torch.Tensor],
    step,
    compact: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The time loop. `step(a, b, unit)` computes [a ≥ b] (with or without a
    surrogate gradient). Returns spikes (int8 counts k⁺ − k⁻ when compact), v,
    count and the running sum of x."""
    acc = accumulation_dtype(x_seq.dtype)
    state_shape = x_seq.shape[1:]
    unit = _unit(theta, group_size)
    if v_init is not None:
        v = v_init
    else:
        v = (torch.tensor(init_fraction, dtype=acc, device=x_seq.device) * unit).expand(state_shape)
    count = count_init if count_init is not None else x_seq.new_zeros(state_shape, dtype=torch.int32)
    # The same roundings as the kernels: j·u and −ε − (j−1)·u, each rounded once.
    pos_levels = [j * unit for j in range(1, group_size + 1)]
    neg_eps = -torch.tensor(neg_margin, dtype=acc, device=x_seq.device)
    neg_levels = [neg_eps - (j - 1) * unit for j in range(1, group_size + 1)]
    total = torch.zeros(state_shape, dtype=acc, device=x_seq.device)
    spikes = []
    for t in range(x_seq.shape[0]):
        x_t = x_seq[t].to(acc)
        total = total + x_t
        h = v + x_t
        k_pos = sum(step(h, level, unit) for level in pos_levels)
        v = h - k_pos.detach() * unit
        count = count + k_pos.detach().to(torch.int32)
        k = k_pos
        if signed:
            n_neg = sum(step(level, v, unit) for level in neg_levels)
            open_ = n_neg.detach() < count
            k_neg = torch.where(open_, n_neg, count.to(acc))
            v = v + k_neg.detach() * unit
            count = count - k_neg.detach().to(torch.int32)
            k = k_pos - k_neg
        spikes.append(k.to(torch.int8) if compact else (k * unit).to(x_seq.dtype))
    out_dtype = torch.int8 if compact else x_seq.dtype
    if spikes:
        spikes_seq = torch.stack(spikes)
    else:
        spikes_seq = torch.empty(x_seq.shape, dtype=out_dtype, device=x_seq.device)
    v = v.expand(state_shape).contiguous() if v.shape != state_shape else v
    return spikes_seq, v, count, total


def _surrogate_step(kind: str, alpha: float):
    return lambda a, b, unit: _StepGe.apply(a, b, unit, kind, alpha)


def _plain_step(a, b, unit):
    return (a >= b).to(a.dtype)


class _RateNeuron(torch.autograd.Function):
    """The neuron with Fast-SNN's straight-through rate gradient."""

    @staticmethod
    def forward(ctx, x_seq, theta, group_size, signed, init_fraction, neg_margin, v_init, count_init):
        spikes, v, count, total = _run(
            x_seq, theta, group_size, signed, init_fraction, neg_margin, v_init, count_init, _plain_step
        )
        mean = exact_div(total, x_seq.shape[0])
        ctx.save_for_backward(mean, theta)
        ctx.time_steps = x_seq.shape[0]
        ctx.mark_non_differentiable(v, count)
        return spikes, v, count

    @staticmethod
    def backward(ctx, grad_spikes, grad_v, grad_count):
        mean, theta = ctx.saved_tensors
        acc_grad = exact_div(grad_spikes.to(mean.dtype).sum(0), ctx.time_steps)
        passed = torch.where((mean > 0) & (mean < theta), acc_grad, torch.zeros_like(acc_grad))
        grad_x = passed.to(grad_spikes.dtype).unsqueeze(0).expand_as(grad_spikes).contiguous()
        return grad_x, None, None, None, None, None, None, None


def neuron_reference(
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
    residual: Optional[torch.Tensor] = None,
    compact: bool = False,
) -> NeuronResult:
    """Runs the generalised neuron over all T steps of ``x_seq`` [T, ...] with a
    Python loop over time. Same arguments and results as
    :func:`fastspike.neuron`, which it defines: ``residual`` means charging
    with ``x_seq + residual`` (torch's add, so rounded in x_seq's dtype), and
    ``compact`` returns the int8 counts k⁺ − k⁻ instead of (k⁺ − k⁻)·u."""
    from .checks import check_neuron_call

    check_neuron_call(x_seq, threshold, group_size, signed, init_fraction, neg_margin, v_init, count_init,
                      grad, surrogate, alpha, residual, compact)
    alpha = DEFAULT_ALPHA[surrogate] if alpha is None else alpha
    check_compact(compact, group_size, grad)
    if residual is not None:
        x_seq = x_seq + residual
    acc = accumulation_dtype(x_seq.dtype)
    theta = broadcast_threshold(threshold_tensor(threshold, x_seq), x_seq)
    check_state(v_init, x_seq, acc, "v_init")
    check_state(count_init, x_seq, torch.int32, "count_init")
    args = (x_seq, theta.detach(), group_size, bool(signed), float(init_fraction), float(neg_margin), v_init, count_init)
    if grad == "rate":
        return NeuronResult(*_RateNeuron.apply(*args))
    if grad == "none":
        with torch.no_grad():
            spikes, v, count, _ = _run(*args, _plain_step, compact=compact)
    else:
        spikes, v, count, _ = _run(*args, _surrogate_step(surrogate, alpha))
    return NeuronResult(spikes, v, count)


def seed_style_loop(
    x_seq: torch.Tensor, threshold: float, signed: bool = True, neg_margin: float = 1e-3
) -> torch.Tensor:
    """A transcription of the loop published Fast-SNN code runs for an IF or
    signed IF layer (boolean-mask indexing ``mem[spikes] -= θ``, one Python
    step at a time), kept as the benchmarks' "seed-style" baseline. For a
    float32 x_seq and a scalar threshold it gives the same spikes as
    neuron_reference(..., signed=signed)."""
    mem = torch.full_like(x_seq[0], 0.5 * threshold)
    fired = torch.zeros_like(x_seq[0])
    out = []
    for t in range(x_seq.shape[0]):
        mem = mem + x_seq[t]
        spikes = torch.zeros_like(mem)
        pos = mem >= threshold
        spikes[pos] = threshold
        mem[pos] -= threshold
        fired[pos] += 1
        if signed:
            neg = (mem <= -neg_margin) & (fired > 0)
            spikes[neg] = -threshold
            mem[neg] += threshold
            fired[neg] -= 1
        out.append(spikes)
    return torch.stack(out)
