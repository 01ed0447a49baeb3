"""Bring your trained model: importers for the published code bases and SpikingJelly.

Each importer recognises the source's modules by their documented class names
and attributes (duck typing: none of these packages is a dependency) and
either maps them exactly or raises :class:`~fastspike.convert.ConversionError`
naming the module path and class.

* :func:`from_qcfs` (github.com/putshua/SNN_conversion_QCFS): ``MyFloor(up, t)``,
  ``TCL``, ``ScaledNeuron(scale)``;
* :func:`from_fastsnn` (github.com/yangfan-hu/Fast-SNN): ``QuantReLU`` (uniform
  levels; with ``act_alq`` or with ``bit``/``power``),
  ``QuantConv2d``/``QuantLinear``/``first_conv``/``last_fc``,
  ``QuantAvg``/``QuantAvgPool2d``, and the spiking models' ``Spiking``,
  ``Spiking_Oneway``, ``Spiking_Twoways``, ``last_Spiking``, ``IF``;
* :func:`from_gn` (github.com/Lyu6PosHao/ANN2SNN_GN): ``QCFS(T)``, ``GN(m)``,
  ``CombinedNode``;
* :func:`from_spikingjelly`: ``IFNode(v_reset=None)`` networks of
  ``spikingjelly.activation_based`` and the output of its ann2snn converter.

The first three return a quantized ANN (a ``torch.fx.GraphModule`` whose
quantizers are :class:`ImportedQuantReLU` at the source's module paths)
that equals the source ANN bit for bit; :func:`to_snn` turns it into the
source's SNN (its neuron kind, initial membrane, readout), or pass
``time_steps=`` to the importer to get the SNN in one call. With
``exact=True`` the SNN reproduces the code base's own step-by-step
simulation bit for bit (BatchNorm unfolded, QCFS's division by λ, the
readout summed in the source's order); the default is the fast path, equal
up to float rounding (see README, "You trained with ...").
"""

from __future__ import annotations

import contextvars
import copy
import math
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from . import convert
from .convert import ConversionError
from .convert.activations import _is_relu
from .convert.graph import _describe, _module, _plain_torch_forward, _source_line
from .nn import SpikingNeuron, neuron_kind_name
from .ops import neuron as neuron_op
from .quant import QuantReLU

__all__ = [
    "ImportedQuantReLU",
    "NormalisedNeuron",
    "SpikingJellyNet",
    "from_qcfs",
    "from_fastsnn",
    "from_gn",
    "from_spikingjelly",
    "to_snn",
]

# ---------------------------------------------------------------------------
# The imported quantizer

RULES = ("qcfs", "gn", "fastsnn")


def _fastsnn_value(z: torch.Tensor, alpha: torch.Tensor, levels: int) -> torch.Tensor:
    """Fast-SNN's uniform activation value in the code base's order: relu, x/α,
    clamp to [0, 1], ·L, ``torch.round`` (half to even), /L, ·α. Both of its
    ``QuantReLU`` variants compute this (``act_quantization(power=False)`` and
    ``uniform_quantization(..., is_weight=False)``; the latter's straight-through
    ``(round(d) − d).detach() + d`` has the value round(d) exactly: for
    round(d) ≥ 1, d lies in [round(d)/2, 2·round(d)], so the difference and
    the sum are exact). The one place for the rule: the imported quantizer
    computes it and :func:`_fastsnn_levels` checks the source against it."""
    return torch.clamp(F.relu(z) / alpha, 0, 1).mul(levels).round().div(levels).mul(alpha)


class ImportedQuantReLU(QuantReLU):
    """A :class:`~fastspike.quant.QuantReLU` that computes its value in the
    source code base's own operation order (so the imported ANN equals the
    source ANN bit for bit) and remembers the source's neuron conventions.

    Args:
        levels, preset, threshold: as QuantReLU (L, gradient rule, λ).
        rule: the value's operation order:
            ``"qcfs"``  λ·⌊clamp(z/λ, 0, 1)·L + ½⌋/L (QCFS's ``MyFloor``,
            the same as QuantReLU's own);
            ``"gn"``    clamp(⌊z·L/λ + ½⌋, 0, L)·λ/L (the group-neuron code's ``QCFS``);
            ``"fastsnn"`` round-half-even(clamp(z/α, 0, 1)·L)/L·α (Fast-SNN's
            uniform ``QuantReLU``; ``torch.round``, not ⌊·+½⌋).
        source: the code base ("qcfs", "fastsnn", "gn").
        source_class: the class it replaces (for messages).
        signed: the source's SNN fires negative spikes (Fast-SNN).
        group_size: m of the source's group neuron (GN), None if it has none.
        normalised: the source's neuron divides its input by λ and fires
            against threshold 1 (QCFS's ``ScaledNeuron``).

    Gradients are those of ``preset`` (the value's rounding order does not
    change them).
    """

    def __init__(self, levels: int, preset: str, threshold: float, *, rule: str = "qcfs",
                 source: str = "", source_class: str = "", signed: bool = False,
                 group_size: Optional[int] = None, normalised: bool = False):
        super().__init__(levels, preset, threshold)
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        self.rule = rule
        self.source = source
        self.source_class = source_class
        self.signed = bool(signed)
        self.group_size = group_size
        self.normalised = bool(normalised)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = super().forward(z)
        if self.calibrating or self.rule == "qcfs":
            return y  # QuantReLU's own order is MyFloor's (clamp commutes with ⌊·⌋/L on [0, 1])
        lam = self.broadcast_threshold(z)
        with torch.no_grad():
            if self.rule == "gn":
                value = torch.clamp(torch.floor(z * self.levels / lam + 0.5), 0, self.levels) * lam / self.levels
            else:
                value = _fastsnn_value(z, lam, self.levels)
        # The source's value, the preset's gradient: y − y.detach() is exactly 0.
        return value + (y - y.detach())

    def extra_repr(self) -> str:
        extras = f", rule={self.rule!r}, source={self.source!r}"
        if self.signed:
            extras += ", signed=True"
        if self.group_size:
            extras += f", group_size={self.group_size}"
        if self.normalised:
            extras += ", normalised=True"
        return super().extra_repr() + extras


