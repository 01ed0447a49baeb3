"""Pass of to_snn: quantizers become spiking neurons."""

from __future__ import annotations

from typing import Optional

from torch import fx

from ..nn import SpikingNeuron
from ..quant import QuantReLU
from .activations import _is_relu
from .graph import ConversionError, _describe, _module
from .time_rule import _nonlinear_nodes

NEURON_KINDS = {"if": (1, False), "signed": (1, True), "group": (None, False), "signed-group": (None, True)}


def insert_neurons(gm: fx.GraphModule, time_steps: int, neuron: str = "if",
                   group_size: Optional[int] = None, **neuron_kwargs) -> fx.GraphModule:
    """Replaces every quantizer by a spiking neuron layer with threshold λ
    (per channel where the quantizer is) in the merged layout."""
    if neuron not in NEURON_KINDS:
        raise ValueError(f"neuron must be one of {sorted(NEURON_KINDS)}, got {neuron!r}")
    members, signed = NEURON_KINDS[neuron]
    if members is None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
            raise ValueError(f"neuron={neuron!r} needs group_size >= 2, got {group_size!r}")
        members = group_size
    elif group_size not in (None, 1):
        raise ValueError(f"group_size={group_size} only applies to neuron='group' or 'signed-group'")
    replaced = 0
    for node in list(gm.graph.nodes):
        quant = _module(gm, node)
        if not isinstance(quant, QuantReLU):
            continue
        if quant.per_channel and quant.raw_threshold.numel() == 0:
            raise ConversionError(f"quantizer '{node.target}' never saw an input, so its per-channel "
                                  "thresholds do not exist yet: run the quantized model once (or pass "
                                  "example_input= to quantize) before converting")
        layer = SpikingNeuron(quant.threshold().detach().float(), time_steps, group_size=members,
                              signed=signed, **neuron_kwargs)
        parent, _, attr = node.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, layer)
        replaced += 1
    if replaced == 0:
        relus = [n for n in gm.graph.nodes if _is_relu(gm, n)]
        if relus:
            raise ConversionError(f"node '{relus[0].name}' ({_describe(gm, relus[0])}) is an activation that "
                                  "was not quantized; call fastspike.quantize on the model first")
        raise ConversionError("the model has no QuantReLU to turn into neurons and no ReLU to quantize"
                              f"{_nonlinear_nodes(gm)}: fastspike converts ReLU networks; call "
                              "fastspike.quantize on a ReLU network first")
    gm.recompile()
    return gm
