"""Pass of to_snn (compact_spikes=True): the spike scale moves into the consumers' weights."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import fx, nn

from ..checks import MAX_COMPACT_GROUP
from ..nn import RepeatOverTime, SpikingNeuron
from .graph import _called_once, _is_neuron, _module, _owns_its_parameters, _plain_torch_compute

# ---------------------------------------------------------------------------
# Pass: compact spikes, the spike scale folded into the consumers

_SCALE_PASSTHROUGH_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                              nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Dropout, nn.Identity)


def _flattens_channels(gm: fx.GraphModule, node: fx.Node) -> bool:
    """flatten(x, 1) in any spelling: [N, C, ...] -> [N, C·...], channel-major."""
    m = _module(gm, node)
    if isinstance(m, nn.Flatten):
        return m.start_dim == 1 and m.end_dim == -1
    if (node.op == "call_function" and node.target is torch.flatten) or (
            node.op == "call_method" and node.target == "flatten"):
        rest = list(node.args[1:]) + [node.kwargs.get(k) for k in ("start_dim", "end_dim") if k in node.kwargs]
        return rest[:1] == [1] and rest[1:] in ([], [-1])
    return False


def _scale_consumers(gm: fx.GraphModule, node: fx.Node, flattened: bool = False) -> Optional[List[Tuple[nn.Module, bool]]]:
    """The conv/linear layers that every use of ``node`` reaches through
    linear, channel-preserving nodes (average pools, dropout, identity, one
    flatten before a linear), as (layer, flattened); None if some use is
    anything else."""
    found: List[Tuple[nn.Module, bool]] = []
    for user in node.users:
        m = _module(gm, user)
        if user.args[:1] != (node,) or (len(user.args) > 1 and not _flattens_channels(gm, user)):
            return None
        if isinstance(m, nn.Linear) or (isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not flattened
                                        and m.groups == 1 and m.padding_mode == "zeros"):
            if not _called_once(gm, user):
                return None  # a layer called at several sites cannot take one site's scale
            if not _owns_its_parameters(gm, user.target, m):
                return None  # its weight is read elsewhere too (tied, get_attr) or recomputed
            found.append((m, flattened))
            continue
        if isinstance(m, _SCALE_PASSTHROUGH_MODULES) and not user.kwargs and not flattened:
            further = _scale_consumers(gm, user, flattened)
        elif _flattens_channels(gm, user) and not flattened:
            further = _scale_consumers(gm, user, True)
        else:
            return None
        if further is None:
            return None
        found += further
    return found or None


_RANK_PRESERVING_MODULES = (nn.Linear, nn.Identity, nn.modules.dropout._DropoutNd, SpikingNeuron, RepeatOverTime)


def _is_matrix(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node``'s value is known to have rank 2 ([rows, features]): it is a
    flatten(1) or a view/reshape to two sizes, seen through layers that keep
    the rank (linear, dropout, identity, neurons, the repeat over time)."""
    while isinstance(node, fx.Node):
        if _flattens_channels(gm, node):
            return True
        if (node.op == "call_method" and node.target in ("view", "reshape")) or (
                node.op == "call_function" and node.target is torch.reshape):
            sizes = node.args[1:]
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = sizes[0]
            return not node.kwargs and len(sizes) == 2
        m = _module(gm, node)
        if not isinstance(m, _RANK_PRESERVING_MODULES) or len(node.args) != 1 or node.kwargs:
            return False
        if not isinstance(m, (SpikingNeuron, RepeatOverTime)) and not _plain_torch_compute(m):
            return False  # a subclass's forward may change the rank
        node = node.args[0]
    return False


def _per_input_scale(layer: nn.Module, scale: torch.Tensor, flattened: bool,
                     matrix: bool) -> Optional[torch.Tensor]:
    """The scale of each input of ``layer`` (weight.shape[1] of them), or None
    if the spike scale's shape does not map onto them. A per-channel scale
    lies along dim 1 of the neuron's input (``matrix``: known to have rank 2);
    a conv reads its channels there, a linear its last dim: those coincide
    after flatten(1) or on a matrix, not on tokens [B, N, C] (whose dim 1 is N)."""
    inputs = layer.weight.shape[1]
    if scale.dim() == 0:
        return scale.expand(inputs)
    if scale.dim() == 1 and flattened and inputs % scale.numel() == 0:
        return scale.repeat_interleave(inputs // scale.numel())  # flatten(1) is channel-major
    if scale.dim() == 1 and scale.numel() == inputs and (matrix or not isinstance(layer, nn.Linear)):
        return scale
    return None


def fold_spike_scales(gm: fx.GraphModule) -> fx.GraphModule:
    """For each neuron whose every consumer is a conv/linear (see
    :func:`_scale_consumers`), multiplies those layers' input-channel weights
    by the spike scale u = θ/m and makes the neuron emit its signed counts
    k⁺ − k⁻ (from the op's compact int8 output) instead of (k⁺ − k⁻)·u. Exact up
    to float rounding (W·u·k instead of W·(k·u)); inference only. Where the
    scale cannot go into the weights exactly (a consumer whose weight is also
    read elsewhere or recomputed, a per-channel scale that does not line up
    with a linear's inputs) the neuron keeps emitting scaled spikes."""
    for node in gm.graph.nodes:
        if not _is_neuron(gm, node) or not _called_once(gm, node):
            continue
        layer = _module(gm, node)
        consumers = _scale_consumers(gm, node)
        if not consumers or layer.group_size > MAX_COMPACT_GROUP:
            continue
        matrix = len(node.args) == 1 and not node.kwargs and _is_matrix(gm, node.args[0])
        scales = [_per_input_scale(m, layer.spike_scale(), flat, matrix) for m, flat in consumers]
        if any(scale is None for scale in scales):
            continue
        with torch.no_grad():
            for (m, _), scale in zip(consumers, scales):
                weight = m.weight
                weight.mul_(scale.to(weight.dtype).view((1, -1) + (1,) * (weight.dim() - 2)))
        layer.compact = True
    gm.recompile()
    return gm