# ---------------------------------------------------------------------------
# Shared machinery


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Puts ``module`` at ``path`` of ``root``; the root itself cannot be replaced in place."""
    if path == "":
        raise ConversionError(f"the model itself is a {type(root).__name__}; import the network that contains it")
    parent, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _scalar(value: Any, path: str, cls: str, what: str) -> float:
    """A positive finite Python float from a number or a one-element tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ConversionError(f"module '{path}' ({cls}) has a {what} of shape {list(value.shape)}; "
                                  "fastspike maps a scalar one here")
        value = value.detach().reshape(()).item()
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ConversionError(f"module '{path}' ({cls}) has {what} {value}; a threshold must be finite and > 0")
    return value


def _levels_arg(levels: Optional[int], path: str, cls: str, why: str) -> int:
    if levels is None:
        raise ConversionError(f"module '{path}' ({cls}) {why}, so it does not say L, the number of "
                              "quantization levels of the ANN it stands for: pass levels=L")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels must be an integer >= 1, got {levels!r}")
    return levels


def _refuse(found: List[Tuple[str, str]], source: str, hint: str) -> None:
    if found:
        listed = ", ".join(f"'{p or '(the model itself)'}' ({c})" for p, c in found)
        raise ConversionError(f"{source}: fastspike cannot map {listed} exactly. {hint}")


def _finish_import(model: nn.Module, source: str, readout: str, hint: str) -> fx.GraphModule:
    """Traces the model whose source modules have been replaced, refuses what is
    left that fastspike does not know (activation-like modules, plain ReLUs),
    moves max-pools that follow a quantizer, checks the time rule."""
    hint_known = "Only the modules listed in fastspike.interop's documentation are recognised. " + hint
    try:
        gm = convert.trace(model)
    except ConversionError:
        _refuse(convert.unknown_activations(model), source, hint_known)  # likely why it does not trace
        raise
    _refuse(convert.unknown_activations(model, gm), source, hint_known)
    relus = [n for n in gm.graph.nodes if _is_relu(gm, n)]
    if relus:
        node = relus[0]
        raise ConversionError(
            f"{source}: node '{node.name}' ({_describe(gm, node)}){_source_line(node)} is a "
            "plain ReLU, which the source's ANN computes unquantized and its SNN turns into a neuron; the "
            "imported network would compute neither. Replace it with the code base's quantizer (as its "
            "training script does) before importing. " + hint)
    if not convert.quantizers(gm):
        raise ConversionError(f"{source}: the model has none of the code base's activation modules. " + hint)
    gm = convert.move_max_pools(gm, strict=True)
    convert.check_time_rule(gm, lambda n: isinstance(_module(gm, n), QuantReLU), inference=False)
    gm.fastspike_source = source
    gm.fastspike_readout = readout
    return gm


def _maybe_snn(gm: fx.GraphModule, time_steps: Optional[int], exact: bool, **kwargs: Any) -> fx.GraphModule:
    if time_steps is None:
        if exact or kwargs:
            raise ValueError("exact= and the to_snn options need time_steps=T (or call fastspike.interop.to_snn)")
        return gm
    return to_snn(gm, time_steps, exact=exact, **kwargs)


# ---------------------------------------------------------------------------
# QCFS (Bu et al.)

_QCFS_HINT = ("QCFS code base: MyFloor(up, t) is the quantized ReLU, TCL the clip it is trained from, "
              "ScaledNeuron(scale) the IF neuron that replaces either.")


def from_qcfs(model: nn.Module, *, levels: Optional[int] = None, time_steps: Optional[int] = None,
              exact: bool = False, **snn_kwargs: Any) -> fx.GraphModule:
    """Imports a model of the QCFS code base (Bu et al., ICLR 2022).

    ``MyFloor(up, t)`` becomes a ``qcfs`` quantizer with λ = ``up``, L = ``t``
    (the same value bit for bit). ``TCL`` (a clip to [0, up]) and
    ``ScaledNeuron(scale)`` carry no L: pass ``levels=L`` for them (their SNN,
    an IF neuron with θ = λ starting at θ/2, does not depend on it).

    The code base's SNN normalises: ``ScaledNeuron`` divides its input by λ,
    fires at 1 and multiplies the spikes by λ. In real numbers that is an IF
    neuron with θ = λ; in floats the membrane rounds differently (v/λ + x/λ
    against (v + x)/λ), so a membrane within an ulp of the threshold can fire
    at another step. ``exact=True`` reproduces the division; the default runs
    θ = λ directly (one division and one product less per step). The code base
    reads out the running sum of the outputs over T (``spikes += out``).

    Returns the quantized ANN, or with ``time_steps=T`` its SNN
    (:func:`to_snn`; ``exact`` and ``snn_kwargs`` go there).
    """
    model = copy.deepcopy(model)
    refused: List[Tuple[str, str]] = []
    for path, m in list(model.named_modules()):
        cls = type(m).__name__
        if cls == "MyFloor" and hasattr(m, "up") and hasattr(m, "t"):
            q = ImportedQuantReLU(int(m.t), "qcfs", _scalar(m.up, path, cls, "up (λ)"), rule="qcfs",
                                  source="qcfs", source_class=cls, normalised=True)
        elif cls == "TCL" and hasattr(m, "up"):
            q = ImportedQuantReLU(_levels_arg(levels, path, cls, "is a clip, not a quantizer"), "qcfs",
                                  _scalar(m.up, path, cls, "up (λ)"), source="qcfs", source_class=cls,
                                  normalised=True)
        elif cls == "ScaledNeuron" and hasattr(m, "scale"):
            q = ImportedQuantReLU(_levels_arg(levels, path, cls, "is a spiking neuron"), "qcfs",
                                  _scalar(m.scale, path, cls, "scale (θ)"), source="qcfs", source_class=cls,
                                  normalised=True)
        elif cls == "ShiftNeuron":
            refused.append((path, cls))
            continue
        else:
            continue
        _set_module(model, path, q)
    _refuse(refused, "QCFS code base", "ShiftNeuron carries a membrane offset learnt across batches "
            "(its vt), which no fixed neuron reproduces; use ScaledNeuron or MyFloor.")
    gm = _finish_import(model, "QCFS code base", "running-sum", _QCFS_HINT)
    return _maybe_snn(gm, time_steps, exact, **snn_kwargs)


