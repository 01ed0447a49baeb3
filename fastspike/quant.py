"""Quantized-ReLU activations of the published ANN-to-SNN methods (docs/design.md §1).

Every preset computes the same forward function

    y = λ · clamp(⌊z·L/λ + ½⌋, 0, L) / L

(round-half-up of z on a grid of L levels up to the clip value λ), which is
exactly what an IF neuron with threshold λ and initial membrane λ/2 emits on a
constant input over T = L steps, and a group neuron of m members over T = L/m
steps. The presets differ in how λ is parameterised and how gradients flow:

============  ====================================  =======================================
preset        λ                                     gradients
============  ====================================  =======================================
``qcfs``      one learnable scalar (Bu et al.)      straight-through ⌊·⌋, autograd elsewhere
``cs-qcfs``   per channel, λ_c = softplus(a_c)      as qcfs; λ stays positive (Yang et al.)
``fastsnn``   one learnable clip value α            PACT: ∂y/∂z = [0 ≤ z < α], ∂y/∂α = [z ≥ α]
``lsq``       λ = s·L with a learnable step s       LSQ: step gradient scaled by 1/√(n·L) (QFFS)
============  ====================================  =======================================
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QuantReLU", "Preset", "PRESETS", "quantize_tensor", "quantizers"]


def quantize_tensor(z: torch.Tensor, threshold: torch.Tensor, levels: int) -> torch.Tensor:
    """⌊clamp(z/λ, 0, 1)·L + ½⌋/L·λ with λ broadcast against z (no gradients): the
    qcfs forward, in the same operation order, so it agrees bit for bit."""
    return torch.floor(torch.clamp(z / threshold, 0, 1) * levels + 0.5) / levels * threshold


class _FloorSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.floor(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _PactQuant(torch.autograd.Function):
    """Fast-SNN's quantizer with the clip-value (PACT) gradient."""

    @staticmethod
    def forward(ctx, z, alpha, levels):
        ctx.save_for_backward(z, alpha)
        return quantize_tensor(z, alpha, levels)

    @staticmethod
    def backward(ctx, grad):
        z, alpha = ctx.saved_tensors
        inside = (z >= 0) & (z < alpha)
        grad_alpha = (grad * (z >= alpha)).sum_to_size(alpha.shape)
        return grad * inside, grad_alpha, None


class _LsqQuant(torch.autograd.Function):
    """s·round(clip(z/s, 0, L)) with the LSQ step gradient (Esser et al.)."""

    @staticmethod
    def forward(ctx, z, step, levels, grad_scale):
        ctx.save_for_backward(z, step)
        ctx.levels, ctx.grad_scale = levels, grad_scale
        q = torch.clamp(z / step, 0, levels)
        return torch.floor(q + 0.5) * step

    @staticmethod
    def backward(ctx, grad):
        z, step = ctx.saved_tensors
        q = z / step
        inside = (q > 0) & (q < ctx.levels)
        d_step = torch.where(inside, torch.floor(q + 0.5) - q, (q >= ctx.levels).to(q.dtype) * ctx.levels)
        grad_step = (grad * d_step).sum_to_size(step.shape) * ctx.grad_scale
        return grad * inside, grad_step, None, None


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class Preset:
    """One quantizer recipe: how λ is parameterised (``raw``) and how the
    forward and its gradients run. Every preset computes the same forward
    values (the module doc); a new one is a subclass and a row of PRESETS."""

    name = ""
    per_channel = False

    def initial_raw(self, threshold: float, levels: int, num_channels: Optional[int]) -> torch.Tensor:
        return torch.tensor(float(threshold))

    def threshold(self, raw: torch.Tensor, levels: int) -> torch.Tensor:
        """λ from the raw parameter (differentiable)."""
        return raw

    def raw_for(self, value: torch.Tensor, levels: int) -> torch.Tensor:
        """The raw parameter that gives λ = ``value`` (a checked, positive scalar)."""
        return value.reshape(())

    def forward(self, z: torch.Tensor, lam: torch.Tensor, raw: torch.Tensor, levels: int) -> torch.Tensor:
        # As the QCFS code: clip z/λ to [0, 1], then a straight-through
        # ⌊x·L + ½⌋/L, so ∂y/∂z = [0 < z < λ].
        clipped = torch.clamp(z / lam, 0, 1)
        return _FloorSTE.apply(clipped * levels + 0.5) / levels * lam


class QcfsPreset(Preset):
    """One learnable scalar λ (Bu et al.)."""

    name = "qcfs"


class CsQcfsPreset(Preset):
    """λ_c = softplus(a_c) per channel (Yang et al.); λ stays positive."""

    name = "cs-qcfs"
    per_channel = True

    def initial_raw(self, threshold: float, levels: int, num_channels: Optional[int]) -> torch.Tensor:
        return torch.full((num_channels or 0,), _inverse_softplus(threshold))

    def threshold(self, raw: torch.Tensor, levels: int) -> torch.Tensor:
        return F.softplus(raw)

    def raw_for(self, value: torch.Tensor, levels: int) -> torch.Tensor:
        return value + torch.log(-torch.expm1(-value))


