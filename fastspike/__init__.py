"""fastspike: fused multi-time-step spiking neuron operators for PyTorch.

    import fastspike
    spikes, v, count = fastspike.neuron(x_seq, threshold=1.0, signed=True)

runs a layer of signed IF neurons over all T steps of ``x_seq`` [T, ...] in one
kernel launch (CPU or CUDA), with the same numbers as the Python time loop in
:mod:`fastspike.reference`. :func:`backend_info` says which implementation is
in use. The converter turns a ReLU network into a spiking one::

    qnet = fastspike.quantize(net, levels=8)          # then train or fastspike.calibrate
    snet = fastspike.to_snn(qnet, time_steps=8, neuron="signed")
"""

from .convert import ConversionError, calibrate, quantize, time_linear, to_snn
from .nn import GroupNeuron, IFNeuron, NeuronState, SignedIFNeuron, SpikingNeuron, record_spike_trains
from .ops import NeuronResult, backend_info, neuron, use_reference
from .quant import QuantReLU
from .reference import neuron_reference

# Training and fine-tuning are imported on first use (PEP 562): `import fastspike`
# for inference loads neither them nor what they import.
_LAZY = {"TrainConfig": "train", "train_model": "train", "finetune_layerwise": "finetune",
         "train_snn": "finetune", "write_back": "finetune"}


_LAZY_MODULES = {"train", "finetune", "checkpoint", "cli", "demo", "data", "metrics", "models"}


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _LAZY_MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'fastspike' has no attribute {name!r}")
    globals()[name] = value
    return value

__version__ = "0.1.0"

__all__ = [
    "neuron", "neuron_reference", "backend_info", "NeuronResult", "use_reference",
    "QuantReLU", "SpikingNeuron", "IFNeuron", "SignedIFNeuron", "GroupNeuron", "NeuronState",
    "quantize", "calibrate", "to_snn", "time_linear", "ConversionError", "record_spike_trains", "__version__",
    "TrainConfig", "train_model", "finetune_layerwise", "train_snn", "write_back",
]