# ---------------------------------------------------------------------------
# Group neurons (Lv et al.)

_GN_HINT = ("Group-neuron code base: QCFS(T) is the quantized ReLU, GN(m, v_threshold) the group neuron and "
            "CombinedNode(v_threshold) the IF neuron that replace it.")


def from_gn(model: nn.Module, *, levels: Optional[int] = None, time_steps: Optional[int] = None,
            exact: bool = False, **snn_kwargs: Any) -> fx.GraphModule:
    """Imports a model of the group-neuron code base (Lv et al., ICASSP 2024).

    ``QCFS(T)`` becomes a quantizer with λ = ``v_threshold``, L = ``T`` that
    computes the code base's order ⌊z·L/λ + p0⌋ (clamped to [0, L], ·λ/L) bit
    for bit. p0 must be ½: the code base's SNN (``CombinedNode``, ``GN``)
    always starts the membrane at half a unit whatever p0 the ANN used, so
    another p0 has no SNN that computes the ANN. ``GN(m, v_threshold)``
    becomes the same quantizer with group size m (pass ``levels=L``; its SNN
    needs m·T = L); ``CombinedNode`` (IF) likewise, refused when its bias is
    not 0. The code base reads out the running sum of the outputs over T.

    Returns the quantized ANN, or with ``time_steps=T`` its SNN (group
    neurons where the model has ``GN`` modules; ``group_size="auto"`` for
    m = L/T on a ``QCFS`` model).
    """
    model = copy.deepcopy(model)
    refused: List[Tuple[str, str]] = []
    reasons: List[str] = []
    for path, m in list(model.named_modules()):
        cls = type(m).__name__
        if cls == "QCFS" and hasattr(m, "v_threshold") and hasattr(m, "T"):
            p0 = float(torch.as_tensor(getattr(m, "p0", 0.5)).reshape(-1)[0])
            if p0 != 0.5:
                refused.append((path, cls))
                reasons.append(f"'{path}' has p0={p0}: the code base's SNN starts at ½ whatever p0 is, so "
                               "only p0 = 0.5 has an SNN that computes the ANN")
                continue
            q = ImportedQuantReLU(int(m.T), "qcfs", _scalar(m.v_threshold, path, cls, "v_threshold (λ)"),
                                  rule="gn", source="gn", source_class=cls)
        elif cls == "GN" and hasattr(m, "m") and hasattr(m, "v_threshold"):
            members = int(m.m)
            theta = _scalar(m.v_threshold, path, cls, "v_threshold") * members  # it stores θ/m
            q = ImportedQuantReLU(_levels_arg(levels, path, cls, "is a spiking neuron"), "qcfs", theta,
                                  rule="gn", source="gn", source_class=cls, group_size=members)
        elif cls == "CombinedNode" and hasattr(m, "v_threshold"):
            bias = getattr(m, "bias", 0.0)
            p0 = float(getattr(m, "p0", 0.5))
            if (isinstance(bias, torch.Tensor) and bool((bias != 0).any())) or (
                    not isinstance(bias, torch.Tensor) and float(bias) != 0.0):
                refused.append((path, cls))
                reasons.append(f"'{path}' has a non-zero bias, charged at every step, which the quantized "
                               "ANN does not have")
                continue
            if p0 != 0.5 or getattr(m, "v_reset", None) is not None:
                refused.append((path, cls))
                reasons.append(f"'{path}' starts at p0={p0} or resets to a value (hard reset); fastspike "
                               "maps p0 = 0.5 with reset by subtraction")
                continue
            q = ImportedQuantReLU(_levels_arg(levels, path, cls, "is a spiking neuron"), "qcfs",
                                  _scalar(m.v_threshold, path, cls, "v_threshold"), rule="gn", source="gn",
                                  source_class=cls, group_size=1)
        else:
            continue
        _set_module(model, path, q)
    _refuse(refused, "group-neuron code base", "; ".join(reasons) + ".")
    gm = _finish_import(model, "group-neuron code base", "running-sum", _GN_HINT)
    return _maybe_snn(gm, time_steps, exact, **snn_kwargs)


# ---------------------------------------------------------------------------
# Fast-SNN (Hu et al.)

_FASTSNN_HINT = ("Fast-SNN code base: QuantReLU (uniform levels: act_alq with power=False, or bit < 32 with "
                 "power=False) is the quantized ReLU; QuantConv2d, "
                 "QuantLinear, first_conv and last_fc quantize their weights; Spiking, Spiking_Oneway, "
                 "Spiking_Twoways, last_Spiking and IF make its spiking models.")


