"""Quantized ReLUs (every preset) and the spiking layers: a single layer of
spiking neurons equals its quantized-ANN twin exactly on constant input."""

import pytest
import torch

import fastspike
from fastspike.nn import GroupNeuron, IFNeuron, NeuronState, SignedIFNeuron, SpikingNeuron
from fastspike.quant import PRESETS, QuantReLU, quantize_tensor

from conftest import cpu_and_cuda


def edge_free(z: torch.Tensor, lam: torch.Tensor, levels: int) -> torch.Tensor:
    scaled = z * levels / lam + 0.5
    frac = scaled - torch.floor(scaled)
    return (frac > 1e-3) & (frac < 1 - 1e-3)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_computes_the_quantized_relu(preset):
    quant = QuantReLU(levels=5, preset=preset, threshold=1.5, num_channels=4)
    z = torch.linspace(-1, 2.5, 4 * 7 * 9).reshape(7, 4, 9)
    lam = quant.broadcast_threshold(z).detach()
    keep = edge_free(z, lam, 5)
    y = quant(z)
    assert torch.allclose(y[keep], quantize_tensor(z, lam, 5)[keep], atol=1e-6)
    assert y.min() == 0 and torch.allclose(y.max(), torch.tensor(1.5))
    assert len(torch.unique(y)) == 6  # 0 and the 5 levels


def test_gradients_of_the_presets():
    z = torch.tensor([-0.5, 0.2, 0.7, 1.4, 3.0], requires_grad=True)
    for preset in ("qcfs", "fastsnn"):
        quant = QuantReLU(levels=4, preset=preset, threshold=1.0)
        quant(z).sum().backward()
        assert torch.equal(z.grad, torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0])), preset
        z.grad = None
        if preset == "fastsnn":  # PACT: the clip value collects the clipped inputs
            assert quant.raw_threshold.grad.item() == 2.0
    lsq = QuantReLU(levels=4, preset="lsq", threshold=1.0)  # step s = 0.25
    lsq(z.unsqueeze(0)).sum().backward()  # one sample of 5 features
    q = z.detach() / 0.25
    inside = (q > 0) & (q < 4)
    expected = torch.where(inside, torch.floor(q + 0.5) - q, (q >= 4).float() * 4).sum() / (5 * 4) ** 0.5
    assert torch.allclose(lsq.raw_threshold.grad, expected)


def test_per_channel_thresholds_stay_positive_and_can_be_set():
    quant = QuantReLU(levels=4, preset="cs-qcfs", threshold=2.0, num_channels=3)
    assert torch.allclose(quant.threshold(), torch.full((3,), 2.0))
    with torch.no_grad():
        quant.raw_threshold.fill_(-30.0)  # softplus keeps λ > 0 whatever the parameter
    assert (quant.threshold() > 0).all()
    quant.set_threshold(torch.tensor([0.5, 1.0, 4.0]))
    assert torch.allclose(quant.threshold(), torch.tensor([0.5, 1.0, 4.0]), rtol=1e-5)
    with pytest.raises(ValueError, match="must have shape \\[3\\]"):
        quant.set_threshold(torch.ones(4))
    with pytest.raises(ValueError, match="finite and > 0"):
        QuantReLU(levels=4).set_threshold(torch.tensor(-1.0))
    with pytest.raises(ValueError, match="preset must be one of"):
        QuantReLU(preset="pact")
    lazy = QuantReLU(levels=2, preset="cs-qcfs")
    lazy(torch.randn(2, 6, 3))
    assert lazy.threshold().shape == (6,)
    with pytest.raises(ValueError, match="has 6 channels but its input has 5"):
        lazy(torch.randn(2, 5, 3))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("preset", ["qcfs", "cs-qcfs"])
@pytest.mark.parametrize("kind,group_size,time_steps", [("if", 1, 8), ("group", 4, 2), ("group", 2, 4)])
def test_single_layer_snn_equals_quantized_ann_on_constant_input(device, preset, kind, group_size, time_steps):
    levels = group_size * time_steps
    quant = QuantReLU(levels=levels, preset=preset, threshold=1.0, num_channels=6).to(device)
    if preset == "cs-qcfs":
        quant.set_threshold(torch.linspace(0.5, 2.0, 6))
    z = (torch.rand(5, 6, 4, 4) * 3 - 0.5).to(device)
    lam = quant.broadcast_threshold(z).detach()
    layer = SpikingNeuron(quant.threshold().detach(), time_steps, group_size=group_size).to(device)
    merged = z.unsqueeze(0).expand(time_steps, *z.shape).reshape(time_steps * 5, 6, 4, 4)
    rate = layer(merged).view(time_steps, 5, 6, 4, 4).mean(0)
    keep = edge_free(z, lam, levels)
    assert keep.float().mean() > 0.9
    assert torch.allclose(rate[keep], quant(z).detach()[keep], atol=1e-5)


def test_layouts_and_streaming_agree():
    x = torch.randn(6, 2, 3, 4, 4)
    thr = torch.tensor([0.5, 1.0, 1.5])
    expected = fastspike.neuron(x, thr, signed=True)
    merged = SignedIFNeuron(thr, time_steps=6)(x.reshape(12, 3, 4, 4))
    assert torch.equal(merged, expected.spikes.reshape(12, 3, 4, 4))
    seq = SignedIFNeuron(thr, layout="sequence")
    assert torch.equal(seq(x), expected.spikes)
    state = None
    chunks = []
    for part in x.split([1, 3, 2]):
        out, state = seq.step(part, state)
        chunks.append(out)
    assert torch.equal(torch.cat(chunks), expected.spikes)
    assert isinstance(state, NeuronState) and torch.equal(state.v, expected.v)
    # forward keeps no state: calling twice gives the same answer
    assert torch.equal(seq(x), seq(x))


def test_layer_kinds_and_errors():
    assert IFNeuron(1.0, 2).group_size == 1 and not IFNeuron(1.0, 2).signed
    assert GroupNeuron(1.0, 2, group_size=4).group_size == 4
    with pytest.raises(ValueError, match="time_steps must be an integer >= 1 for the merged layout"):
        IFNeuron(1.0)
    with pytest.raises(ValueError, match="not a multiple of time_steps=4"):
        IFNeuron(1.0, 4)(torch.randn(6, 3))
