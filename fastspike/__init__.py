"""fastspike: fused multi-time-step spiking neuron operators for PyTorch.

    import fastspike
    spikes, v, count = fastspike.neuron(x_seq, threshold=1.0, signed=True)

runs a layer of signed IF neurons over all T steps of ``x_seq`` [T, ...] in one
kernel launch (CPU or CUDA), with the same numbers as the Python time loop in
:mod:`fastspike.reference`. :func:`backend_info` says which implementation is
in use.
"""

from .ops import NeuronResult, backend_info, neuron
from .reference import neuron_reference

__version__ = "0.1.0"

__all__ = ["neuron", "neuron_reference", "backend_info", "NeuronResult", "__version__"]