class _LayerCalls(TorchFunctionMode):
    """Records the conv/linear calls made while it is active."""

    FUNCS = {F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d", F.linear: "linear",
             torch.conv1d: "conv1d", torch.conv2d: "conv2d", torch.conv3d: "conv3d"}

    def __init__(self):
        super().__init__()
        self.calls: List[Tuple[str, tuple, dict]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FUNCS:
            self.calls.append((self.FUNCS[func], args, kwargs))
        return func(*args, **kwargs)


def _plain_layer(m: nn.Module, path: str) -> nn.Module:
    """A torch conv/linear layer computing what the weight-quantizing layer
    ``m`` computes: its forward is run once on a probe input and the weight,
    bias and settings of the one conv/linear call it makes are copied (the
    effective weights, bit for bit, whatever formula produced them)."""
    cls = type(m).__name__
    if isinstance(m, nn.Linear):
        probe = torch.zeros(1, m.in_features, dtype=m.weight.dtype, device=m.weight.device)
    elif isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
        span = [d * (k - 1) + 1 for k, d in zip(m.kernel_size, m.dilation)]
        probe = torch.zeros([1, m.in_channels] + span, dtype=m.weight.dtype, device=m.weight.device)
    else:
        raise ConversionError(f"module '{path}' ({cls}) is a weight-quantizing layer fastspike does not know")
    recorder = _LayerCalls()
    with torch.no_grad(), recorder:
        m(probe)
    if len(recorder.calls) != 1:
        raise ConversionError(f"module '{path}' ({cls}) made {len(recorder.calls)} conv/linear calls on a "
                              "probe input; fastspike materialises layers that make exactly one")
    kind, args, kwargs = recorder.calls[0]
    names = (["input", "weight", "bias"] if kind == "linear"
             else ["input", "weight", "bias", "stride", "padding", "dilation", "groups"])
    given = dict(zip(names, args))
    given.update(kwargs)
    weight, bias = given["weight"].detach().clone(), given.get("bias")
    if weight.shape != m.weight.shape:
        raise ConversionError(f"module '{path}' ({cls}) used a weight of shape {list(weight.shape)}, not its "
                              f"own {list(m.weight.shape)}")
    if kind == "linear":
        layer = nn.Linear(m.in_features, m.out_features, bias=bias is not None)
    else:
        if m.padding_mode != "zeros":
            raise ConversionError(f"module '{path}' ({cls}) pads with {m.padding_mode!r}; fastspike "
                                  "materialises zero-padded quantized convolutions")
        conv = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[kind]
        layer = conv(m.in_channels, m.out_channels, m.kernel_size, stride=given.get("stride", 1),
                     padding=given.get("padding", 0), dilation=given.get("dilation", 1),
                     groups=given.get("groups", 1), bias=bias is not None)
    layer = layer.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias.detach())
    layer.train(m.training)
    return layer


def _is_fastsnn_activation(m: nn.Module) -> bool:
    """A Fast-SNN activation quantizer (``QuantReLU``, ``QuantAvg``, ``QuantAvgPool2d``)
    of either variant the code base has (see :func:`_fastsnn_levels`)."""
    if type(m).__name__ not in ("QuantReLU", "QuantAvg", "QuantAvgPool2d"):
        return False
    return (hasattr(m, "act_alq") and hasattr(m, "act_alpha")) or (hasattr(m, "bit") and hasattr(m, "power"))


def _fastsnn_levels(m: nn.Module, path: str) -> Optional[int]:
    """L of a Fast-SNN activation quantizer, checked to compute
    :func:`_fastsnn_value` with α = ``act_alpha`` bit for bit on a dense probe
    of [0, 1.25·α]; None where the module quantizes nothing. The code base has
    two variants (all files ``quant_layer.py``):

    * ``act_alq`` (``image classification/CIFAR10``: VGG11, AlexNet): a
      closure ``act_alq(x, act_alpha)``; the training scripts swap it for
      ``act_quantization(b=bit, power=False)`` without updating ``bit``, so L
      is read off the probe's output.
    * ``bit``/``power``, no ``act_alq`` (``CIFAR10_res``, ``CIFAR10_resnet18``,
      ``ImageNet``, ``object detection/backbone``, ``semantic segmentation``):
      the forward is ReLU (or ``F.avg_pool2d``) then, for ``bit`` < 32,
      ``uniform_quantization`` with L = 2^bit − 1 (``power=False``, its
      default) or APoT levels (``power=True``); ``bit`` = 32 is the
      full-precision ReLU/pool (no ``act_alpha``): None. The module's own
      forward is probed.

    APoT (additive powers-of-two) levels are not uniform: refused by name."""
    cls = type(m).__name__
    apot = (f"module '{path}' ({cls}) quantizes to non-uniform levels (Fast-SNN's APoT, additive power-of-two "
            "activation levels): IF neurons emit uniform levels only. ")
    if hasattr(m, "act_alq"):
        levels: Optional[int] = None  # read off the probe
        fix = ("Fast-SNN itself uses uniform activation levels (act_quantization(power=False)) for the models it "
               "converts; set those and fine-tune.")
    else:
        bit = int(m.bit)
        if bit >= 32:
            return None
        if m.power:
            raise ConversionError(apot + "Construct it with power=False (the default of this QuantReLU and "
                                  "QuantAvgPool2d, uniform levels) and fine-tune.")
        levels = 2 ** bit - 1
        if levels < 1:
            raise ConversionError(f"module '{path}' ({cls}) has bit={bit}: no quantization levels (2^bit − 1 < 1)")
    alpha = m.act_alpha.detach()
    probe = torch.linspace(0, 1.25, 20001, dtype=alpha.dtype, device=alpha.device) * alpha
    with torch.no_grad():
        if levels is None:
            pre, out = probe, m.act_alq(probe.clone(), m.act_alpha)
        else:  # the module's own forward
            x = probe
            if isinstance(m, nn.AvgPool2d):  # one constant window per row
                kh, kw = nn.modules.utils._pair(m.kernel_size)
                x = probe.reshape(-1, 1, 1, 1).expand(-1, 1, kh, kw).contiguous()
                pre = F.avg_pool2d(x, m.kernel_size, m.stride).reshape(-1)
            else:
                pre = probe
            out = m(x.clone()).reshape(-1)
        if levels is None:
            levels = int(torch.unique(out).numel()) - 1
            if levels < 1:
                raise ConversionError(apot + fix)
        if out.shape != pre.shape or not torch.equal(out, _fastsnn_value(pre, alpha, levels)):
            if hasattr(m, "act_alq"):
                raise ConversionError(apot + fix)
            why = (" (its grad_scale rescales α in the forward: (α − α·s) + α·s, not α in floats)"
                   if getattr(m, "grad_scale", None) else "")
            raise ConversionError(
                f"module '{path}' ({cls}, bit={m.bit}, power=False) does not compute Fast-SNN's uniform "
                f"quantization round(clamp(x/α, 0, 1)·L)/L·α with α = act_alpha, L = 2^bit − 1 = {levels} on a "
                f"probe{why}; fastspike maps that one exactly.")
    return levels