class FastsnnPreset(Preset):
    """One learnable clip value α with the PACT gradients (Fast-SNN)."""

    name = "fastsnn"

    def forward(self, z, lam, raw, levels):
        return _PactQuant.apply(z, lam, levels)


class LsqPreset(Preset):
    """λ = s·L with a learnable step s and the LSQ gradient (QFFS)."""

    name = "lsq"

    def initial_raw(self, threshold: float, levels: int, num_channels: Optional[int]) -> torch.Tensor:
        return torch.tensor(threshold / levels)

    def threshold(self, raw: torch.Tensor, levels: int) -> torch.Tensor:
        return raw * levels

    def raw_for(self, value: torch.Tensor, levels: int) -> torch.Tensor:
        return value.reshape(()) / levels

    def forward(self, z, lam, raw, levels):
        grad_scale = 1.0 / math.sqrt(z[0].numel() * levels)
        return _LsqQuant.apply(z, raw, levels, grad_scale)


# The one table of quantizer presets: QuantReLU, quantize() and the CLI's --preset read it.
PRESETS: Dict[str, Preset] = {p.name: p for p in (QcfsPreset(), CsQcfsPreset(), FastsnnPreset(), LsqPreset())}


class QuantReLU(nn.Module):
    """A quantized ReLU with L levels, ready to become a spiking neuron.

    Args:
        levels: L, the number of non-zero output levels (Fast-SNN/QFFS use
            L = 2^b − 1 for b bits).
        preset: a key of :data:`PRESETS`: "qcfs", "cs-qcfs", "fastsnn" or
            "lsq" (see the module doc).
        threshold: initial clip value λ (QCFS initialises it to 8).
        num_channels: channels for "cs-qcfs" (per-channel λ along dim 1);
            may be left None to be set on the first forward.

    While ``calibrating`` is True the module is a plain ReLU (so calibration
    sees the float activations) and records nothing itself; see
    :func:`fastspike.calibration.calibrate`.
    """

    def __init__(self, levels: int = 8, preset: str = "qcfs", threshold: float = 8.0,
                 num_channels: Optional[int] = None):
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
            raise ValueError(f"levels must be an integer >= 1, got {levels!r}")
        if not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"threshold must be finite and > 0, got {threshold}")
        self.levels = levels
        self.preset = preset
        self.calibrating = False
        if self.per_channel:
            self.num_channels = num_channels
            self._initial = threshold
        self.raw_threshold = nn.Parameter(PRESETS[preset].initial_raw(threshold, levels, num_channels))

    @property
    def per_channel(self) -> bool:
        return PRESETS[self.preset].per_channel

    def threshold(self) -> torch.Tensor:
        """λ: a 0-dim tensor, or [C] for "cs-qcfs" (differentiable)."""
        return PRESETS[self.preset].threshold(self.raw_threshold, self.levels)

    @torch.no_grad()
    def set_threshold(self, value: torch.Tensor) -> None:
        """Sets λ (a scalar, or [C] for "cs-qcfs"), e.g. from calibration."""
        value = torch.as_tensor(value, dtype=self.raw_threshold.dtype, device=self.raw_threshold.device)
        if not bool(((value > 0) & torch.isfinite(value)).all()):
            raise ValueError(f"threshold must be finite and > 0, got {value}")
        if self.per_channel:
            value = value.expand(self.raw_threshold.shape) if value.dim() == 0 else value
            if value.shape != self.raw_threshold.shape:
                raise ValueError(f"threshold for {self.raw_threshold.numel()} channels must have shape "
                                 f"[{self.raw_threshold.numel()}], got {list(value.shape)}")
        elif value.numel() != 1:
            raise ValueError(f"preset {self.preset!r} has one scalar threshold, got shape {list(value.shape)}")
        self.raw_threshold.copy_(PRESETS[self.preset].raw_for(value, self.levels))

    def _materialize_channels(self, z: torch.Tensor) -> None:
        channels = z.shape[1]
        if self.raw_threshold.numel() == 0:
            with torch.no_grad():
                self.raw_threshold.data = torch.full((channels,), _inverse_softplus(self._initial),
                                                     dtype=z.dtype if z.is_floating_point() else torch.float32,
                                                     device=z.device)
            self.num_channels = channels
        elif self.raw_threshold.numel() != channels:
            raise ValueError(f"this cs-qcfs quantizer has {self.raw_threshold.numel()} channels but its "
                             f"input has {channels} along dim 1 (shape {list(z.shape)})")

    def broadcast_threshold(self, z: torch.Tensor) -> torch.Tensor:
        lam = self.threshold()
        if self.per_channel:
            return lam.reshape((1, -1) + (1,) * (z.dim() - 2))
        return lam

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.per_channel:
            self._materialize_channels(z)
        if self.calibrating:
            return F.relu(z)
        return PRESETS[self.preset].forward(z, self.broadcast_threshold(z), self.raw_threshold, self.levels)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, preset={self.preset!r}"


def quantizers(model: nn.Module) -> "list[tuple[str, QuantReLU]]":
    """(module name, quantizer) of every QuantReLU in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantReLU)]
