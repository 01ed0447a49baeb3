"""Spiking neuron layers on the fused operators.

The layers take either layout:

* ``layout="merged"`` (converted networks): x is [T·B, ...], time-major, the
  module knows T (``time_steps``) and views it as [T, B, ...];
* ``layout="sequence"``: x is [T, B, ...].

A per-channel threshold [C] applies along the channel dim (dim 1 of the
merged layout, dim 2 of the sequence layout).

``forward`` is stateless: every call starts from the initial membrane, so
there is no hidden state to forget to reset. For online use, :meth:`step`
takes and returns the state explicitly::

    state = None
    for chunk in stream:               # chunk: [t, B, ...]
        spikes, state = layer.step(chunk, state)
"""

from __future__ import annotations

import contextvars
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import checks
from .ops import neuron
from .reference import accumulation_dtype, broadcast_threshold, exact_div

# {SpikingNeuron: int8 counts} of the record_spike_trains call running in this
# thread (or asyncio task): recording per call, never through shared module state.
_RECORDING: contextvars.ContextVar[Optional[Dict["SpikingNeuron", torch.Tensor]]] = contextvars.ContextVar(
    "fastspike_recording", default=None)

__all__ = ["NEURON_KINDS", "NeuronKind", "resolve_neuron_kind", "neuron_kind_name", "RepeatOverTime", "ShapeOverTime", "ReadoutOverTime", "SpikingNeuron", "IFNeuron", "SignedIFNeuron", "GroupNeuron", "NeuronState",
           "record_spike_trains"]


class NeuronState(NamedTuple):
    """Membrane v and net spike count of a layer, shape of one time step."""

    v: torch.Tensor
    count: torch.Tensor


