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

from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

from .ops import neuron

__all__ = ["SpikingNeuron", "IFNeuron", "SignedIFNeuron", "GroupNeuron", "NeuronState"]


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
    ):
        super().__init__()
        if layout not in ("merged", "sequence"):
            raise ValueError(f"layout must be 'merged' or 'sequence', got {layout!r}")
        if layout == "merged" and (isinstance(time_steps, bool) or not isinstance(time_steps, int) or time_steps < 1):
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

    def _to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "sequence":
            return x
        total = x.shape[0]
        if total % self.time_steps != 0:
            raise ValueError(f"merged input has {total} rows along dim 0, not a multiple of "
                             f"time_steps={self.time_steps}")
        return x.view((self.time_steps, total // self.time_steps) + tuple(x.shape[1:]))

    def _run(self, x: torch.Tensor, state: Optional[NeuronState]):
        x_seq = self._to_sequence(x)
        result = neuron(
            x_seq, self.threshold, group_size=self.group_size, signed=self.signed,
            init_fraction=self.init_fraction, neg_margin=self.neg_margin,
            v_init=None if state is None else state.v,
            count_init=None if state is None else state.count,
            grad=self.grad, surrogate=self.surrogate, alpha=self.alpha,
        )
        return result.spikes.view(x.shape), NeuronState(result.v, result.count)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, None)[0]

    def step(self, x: torch.Tensor, state: Optional[NeuronState] = None) -> Tuple[torch.Tensor, NeuronState]:
        """Runs x (in this layer's layout) from ``state`` (None: the initial
        membrane) and returns the spikes and the state to continue from."""
        return self._run(x, state)

    def extra_repr(self) -> str:
        shape = "scalar" if self.threshold.dim() == 0 else f"shape={list(self.threshold.shape)}"
        return (f"threshold={shape}, time_steps={self.time_steps}, group_size={self.group_size}, "
                f"signed={self.signed}, layout={self.layout!r}")


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
