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

from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

from .ops import neuron
from .reference import accumulation_dtype, broadcast_threshold

__all__ = ["SpikingNeuron", "IFNeuron", "SignedIFNeuron", "GroupNeuron", "NeuronState",
           "record_spike_trains"]


class NeuronState(NamedTuple):
    """Membrane v and net spike count of a layer, shape of one time step."""

    v: torch.Tensor
    count: torch.Tensor


class SpikingNeuron(nn.Module):
    """A layer of generalised spiking neurons (DESIGN §2) run by the fused ops.

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
            in ``self.recorded`` (see :func:`record_spike_trains`); the output
            is unchanged.
        constant_input, constant_residual: x (the residual) is one step
            [B, ...] that is the same at every step (the analog image before
            the first spiking layer); it is read T times without being copied.
            Set by ``to_snn(constant_input_once=True)``; needs time_steps.

    ``forward(x, residual=None)``: with a residual, the neurons are charged
    with x + residual (the fused residual join of ``to_snn(fuse_residual=True)``).
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
        if layout not in ("merged", "sequence"):
            raise ValueError(f"layout must be 'merged' or 'sequence', got {layout!r}")
        has_time_steps = isinstance(time_steps, int) and not isinstance(time_steps, bool) and time_steps >= 1
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
        self.init_fraction = init_fraction
        self.neg_margin = neg_margin
        self.grad = grad
        self.surrogate = surrogate
        self.alpha = alpha
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
        if total % self.time_steps != 0:
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
        return self.threshold.float() / self.group_size

    def _run(self, x: torch.Tensor, state: Optional[NeuronState], residual: Optional[torch.Tensor] = None):
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
        if self.compact or (self.record and not needs_grad):
            result = neuron(x_seq, self.threshold, compact=True, grad="none", **common)
            counts = result.spikes
            if self.compact:
                spikes = counts.to(x_seq.dtype)
            else:  # (k⁺ − k⁻)·u rounded as the kernel does: u and the product in the acc dtype
                acc = accumulation_dtype(x_seq.dtype)
                unit = broadcast_threshold(self.threshold, x_seq).to(acc) / self.group_size
                spikes = (counts.to(acc) * unit).to(x_seq.dtype)
        else:
            result = neuron(x_seq, self.threshold, grad=self.grad, surrogate=self.surrogate,
                            alpha=self.alpha, **common)
            spikes = result.spikes
            if self.record:  # recording must not change the gradient: a second, compact pass
                with torch.no_grad():
                    counts = neuron(x_seq.detach(), self.threshold, compact=True, grad="none",
                                    **dict(common, residual=None if r_seq is None else r_seq.detach())).spikes
        if self.record:
            self.recorded = counts
        return spikes.reshape(out_shape), NeuronState(result.v, result.count)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._run(x, None, residual)[0]

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
    before = [(m, m.record) for _, m in layers]
    try:
        for _, m in layers:
            m.record, m.recorded = True, None
        output = model(*inputs, **kwargs)
        trains = {name: m.recorded for name, m in layers if m.recorded is not None}
    finally:
        for m, flag in before:
            m.record, m.recorded = flag, None
    return output, trains
