"""Pass of to_snn: quantizers become spiking neurons."""

from __future__ import annotations

from typing import Optional

from torch import fx

from ..nn import NEURON_KINDS, SpikingNeuron, resolve_neuron_kind  # noqa: F401 (NEURON_KINDS re-exported)
from ..quant import QuantReLU
from .activations import _is_relu
from .graph import ConversionError, _describe, _module
from .time_rule import _nonlinear_nodes

def insert_neurons(gm: fx.GraphModule, time_steps: int, neuron: str = "if",
                   group_size: Optional[int] = None, **neuron_kwargs) -> fx.GraphModule:
    """Replaces every quantizer by a spiking neuron layer with threshold λ
    (per channel where the quantizer is) in the merged layout; ``neuron`` is
    a key of :data:`fastspike.nn.NEURON_KINDS`."""
    members, signed = resolve_neuron_kind(neuron, group_size)
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