class _Block(nn.Module):
    """``block(x)``: a Fast-SNN ``Spiking``/``last_Spiking`` wrapper in ANN form
    (its attribute ``block`` keeps the module paths of the ANN)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)


class _OneWay(nn.Module):
    """relu(bn(conv(x))): ``Oneway``/``Spiking_Oneway`` in ANN form."""

    def __init__(self, conv, bn, relu):
        super().__init__()
        self.conv, self.bn, self.relu = conv, bn, relu

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class _TwoWays(nn.Module):
    """relu(bn(conv(x)) + downsample(identity)): ``Spiking_Twoways`` in ANN form."""

    def __init__(self, conv, bn, relu, downsample):
        super().__init__()
        self.conv, self.bn, self.relu, self.downsample = conv, bn, relu, downsample

    def forward(self, x, identity):
        x = self.bn(self.conv(x))
        if self.downsample is not None:
            identity = self.downsample(identity)
        return self.relu(x + identity)


def from_fastsnn(model: nn.Module, *, time_steps: Optional[int] = None, exact: bool = False,
                 **snn_kwargs: Any) -> fx.GraphModule:
    """Imports a model of the Fast-SNN code base (Hu et al., TPAMI 2023).

    * ``QuantReLU`` with uniform levels becomes a ``fastsnn`` quantizer with
      α = ``act_alpha``; its value is computed in the code base's order with
      ``torch.round`` (half to even) bit for bit. Both of the code base's
      variants: with ``act_alq`` (CIFAR10 VGG11/AlexNet) L is read off its
      ``act_alq`` (2^bit − 1; the ``bit`` attribute is not trusted, the
      training scripts replace ``act_alq`` without updating it); with
      ``bit``/``power`` and no ``act_alq`` (ResNet_Cifar, the CIFAR ResNet-18,
      the ImageNet models, the detection and segmentation backbones) L =
      2^bit − 1, checked on a probe of its forward. Refused by name: APoT
      levels (``act_quantization(power=True)``, ``power=True``) and
      ``bit=32`` (the full-precision ReLU of the code base's float model).
    * ``QuantConv2d``/``QuantLinear`` (APoT weights) and the 8-bit
      ``first_conv``/``last_fc``: plain layers carrying the effective weights
      their forward computes (taken from the one conv/linear call it makes).
    * ``QuantAvg``/``QuantAvgPool2d``: the average pool followed by its
      quantizer (the same rules; a ``bit=32`` one is the pool alone).
    * Spiking models (``S_VGG11``, ``S_ResNet_Cifar``, ...): ``Spiking(block, T)``,
      ``Spiking_Oneway``, ``Spiking_Twoways`` become their ANN form with the
      ``IF``'s ``act_alpha`` as θ and L = T, signed or not as their ``sign``;
      ``last_Spiking`` its block; ``nn.Flatten`` outside them (which sees
      [B, T, ...] there) drops one from its dims.

    Fast-SNN's SNN uses signed IF neurons (``unsigned_spikes`` turns them off)
    and reads out the **sum** over T (``x.sum(dim=1)`` of [B, T, classes]).
    Returns the quantized ANN, or with ``time_steps=T`` its SNN.
    """
    model = copy.deepcopy(model)
    spiking_paths: List[str] = []

    def quantizer(m: nn.Module, path: str, levels: int, signed: bool) -> ImportedQuantReLU:
        return ImportedQuantReLU(levels, "fastsnn", _scalar(m.act_alpha, path, type(m).__name__, "act_alpha (α)"),
                                 rule="fastsnn", source="fastsnn", source_class=type(m).__name__, signed=signed)

    def spiking_if(relu: nn.Module, path: str, steps: int, signed: bool) -> nn.Module:
        if type(relu).__name__ != "IF" or not hasattr(relu, "act_alpha"):
            raise ConversionError(f"module '{path}' ({type(relu).__name__}) is where a Fast-SNN spiking block "
                                  "holds its IF neuron; fastspike maps IF(act_alpha) there")
        return quantizer(relu, path, steps, signed)

    # Spiking wrappers first (outermost), then the layers inside them.
    for path, m in list(model.named_modules()):
        cls = type(m).__name__
        if cls not in ("Spiking", "Spiking_Oneway", "Spiking_Twoways", "last_Spiking"):
            continue
        if any(path.startswith(p + ".") for p in spiking_paths):
            continue
        spiking_paths.append(path)
        if getattr(m, "idem", False):
            _set_module(model, path, nn.Identity())
            continue
        steps, signed = int(m.T), bool(getattr(m, "sign", True))
        if cls == "Spiking":
            block = m.block
            if not isinstance(block, nn.Sequential) or len(block) < 3:
                raise ConversionError(f"module '{path}' (Spiking) holds {type(block).__name__}; Fast-SNN's "
                                      "Spiking wraps nn.Sequential(layer, BatchNorm, IF)")
            block[2] = spiking_if(block[2], f"{path}.block.2", steps, signed)
            new: nn.Module = _Block(block)
        elif cls == "last_Spiking":
            new = _Block(m.block)
        elif cls == "Spiking_Oneway":
            new = _OneWay(m.conv, m.bn, spiking_if(m.relu, f"{path}.relu", steps, signed))
        else:
            new = _TwoWays(m.conv, m.bn, spiking_if(m.relu, f"{path}.relu", steps, signed), m.downsample)
        _set_module(model, path, new)
    if spiking_paths:  # [B, T, ...] between the spiking wrappers: Flatten(2) is the ANN's Flatten(1)
        for path, m in list(model.named_modules()):
            if type(m) is nn.Flatten and not any(path.startswith(p + ".") for p in spiking_paths):
                if m.start_dim < 2 or m.end_dim not in (-1,) and m.end_dim < 2:
                    raise ConversionError(f"module '{path}' (Flatten) flattens dims {m.start_dim}..{m.end_dim} "
                                          "of the [batch, T, ...] tensor of a Fast-SNN spiking model, which "
                                          "mixes time steps")
                _set_module(model, path, nn.Flatten(m.start_dim - 1, m.end_dim if m.end_dim < 0 else m.end_dim - 1))
    for path, m in list(model.named_modules()):
        cls = type(m).__name__
        if _is_fastsnn_activation(m):
            levels = _fastsnn_levels(m, path)
            if cls == "QuantReLU":
                if levels is None:
                    raise ConversionError(
                        f"module '{path}' ({cls}) has bit={m.bit}: Fast-SNN computes a full-precision ReLU there "
                        "(no act_alpha, no quantization levels), whose SNN is not exact at any T. Train the "
                        "quantized model (the code base's --bit below 32, e.g. 2 to 5) and import that.")
                new = quantizer(m, path, levels, True)
            else:  # the average pool, then its quantizer (none at bit 32)
                pool = nn.AvgPool2d(m.kernel_size, m.stride)
                new = pool if levels is None else nn.Sequential(pool, quantizer(m, path, levels, True))
            _set_module(model, path, new)
        elif (isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not _plain_torch_forward(m)
              and hasattr(m, "weight")):
            _set_module(model, path, _plain_layer(m, path))
    gm = _finish_import(model, "Fast-SNN code base", "sum-batch-major", _FASTSNN_HINT)
    return _maybe_snn(gm, time_steps, exact, **snn_kwargs)


# ---------------------------------------------------------------------------
# From the imported ANN to the source's SNN


class NormalisedNeuron(nn.Module):
    """QCFS's ``ScaledNeuron`` on the fused kernels: the input divided by λ
    (a Python float, as the code base divides), neurons with threshold 1, the
    spikes multiplied by λ. Exact reproduction mode only."""

    def __init__(self, inner: SpikingNeuron, scale: float):
        super().__init__()
        self.inner = inner
        self.scale = float(scale)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if residual is not None:
            x = x + residual
        return self.inner(x / self.scale) * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


_READOUT_FAST = {"running-sum": "sum", "sum-batch-major": "sum"}


def to_snn(qmodel: fx.GraphModule, time_steps: int, *, exact: bool = False,
           group_size: Optional[Union[int, str]] = None, readout: Optional[str] = None,
           **kwargs: Any) -> fx.GraphModule:
    """The SNN of an imported quantized ANN, with the source's conventions:
    signed neurons where the source fires negative spikes (Fast-SNN), group
    neurons where it has ``GN`` modules (or ``group_size=m``/``"auto"``), the
    initial membrane at half a unit, the readout the source uses (a sum over
    T; ``readout=`` overrides: "mean", "sum", "sequence").

    ``exact=True`` reproduces the code base's own simulation bit for bit:
    BatchNorm stays unfolded (``fold_bn=False``), QCFS's neurons divide their
    input by λ and fire at 1 (:class:`NormalisedNeuron`), and the readout
    sums the steps in the source's order (:class:`fastspike.nn.ReadoutOverTime`'s source orders). It relies
    on the layers computing each sample as the source's per-step calls do
    (the same BLAS/convolution kernels for T·B rows as for B rows); on the
    development CPU that holds for batches of 2 or more, not for a batch of 1.
    The default folds BatchNorm and sums with ``torch.sum``: equal up to
    float rounding, which can move a spike by one step.
    """
    quants = {name: q for name, q in convert.quantizers(qmodel)}
    imported = {name: q for name, q in quants.items() if isinstance(q, ImportedQuantReLU)}
    if not imported:
        raise ConversionError("fastspike.interop.to_snn converts the networks the interop importers return "
                              "(from_qcfs, from_gn, from_fastsnn); use fastspike.to_snn for others")
    source_readout = getattr(qmodel, "fastspike_readout", "running-sum")
    members = {q.group_size for q in imported.values()}
    signed_any = any(q.signed for q in imported.values())
    if group_size is None and any(m not in (None, 1) for m in members):
        group_size = -1  # per layer, set below
    neuron = "signed" if signed_any else "if"
    kwargs.setdefault("init_fraction", 0.5)
    if exact:
        kwargs.setdefault("fold_bn", False)
        kwargs.setdefault("compact_spikes", False)
    if readout is None:
        readout_kw = source_readout if exact else _READOUT_FAST[source_readout]
    else:
        readout_kw = readout
    if group_size == -1:
        snet = convert.to_snn(qmodel, time_steps, neuron, readout=readout_kw, **kwargs)
        for name, q in imported.items():
            layer = snet.get_submodule(name)
            if q.group_size and q.group_size > 1:
                if q.levels != q.group_size * time_steps:
                    raise ConversionError(f"quantizer '{name}' ({q.source_class}, m={q.group_size}) has L={q.levels}, "
                                          f"so its group neuron computes it at T = L/m, not T={time_steps}")
                layer.group_size = q.group_size
    else:
        kind = neuron
        if group_size is not None and group_size != "auto":
            kind = neuron_kind_name(signed_any, grouped=True)
        snet = convert.to_snn(qmodel, time_steps, kind, group_size=group_size, readout=readout_kw, **kwargs)
    for name, q in imported.items():
        layer = snet.get_submodule(name)
        if not isinstance(layer, SpikingNeuron):
            continue
        if signed_any and not q.signed:
            layer.signed = False
        if exact and q.normalised:
            scale = float(layer.threshold.reshape(-1)[0]) if layer.threshold.numel() == 1 else None
            if scale is None:
                raise ConversionError(f"quantizer '{name}' has a per-channel threshold; QCFS's normalised neuron "
                                      "has one λ")
            layer.threshold = torch.ones_like(layer.threshold)
            _set_module(snet, name, NormalisedNeuron(layer, scale))
    snet.graph.lint()
    snet.recompile()
    return snet


# ---------------------------------------------------------------------------
# SpikingJelly

class _SJCall:
    """One forward of a :class:`SpikingJellyNet`: T, the merged batch T·B every neuron must
    receive, and which neurons ran (each once: a forward that loops over T itself would
    run them T times, each time over all T steps)."""

    def __init__(self, steps: int, rows: int):
        self.steps, self.rows, self.ran = steps, rows, set()


_CALL: contextvars.ContextVar[Optional[_SJCall]] = contextvars.ContextVar("fastspike_sj_call", default=None)
_OWN_TIME_HINT = ("the network's forward seems to handle T itself (repeats the input over T, loops over the "
                  "steps or reduces over dim 0); from_spikingjelly needs the network whose forward takes one "
                  "step with dim 0 the batch (SpikingJellyNet feeds it all T steps as one merged [T·B, ...] batch)")
_SJ_SURROGATES = {"Sigmoid": "sigmoid", "ATan": "atan"}
_SJ_CONTAINERS = ("SeqToANNContainer", "MultiStepContainer", "StepModeContainer", "TLastMultiStepContainer")
_SJ_DROPOUTS = ("Dropout", "Dropout2d")


class _SJNeuron(nn.Module):
    """A SpikingJelly ``IFNode(v_reset=None)`` on the fused kernels: membrane
    from 0, threshold θ, reset by subtraction, spikes of value 1. Runs on the
    merged [T·B, ...] layout of :class:`SpikingJellyNet` (T from the call)."""

    def __init__(self, path: str, cls: str, threshold: float, surrogate: Optional[str], alpha: Optional[float],
                 why_not_grad: Optional[str]):
        super().__init__()
        self.path, self.cls = path, cls
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float32))
        self.surrogate, self.alpha, self.why_not_grad = surrogate, alpha, why_not_grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = _CALL.get()
        if call is None:
            raise RuntimeError(f"'{self.path}' runs inside a network imported by fastspike.interop."
                               "from_spikingjelly; call that network (SpikingJellyNet) on [T, B, ...]")
        # T·B rows, or a multiple when later dims were merged into the batch (flatten(0, 1)),
        # which keeps the rows time-major.
        if x.dim() == 0 or x.shape[0] % call.rows != 0:
            raise ConversionError(f"module '{self.path}' ({self.cls}) received {x.shape[0] if x.dim() else 'no'} rows "
                                  f"in dim 0, not a multiple of the merged batch T·B = {call.rows}: {_OWN_TIME_HINT}")
        if id(self) in call.ran:
            raise ConversionError(f"module '{self.path}' ({self.cls}) ran twice in one forward (each run covers all "
                                  f"T steps): {_OWN_TIME_HINT}; or, if one neuron module serves two call sites, "
                                  "give each site its own")
        call.ran.add(id(self))
        steps = call.steps
        x_seq = x.reshape((steps, x.shape[0] // steps) + tuple(x.shape[1:]))
        threshold = self.threshold.to(x.device)
        if torch.is_grad_enabled() and x.requires_grad:
            if self.why_not_grad is not None:
                raise ConversionError(f"module '{self.path}' ({self.cls}): gradients requested, but {self.why_not_grad}. "
                                      "Run inference under torch.no_grad(), or import with "
                                      "from_spikingjelly(..., approximate=True) for fastspike's surrogate "
                                      "(sigmoid/atan of (v − θ)/θ, reset detached)")
            out = neuron_op(x_seq, threshold, init_fraction=0.0, grad="surrogate",
                            surrogate=self.surrogate or "sigmoid", alpha=self.alpha).spikes
            spikes = out if float(self.threshold) == 1.0 else out / threshold
        else:
            counts = neuron_op(x_seq, threshold, init_fraction=0.0, compact=True, grad="none").spikes
            spikes = counts.to(x.dtype)
        return spikes.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"threshold={float(self.threshold)}, source={self.cls}"


class _SJDropout(nn.Module):
    """SpikingJelly's Dropout/Dropout2d on the merged [T·B, ...] layout: one mask per sample
    (per channel for 2d) shared by all T steps, as SpikingJelly keeps it (a memory reset with
    the network); the identity in eval mode."""

    def __init__(self, p: float, two_d: bool):
        super().__init__()
        self.p, self.two_d = p, two_d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        call = _CALL.get()
        if call is None:
            raise RuntimeError("a dropout imported by fastspike.interop.from_spikingjelly runs inside that "
                               "network (SpikingJellyNet); call it on [T, B, ...]")
        x_seq = x.reshape((call.steps, -1) + tuple(x.shape[1:]))
        dropout = F.dropout2d if self.two_d else F.dropout
        mask = dropout(torch.ones_like(x_seq[0]), self.p, training=True)
        return (x_seq * mask).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"p={self.p}, two_d={self.two_d}, mask shared over T"


class SpikingJellyNet(nn.Module):
    """A SpikingJelly network on fastspike: ``forward(x_seq)`` takes [T, B, ...]
    and returns [T, B, ...] (every tensor of the output), all T steps in one
    call. The network inside runs on the merged [T·B, ...] layout: each of
    its layers sees every step's sample as a separate batch row, as
    SpikingJelly's multi-step layers do."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x_seq: torch.Tensor) -> Any:
        if not isinstance(x_seq, torch.Tensor) or x_seq.dim() < 2:
            raise ValueError("x_seq must be a tensor [T, B, ...] (time first), got "
                             + (f"shape {list(x_seq.shape)}" if isinstance(x_seq, torch.Tensor) else type(x_seq).__name__))
        steps, rows = x_seq.shape[0], x_seq.shape[0] * x_seq.shape[1]
        token = _CALL.set(_SJCall(steps, rows))
        try:
            out = self.net(x_seq.reshape((-1,) + tuple(x_seq.shape[2:])))
        finally:
            _CALL.reset(token)

        def per_step(y: Any) -> Any:
            if not isinstance(y, torch.Tensor) or y.dim() == 0:
                return y  # a scalar over all T steps, as SpikingJelly's multi-step forward computes it
            if y.shape[0] != rows:  # e.g. a mean over dim 0: reshaping would mix samples
                raise ConversionError(f"the network returned a tensor of shape {list(y.shape)}, whose dim 0 is not "
                                      f"the merged batch T·B = {rows}: {_OWN_TIME_HINT}")
            return y.reshape((steps, -1) + tuple(y.shape[1:]))

        return pytree.tree_map(per_step, out)