class SpikingNeuron(nn.Module):
    """A layer of generalised spiking neurons (docs/design.md §2) run by the fused ops.

    Args:
        threshold: θ, a number or a tensor ([C] per channel, or per neuron);
            kept as a buffer (not trained through the neuron).
        time_steps: T, needed for the merged layout.
        group_size: m (1 = IF).
        signed: negative spikes (Fast-SNN).
        layout: "merged" ([T·B, ...]) or "sequence" ([T, B, ...]).
        init_fraction, neg_margin, grad, surrogate, alpha: as
            :func:`fastspike.neuron`.
        compact: output the signed spike counts k⁺ − k⁻ (in x's dtype, from
            the op's int8 counts) instead of (k⁺ − k⁻)·u: for a consumer
            that has u folded into its weights (``to_snn(compact_spikes=True)``).
            Inference only.
        record: keep the int8 counts k⁺ − k⁻ of the last forward, [T, B, ...],
            in ``self.recorded``; the output is unchanged. That attribute is
            shared by every thread that runs the module: where threads share
            a model, use :func:`record_spike_trains`, which records per call.
        constant_input, constant_residual: x (the residual) is one step
            [B, ...] that is the same at every step (the analog image before
            the first spiking layer); it is read T times without being copied.
            Set by ``to_snn(constant_input_once=True)``; needs time_steps.

    ``forward(x, residual=None)``: with a residual, the neurons are charged
    with x + residual (the fused residual join of ``to_snn(fuse_residual=True)``).

    ``torch.jit.script`` compiles ``forward`` to a direct call of the compiled
    operator (the extension must be loaded; ``record`` and the fused residual
    join are eager/compile/export features: a scripted module adds a residual
    first). ``torch.compile`` and ``torch.export`` run the full Python path.
    """

    def __init__(
        self,
        threshold: Union[float, torch.Tensor] = 1.0,
        time_steps: Optional[int] = None,
        *,
        group_size: int = 1,
        signed: bool = False,
        layout: str = "merged",
        init_fraction: float = 0.5,
        neg_margin: float = 1e-3,
        grad: str = "surrogate",
        surrogate: str = "sigmoid",
        alpha: Optional[float] = None,
        compact: bool = False,
        record: bool = False,
        constant_input: bool = False,
        constant_residual: bool = False,
    ):
        super().__init__()
        checks.check_choice(layout, "layout", ("merged", "sequence"))
        if time_steps is not None:
            checks.check_int(time_steps, "time_steps", 1, note="(T)")
        checks.check_int(group_size, "group_size", 1, checks.MAX_GROUP_SIZE, "2^20", "(1 = plain IF)")
        for flag, value in (("signed", signed), ("compact", compact), ("record", record),
                            ("constant_input", constant_input), ("constant_residual", constant_residual)):
            checks.check_bool(value, flag)
        # The values the neuron op would refuse, refused here (a float32 threshold buffer).
        probe = torch.empty(1, 1, dtype=torch.float32)
        checks.check_real(init_fraction, "init_fraction (initial membrane as a fraction of θ/m)", "finite")
        checks.check_real(neg_margin, "neg_margin", "a finite number >= 0 (ε: a negative spike needs v <= -ε)",
                          minimum=0.0, dtype=probe.dtype)
        checks.check_choice(grad, "grad", checks.GRAD_MODES)
        checks.check_choice(surrogate, "surrogate", checks.SURROGATES)
        if alpha is not None:
            checks.check_real(alpha, "alpha (surrogate sharpness)", "a finite number > 0", minimum=0.0,
                              strict=True, dtype=probe.dtype)
        if compact and group_size > checks.MAX_COMPACT_GROUP:
            raise ValueError(f"compact spikes are int8 counts |k| <= group_size, so group_size must be "
                             f"<= {checks.MAX_COMPACT_GROUP}, got {group_size}")
        if isinstance(threshold, (list, tuple)):
            threshold = torch.tensor(threshold, dtype=torch.float32)
        if isinstance(threshold, torch.Tensor):
            if threshold.dtype not in checks.FLOAT_DTYPES:
                raise TypeError(f"threshold must be a number or a floating-point tensor, got {threshold.dtype}")
            checks.check_threshold_values(threshold.detach().to(torch.float32), torch.float32)
        else:
            checks.check_threshold(threshold, probe)
        has_time_steps = time_steps is not None
        if (constant_input or constant_residual) and not has_time_steps:
            raise ValueError(f"constant_input/constant_residual need time_steps (an integer >= 1), "
                             f"got {time_steps!r}")
        if layout == "merged" and not has_time_steps:
            raise ValueError(f"time_steps must be an integer >= 1 for the merged layout, got {time_steps!r}")
        self.register_buffer("threshold", torch.as_tensor(threshold, dtype=torch.float32).detach().clone())
        self.time_steps = time_steps
        self.group_size = group_size
        self.signed = signed
        self.layout = layout
        self.init_fraction = float(init_fraction)
        self.neg_margin = float(neg_margin)
        self.grad = grad
        self.surrogate = surrogate
        self.alpha = None if alpha is None else float(alpha)
        self.compact = compact
        self.record = record
        self.constant_input = constant_input
        self.constant_residual = constant_residual
        self.recorded: Optional[torch.Tensor] = None

    def _to_sequence(self, x: torch.Tensor, constant: bool = False) -> torch.Tensor:
        if constant:  # a time broadcast (stride 0): the op reads it T times, no copy
            return x.unsqueeze(0).expand((self.time_steps,) + tuple(x.shape))
        if self.layout == "sequence":
            return x
        total = x.shape[0]
        if not torch.jit.is_tracing() and total % self.time_steps != 0:  # (a traced size is no bool)
            raise ValueError(f"merged input has {total} rows along dim 0, not a multiple of "
                             f"time_steps={self.time_steps}")
        return x.view((self.time_steps, total // self.time_steps) + tuple(x.shape[1:]))

    def _in_layout(self, x: torch.Tensor, constant: bool) -> torch.Tensor:
        """x in this layer's layout, a constant one repeated over T (materialised)."""
        if not constant:
            return x
        seq = self._to_sequence(x, True)
        return seq.reshape((-1,) + tuple(x.shape[1:])) if self.layout == "merged" else seq

    def spike_scale(self) -> torch.Tensor:
        """u = θ/m (float32, the threshold's shape): what one count is worth."""
        return exact_div(self.threshold.float(), self.group_size)  # as the kernels round u = θ/m

    @torch.jit.unused
    def _run(self, x: torch.Tensor, state: Optional[NeuronState], residual: Optional[torch.Tensor] = None):
        if type(x) is not torch.Tensor or x.dtype not in checks.FLOAT_DTYPES or not x.dim():
            checks.check_x(x, "x")
        if residual is not None and not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual must be a tensor or None, got {type(residual).__name__}")
        if state is not None and not (isinstance(state, tuple) and len(state) == 2):
            raise TypeError(f"state must be a NeuronState (v, count) or None, got {type(state).__name__}")
        sink = None if torch.compiler.is_compiling() else _RECORDING.get()
        record = self.record or sink is not None
        x_seq = self._to_sequence(x, self.constant_input)
        r_seq = None if residual is None else self._to_sequence(residual, self.constant_residual)
        if r_seq is not None and (r_seq.shape != x_seq.shape or r_seq.dtype != x_seq.dtype
                                  or r_seq.device != x_seq.device):
            # Broadcasting or type promotion: add exactly as the unfused graph did.
            total = self._in_layout(x, self.constant_input) + self._in_layout(residual, self.constant_residual)
            x_seq, r_seq = self._to_sequence(total), None
        out_shape = x_seq.shape if self.layout == "sequence" else (-1,) + tuple(x_seq.shape[2:])
        common = dict(group_size=self.group_size, signed=self.signed, init_fraction=self.init_fraction,
                      neg_margin=self.neg_margin, v_init=None if state is None else state.v,
                      count_init=None if state is None else state.count, residual=r_seq)
        needs_grad = torch.is_grad_enabled() and (
            x_seq.requires_grad or (r_seq is not None and r_seq.requires_grad)
            or (state is not None and state.v.requires_grad))
        if self.compact and needs_grad:
            raise ValueError("this SpikingNeuron has compact=True (its consumers have the spike scale "
                             "folded into their weights), which is inference only; convert with "
                             "compact_spikes=False to train or take gradients")
        if self.compact or (record and not needs_grad):
            result = neuron(x_seq, self.threshold, compact=True, grad="none", **common)
            counts = result.spikes
            if self.compact:
                spikes = counts.to(x_seq.dtype)
            else:  # (k⁺ − k⁻)·u rounded as the kernel does: u and the product in the acc dtype
                acc = accumulation_dtype(x_seq.dtype)
                unit = exact_div(broadcast_threshold(self.threshold, x_seq).to(acc), self.group_size)
                spikes = (counts.to(acc) * unit).to(x_seq.dtype)
        else:
            result = neuron(x_seq, self.threshold, grad=self.grad, surrogate=self.surrogate,
                            alpha=self.alpha, **common)
            spikes = result.spikes
            if record:  # recording must not change the gradient: a second, compact pass
                with torch.no_grad():
                    counts = neuron(x_seq.detach(), self.threshold, compact=True, grad="none",
                                    **dict(common, residual=None if r_seq is None else r_seq.detach())).spikes
        if self.record:
            self.recorded = counts
        if sink is not None:
            sink[self] = counts
        return spikes.reshape(out_shape), NeuronState(result.v, result.count)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(x, residual)
        return self._run(x, None, residual)[0]

    def _scripted_forward(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        """forward under TorchScript: the compiled operator called directly (the
        Python checks and backend choice of fastspike.neuron do not script)."""
        time_steps = self.time_steps
        if self.constant_input:
            assert time_steps is not None
            x = x.unsqueeze(0).expand([time_steps] + list(x.shape))
            if self.layout == "merged":
                x = x.reshape([-1] + list(x.shape[2:]))
        if residual is not None:
            x = x + residual  # (x's own rounding; the fused join is for eager, compile and export)
        if self.layout == "merged":
            assert time_steps is not None
            x_seq = x.view([time_steps, x.shape[0] // time_steps] + list(x.shape[1:]))
        else:
            x_seq = x
        if torch.is_grad_enabled() and x_seq.requires_grad:
            alpha = 4.0 if self.surrogate == "sigmoid" else 2.0
            given = self.alpha
            if given is not None:
                alpha = given
            spikes = torch.ops.fastspike.neuron(  # the differentiable operator
                x_seq, self.threshold, None, None, self.group_size, self.signed, self.init_fraction,
                self.neg_margin, self.grad, self.surrogate, alpha, None)[0]
        else:
            out = torch.ops.fastspike.neuron_forward(
                x_seq, self.threshold, None, None, self.group_size, self.signed, self.init_fraction,
                self.neg_margin, "none", None, self.compact)
            spikes = out[0].to(x.dtype) if self.compact else out[0]
        if self.layout == "merged":
            return spikes.reshape([-1] + list(spikes.shape[2:]))
        return spikes

    def step(self, x: torch.Tensor, state: Optional[NeuronState] = None,
             residual: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, NeuronState]:
        """Runs x (in this layer's layout) from ``state`` (None: the initial
        membrane) and returns the spikes and the state to continue from."""
        return self._run(x, state, residual)

    def extra_repr(self) -> str:
        shape = "scalar" if self.threshold.dim() == 0 else f"shape={list(self.threshold.shape)}"
        extras = [name for name in ("compact", "record", "constant_input", "constant_residual")
                  if getattr(self, name)]
        return (f"threshold={shape}, time_steps={self.time_steps}, group_size={self.group_size}, "
                f"signed={self.signed}, layout={self.layout!r}" + "".join(f", {e}=True" for e in extras))


# Attribute types for TorchScript, which infers NoneType from a None value (evaluated
# types: this module's annotations are strings, which TorchScript does not resolve).
SpikingNeuron.__annotations__ = {"time_steps": Optional[int], "alpha": Optional[float],
                                 "recorded": Optional[torch.Tensor]}


class NeuronKind(NamedTuple):
    """One kind of neuron the converter, the CLI and the benchmarks offer."""

    name: str
    signed: bool
    grouped: bool  #: m >= 2 members from the caller's group_size; else m = 1 (IF)
    doc: str


# The one table of neuron kinds: to_snn's `neuron=`, the CLI's --neuron choices and
# the benchmarks' are its keys. A new kind is one row here (plus its semantics in
# the kernels, if it needs new dynamics).
NEURON_KINDS: Dict[str, NeuronKind] = {k.name: k for k in (
    NeuronKind("if", signed=False, grouped=False, doc="integrate-and-fire (QCFS)"),
    NeuronKind("signed", signed=True, grouped=False, doc="signed IF, negative spikes (Fast-SNN)"),
    NeuronKind("group", signed=False, grouped=True, doc="group neurons, m members (Lv et al.)"),
    NeuronKind("signed-group", signed=True, grouped=True, doc="signed group neurons"),
)}


def neuron_kind_name(signed: bool, grouped: bool) -> str:
    """The NEURON_KINDS name of a (signed, grouped) combination."""
    return next(k.name for k in NEURON_KINDS.values() if k.signed == signed and k.grouped == grouped)


def resolve_neuron_kind(neuron: str, group_size: Optional[int]) -> Tuple[int, bool]:
    """(m, signed) for ``neuron=`` and ``group_size=``, with the errors a user
    gets for a wrong combination."""
    if neuron not in NEURON_KINDS:
        raise ValueError(f"neuron must be one of {sorted(NEURON_KINDS)}, got {neuron!r}")
    kind = NEURON_KINDS[neuron]
    if kind.grouped:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
            raise ValueError(f"neuron={neuron!r} needs group_size >= 2, got {group_size!r}")
        return group_size, kind.signed
    if group_size not in (None, 1):
        grouped = " or ".join(repr(k.name) for k in NEURON_KINDS.values() if k.grouped)
        raise ValueError(f"group_size={group_size} only applies to neuron={grouped}")
    return 1, kind.signed


class IFNeuron(SpikingNeuron):
    """Integrate-and-fire with reset by subtraction (QCFS)."""

    def __init__(self, threshold=1.0, time_steps=None, **kwargs):
        super().__init__(threshold, time_steps, group_size=1, signed=False, **kwargs)


class SignedIFNeuron(SpikingNeuron):
    """IF with negative spikes that undo earlier positive ones (Fast-SNN)."""

    def __init__(self, threshold=1.0, time_steps=None, **kwargs):
        super().__init__(threshold, time_steps, group_size=1, signed=True, **kwargs)


class GroupNeuron(SpikingNeuron):
    """m IF members sharing one membrane, thresholds θ/m … θ (Lv et al.)."""

    def __init__(self, threshold=1.0, time_steps=None, group_size: int = 2, **kwargs):
        super().__init__(threshold, time_steps, group_size=group_size, **kwargs)


@torch.no_grad()
def record_spike_trains(model: nn.Module, *inputs: Any, **kwargs: Any) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """Runs ``model(*inputs, **kwargs)`` once without gradients and returns
    its output with the spike trains of every :class:`SpikingNeuron` in it:
    {module name: int8 counts k⁺ − k⁻ of shape [T, B, ...]} (1 byte per neuron
    and step; multiply by ``module.spike_scale()`` for the spike values). The
    output is the same as without recording.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, SpikingNeuron)]
    if not layers:
        raise ValueError(f"record_spike_trains found no SpikingNeuron in {type(model).__name__}; "
                         "convert it with fastspike.to_snn first")
    # Recorded per call, in this thread's context: other threads running the same
    # model at the same time neither see nor overwrite these trains.
    sink: Dict[SpikingNeuron, torch.Tensor] = {}
    token = _RECORDING.set(sink)
    try:
        output = model(*inputs, **kwargs)
    finally:
        _RECORDING.reset(token)
    trains = {name: sink[m] for name, m in layers if m in sink}
    return output, trains


# ---------------------------------------------------------------------------
# The time axis of converted networks (inserted by fastspike.to_snn)


class RepeatOverTime(nn.Module):
    """[B, ...] -> [T·B, ...]: the same analog input at every step (time-major).
    A 0-dim tensor (a scalar input, or ``x.abs().amax()`` before the first
    neurons) has no batch dim: it broadcasts alike over B and T·B rows."""

    def __init__(self, time_steps: int):
        super().__init__()
        self.time_steps = time_steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0:
            return x
        shape: List[int] = list(x.shape)  # lists, not tuples of torch.Size: TorchScript compiles it
        return x.unsqueeze(0).expand([self.time_steps] + shape).reshape([self.time_steps * shape[0]] + shape[1:])


class ShapeOverTime(nn.Module):
    """[B, ...] -> the torch.Size of the [T·B, ...] tensor RepeatOverTime would
    make, without making it (a module, so a saved network reloads: fx re-traces
    with every module kept as one call). Under TorchScript, a List[int]."""

    def __init__(self, time_steps: int):
        super().__init__()
        self.time_steps = time_steps

    def forward(self, x: torch.Tensor) -> List[int]:
        shape: List[int] = list(x.shape)
        sizes = [self.time_steps * shape[0]] + shape[1:]
        if torch.jit.is_scripting():
            return sizes
        return self._as_size(sizes)

    @torch.jit.unused
    def _as_size(self, sizes: List[int]) -> List[int]:
        return torch.Size(sizes)  # eager callers read it as a shape (.numel(), slices)


def sum_in_order(seq: torch.Tensor, mode: str) -> torch.Tensor:
    """Σ_t seq[t] of a [T, B, ...] tensor in a published code base's order:
    "running-sum" (a Python loop adding step after step, as the QCFS and GN code
    bases do) or "sum-batch-major" (the sum over dim 1 of [B, T, ...], as
    SpikingJelly-style code does); float additions round differently by order."""
    if mode == "sum-batch-major":
        return seq.transpose(0, 1).contiguous().sum(dim=1)
    total = seq[0].clone()
    for t in range(1, seq.shape[0]):
        total += seq[t]
    return total


def reduce_over_time(seq: torch.Tensor, mode: str) -> torch.Tensor:
    """The readout ``mode`` ("mean", "sum", or a source order of
    :func:`sum_in_order`) of a [T, B, ...] sequence over T."""
    if mode == "mean":
        return seq.mean(0)
    if mode == "sum":
        return seq.sum(0)
    return sum_in_order(seq, mode)


READOUTS = ("mean", "sum", "sequence", "running-sum", "sum-batch-major")


class ReadoutOverTime(nn.Module):
    """[T·B, ...] -> the mean or sum over T ([B, ...]) or the sequence [T, B, ...],
    applied to every tensor of a (possibly nested) output. "running-sum" and
    "sum-batch-major" sum in a source code base's order (:func:`sum_in_order`,
    the exact reproduction mode of :mod:`fastspike.interop`). Under
    TorchScript the output must be one tensor."""

    def __init__(self, time_steps: int, mode: str = "mean"):
        super().__init__()
        if mode not in READOUTS:
            raise ValueError(f"readout must be one of {', '.join(map(repr, READOUTS))}, got {mode!r}")
        self.time_steps = time_steps
        self.mode = mode

    def _one(self, y: torch.Tensor) -> torch.Tensor:
        if y.dim() == 0:
            return y
        shape: List[int] = list(y.shape)
        seq = y.view([self.time_steps, shape[0] // self.time_steps] + shape[1:])
        if self.mode == "sequence":
            return seq
        return reduce_over_time(seq, self.mode)

    @torch.jit.unused
    def _nested(self, y: Any) -> Any:
        return pytree.tree_map(lambda v: self._one(v) if isinstance(v, torch.Tensor) else v, y)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._one(y)
        return self._nested(y)  # eager: any nesting (DeepLab's {"out": ...})
