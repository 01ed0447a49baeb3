"""From a ReLU network to a spiking one, in a few small torch.fx passes.

    qnet = fastspike.quantize(net, levels=8)               # ReLU -> QuantReLU, move max-pools
    fastspike.calibrate(qnet, loader)                      # optional: λ from activation statistics
    ... train or fine-tune qnet ...
    snet = fastspike.to_snn(qnet, time_steps=8, neuron="signed")
    logits = snet(images)                                  # mean over T of the last layer

Each pass does one thing, in a file of its own in this package, and they
are composed in two visible pipelines below (:func:`quantize` and
:func:`to_snn`); graph.py holds what the passes share (tracing, the error type,
fastspike.time_linear). :func:`~fastspike.calibration.calibrate` lives beside
the quantizers, the time-axis modules in :mod:`fastspike.nn`.

* :func:`replace_activations` (activations.py): every ReLU call site (nn.ReLU,
  also one module called at several sites, F.relu, torch.relu, x.relu(),
  in-place forms) gets its own quantizer; unknown activation-like modules are
  refused by name;
* :func:`move_max_pools` (max_pools.py): a max-pool right after a quantizer moves before it
  (exact: max-pooling commutes with a monotone elementwise quantizer); other
  max-pools become average pools with a warning, or are refused in strict mode;
* :func:`fold_batch_norms` (batch_norm.py): eval-mode BatchNorm folds into the conv/linear
  before it;
* :func:`check_time_rule` (time_rule.py) and :func:`check_batch_reads`
  (batch_reads.py): refuse what the SNN would not compute exactly;
* :func:`insert_neurons` (neurons.py): quantizers become spiking neurons (threshold λ);
* :func:`fuse_residual_adds` (residual.py, ``fuse_residual=True``): ``add -> neuron`` (a
  ResNet residual join) becomes one neuron call taking both operands;
* :func:`add_time_axis` (time_axis.py): inputs are repeated over T in the merged [T·B, ...]
  layout and outputs read out over T; with ``constant_input_once=True`` the
  part before the first neurons runs once on [B, ...] and is repeated only
  where it meets a time-varying value or reaches the output (the first
  neurons read it as a time broadcast, never copied);
* :func:`fold_spike_scales` (spike_scales.py, ``compact_spikes=True``): a neuron whose every
  consumer is a conv/linear (through average pools, dropout, flatten) emits
  its signed spike counts and the spike scale θ/m moves into those layers'
  input-channel weights.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Type, Union

import torch
from torch import fx, nn

from ..nn import NEURON_KINDS, ReadoutOverTime, RepeatOverTime, ShapeOverTime, neuron_kind_name
from ..quant import QuantReLU, quantizers
from .activations import replace_activations, trace_known, unknown_activations
from .batch_norm import fold_batch_norms
from .batch_reads import check_batch_reads
from .graph import ConversionError, _is_neuron, _module, time_linear, trace
from .max_pools import move_max_pools
from .neurons import insert_neurons
from .residual import fuse_residual_adds
from .spike_scales import fold_spike_scales
from .time_axis import add_time_axis
from .time_rule import _nonlinear_nodes, check_time_rule
from ..calibration import calibrate  # noqa: E402  (imports .graph: after it)

__all__ = [
    "ConversionError",
    "quantize",
    "calibrate",
    "quantizers",
    "to_snn",
    "trace",
    "replace_activations",
    "move_max_pools",
    "fold_batch_norms",
    "insert_neurons",
    "add_time_axis",
    "time_linear",
    "check_time_rule",
    "check_batch_reads",
    "unknown_activations",
    "fuse_residual_adds",
    "fold_spike_scales",
    "RepeatOverTime",
    "ShapeOverTime",
    "ReadoutOverTime",
    "NEURON_KINDS",
]


def quantize(
    model: nn.Module,
    levels: int = 8,
    preset: str = "qcfs",
    *,
    threshold: float = 8.0,
    strict: bool = False,
    leaf_modules: Sequence[Type[nn.Module]] = (),
    example_input: Optional[torch.Tensor] = None,
) -> fx.GraphModule:
    """Returns a copy of ``model`` with every ReLU call site replaced by its own
    :class:`~fastspike.quant.QuantReLU` (``levels``, ``preset``, initial clip
    value ``threshold``) and max-pools handled as described in the module doc.

    ``example_input`` runs one forward so that per-channel quantizers
    ("cs-qcfs") create their parameters now rather than on the first batch.
    """
    gm = trace_known(model, leaf_modules)
    gm = replace_activations(gm, lambda: QuantReLU(levels, preset, threshold))
    if not quantizers(gm):
        raise ConversionError(f"quantize found no ReLU in {type(model).__name__}: fastspike converts ReLU "
                              f"networks (nn.ReLU, F.relu, torch.relu, x.relu() and their in-place forms)"
                              f"{_nonlinear_nodes(gm)}. Replace it with nn.ReLU and retrain or fine-tune the "
                              "network before converting.")
    gm = move_max_pools(gm, strict)
    check_time_rule(gm, lambda n: isinstance(_module(gm, n), QuantReLU), inference=False)
    if example_input is not None:
        with torch.no_grad():
            was_training = gm.training
            gm.eval()
            gm(example_input)
            gm.train(was_training)
    return gm



# Defaults of to_snn's optimisations: on only where measured to save time or
# peak memory with unchanged outputs (README, "From a network to an SNN").
FUSE_RESIDUAL_DEFAULT = True
CONSTANT_INPUT_ONCE_DEFAULT = True
COMPACT_SPIKES_DEFAULT = False


def _auto_group_size(qmodel: nn.Module, time_steps: int, neuron: str) -> Tuple[str, int]:
    """(neuron kind, m) for ``group_size="auto"``: m = L / T (Lv et al.)."""
    levels = sorted({q.levels for _, q in quantizers(qmodel)})
    if not levels:
        raise ConversionError("group_size='auto' needs quantizers (QuantReLU) to read L from; "
                              "call fastspike.quantize first")
    if len(levels) > 1:
        raise ConversionError(f"group_size='auto' needs one L in every layer, the quantizers have "
                              f"levels {levels}; pass group_size=m")
    if levels[0] % time_steps != 0:
        raise ValueError(f"group_size='auto' sets m = L / T, but T={time_steps} does not divide "
                         f"L={levels[0]}; pick T among the divisors of L or pass group_size=m")
    members = levels[0] // time_steps
    signed = NEURON_KINDS[neuron].signed if neuron in NEURON_KINDS else False
    return neuron_kind_name(signed, grouped=members > 1), members


def to_snn(
    qmodel: nn.Module,
    time_steps: int,
    neuron: str = "if",
    *,
    group_size: Optional[Union[int, str]] = None,
    readout: str = "mean",
    leaf_modules: Sequence[Type[nn.Module]] = (),
    fuse_residual: bool = FUSE_RESIDUAL_DEFAULT,
    constant_input_once: bool = CONSTANT_INPUT_ONCE_DEFAULT,
    compact_spikes: bool = COMPACT_SPIKES_DEFAULT,
    fold_bn: bool = True,
    **neuron_kwargs,
) -> fx.GraphModule:
    """Converts a quantized network into a spiking one that runs all
    ``time_steps`` steps through the fused neuron kernels in one call.

    Args:
        qmodel: the output of :func:`quantize` (trained or calibrated).
        time_steps: T. IF neurons reproduce the quantized ANN exactly on
            constant input when T = levels; group neurons when m·T = levels.
        neuron: a key of :data:`fastspike.nn.NEURON_KINDS`: "if", "signed"
            (Fast-SNN), "group" or "signed-group".
        group_size: m for the group kinds; ``"auto"``: m = L / T (the
            group-neuron paper's rule, L the quantizers' levels, which must
            be the same in every layer and a multiple of T); m = 1 gives
            plain (or signed) IF neurons.
        readout: "mean" (default), "sum" or "sequence" ([T, B, ...]); "running-sum" and
            "sum-batch-major" sum in a source code base's order (exact reproduction).
        fuse_residual: emit one neuron call for each ``add -> activation``
            (ResNet residual joins), so the sum is never stored
            (:func:`fuse_residual_adds`). Same outputs, bit for bit.
        constant_input_once: run everything before the first neurons once
            on [B, ...] instead of on the T-fold repeated batch; the first
            neurons read that current as a time broadcast. Same outputs, bit
            for bit; gradients equal up to float rounding (sums over T are
            taken in another order).
        compact_spikes: neurons whose consumers are all conv/linear layers
            emit int8 spike counts, with θ/m folded into those layers'
            weights (:func:`fold_spike_scales`). Outputs equal up to float
            rounding; inference only.
        fold_bn: fold eval-mode BatchNorm into the conv/linear before it
            (default). ``False`` keeps each BatchNorm as its own per-channel
            op, which rounds as the unconverted network does (the exact
            reproduction mode of :mod:`fastspike.interop`).
        neuron_kwargs: passed to each :class:`~fastspike.nn.SpikingNeuron`
            (e.g. grad="rate", init_fraction=...).

    The defaults of the three options are what measured faster or smaller
    here (see README, "From a network to an SNN").

    The input is the usual [B, ...] analog batch; the result is in eval mode.
    """
    if isinstance(time_steps, bool) or not isinstance(time_steps, int) or time_steps < 1:
        raise ValueError(f"time_steps must be an integer >= 1, got {time_steps!r}")
    gm = trace_known(qmodel, leaf_modules).eval()
    if group_size == "auto":
        neuron, group_size = _auto_group_size(qmodel, time_steps, neuron)
    if fold_bn:
        gm = fold_batch_norms(gm)
    gm = insert_neurons(gm, time_steps, neuron, group_size, **neuron_kwargs)
    check_time_rule(gm, lambda n: _is_neuron(gm, n), inference=True)
    check_batch_reads(gm, constant_input_once)
    if fuse_residual:
        gm = fuse_residual_adds(gm)
    gm = add_time_axis(gm, time_steps, readout, constant_input_once)
    if compact_spikes:
        gm = fold_spike_scales(gm)
    for node in gm.graph.nodes:
        node.type = None  # the user's annotations name types TorchScript cannot resolve in fx's code
    gm.recompile()
    gm.time_steps = time_steps
    return gm