def _is_sj(m: nn.Module) -> bool:
    return type(m).__module__.startswith("spikingjelly.")


def from_spikingjelly(model: nn.Module, *, approximate: bool = False) -> SpikingJellyNet:
    """Imports a SpikingJelly (``spikingjelly.activation_based``, 0.0.0.0.14 or
    2.x) network of IF neurons, single- or multi-step, or the output of its
    ann2snn converter (``VoltageScaler`` + ``IFNode``).

    Every ``IFNode`` with soft reset (``v_reset=None``) becomes a fastspike
    neuron starting at 0 (SpikingJelly's initial membrane) that emits spikes
    of value 1; SpikingJelly's layers run in single-step mode on the merged
    [T·B, ...] batch, its containers (``SeqToANNContainer``,
    ``MultiStepContainer``) become plain sequences. The result
    (:class:`SpikingJellyNet`) takes [T, B, ...] and returns [T, B, ...]: all
    T steps in one call, the same as SpikingJelly's multi-step forward (or a
    single-step network called T times after ``reset_net``).

    Refused by name: other neurons (LIF and its variants: their decay; any
    hard reset), and for gradients, surrogate settings fastspike computes
    otherwise (any but ``Sigmoid``/``ATan``, ``detach_reset=False``, θ ≠ 1:
    fastspike's surrogate takes (v − θ)/θ and detaches the reset). Those are
    refused when gradients are asked for; inference runs exactly.
    ``approximate=True`` accepts them with fastspike's surrogate (documented
    approximation, gradients only). The network's ``forward`` must treat
    dim 0 as the batch (as a single-step network does); a forward that
    handles T itself (repeats the input, loops over the steps, averages over
    dim 0) is refused when it runs: a neuron then sees a batch that is no
    multiple of T·B or runs twice, or an output loses the merged batch.
    Layers that keep state across steps (SpikingJelly memories: SynapseFilter,
    Delay, recurrent containers, NeuNorm, ...) are refused by name; Dropout and
    Dropout2d keep one mask over all T steps, as in SpikingJelly.
    """
    model = copy.deepcopy(model)
    refused: List[Tuple[str, str]] = []
    reasons: List[str] = []
    for path, m in list(model.named_modules()):
        cls = type(m).__name__
        if path and any(path.startswith(p + ".") for p, _ in refused):
            continue
        if not _is_sj(m):
            continue
        if cls == "IFNode" and hasattr(m, "v_threshold") and hasattr(m, "v_reset"):
            if m.v_reset is not None:
                refused.append((path, cls))
                reasons.append(f"'{path}' resets to v_reset={m.v_reset} (hard reset); fastspike resets by "
                               "subtraction (v_reset=None)")
                continue
            theta = float(m.v_threshold)
            sg = getattr(m, "surrogate_function", None)
            sg_name = _SJ_SURROGATES.get(type(sg).__name__)
            sg_alpha = float(getattr(sg, "alpha", 4.0 if sg_name == "sigmoid" else 2.0)) if sg_name else None
            why = None
            if sg_name is None:
                why = f"its surrogate {type(sg).__name__} is not one fastspike computes (Sigmoid, ATan)"
            elif not getattr(m, "detach_reset", False):
                why = "it does not detach the reset (detach_reset=False), fastspike always does"
            elif theta != 1.0:
                why = f"its threshold is {theta}: fastspike's surrogate takes (v − θ)/θ, SpikingJelly's v − θ"
            if why is not None and approximate:
                why = None
            if not (math.isfinite(theta) and theta > 0):
                raise ConversionError(f"module '{path}' ({cls}) has v_threshold={theta}; fastspike needs θ > 0")
            new = _SJNeuron(path, cls, theta, sg_name, sg_alpha, why)
        elif hasattr(m, "v_threshold") or cls.endswith("Node"):
            refused.append((path, cls))
            reasons.append(f"'{path}' is a {cls}, not an IF neuron with reset by subtraction")
            continue
        elif cls in _SJ_DROPOUTS:
            new = _SJDropout(float(m.p), two_d=cls == "Dropout2d")
        elif getattr(m, "_memories", None):
            refused.append((path, cls))
            reasons.append(f"'{path}' ({cls}) keeps state from one time step to the next (its memories "
                           f"{sorted(m._memories)}), which the merged [T·B, ...] layout does not carry")
            continue
        elif cls in _SJ_CONTAINERS:
            new = nn.Sequential(*m.children())
        elif hasattr(m, "step_mode"):
            m.step_mode = "s"  # a layer: per sample on the merged batch
            continue
        else:
            continue
        _set_module(model, path, new)
    _refuse(refused, "SpikingJelly", "; ".join(reasons) + ". fastspike runs IF neurons (IFNode with "
            "v_reset=None).")
    return SpikingJellyNet(model)
