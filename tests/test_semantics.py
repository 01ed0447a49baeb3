"""The published facts the neuron must reproduce (docs/design.md §1) and the chunking
property (docs/design.md §2), checked on the fused operators."""

import math

import pytest
import torch

import fastspike
from fastspike.reference import neuron_reference, seed_style_loop

from conftest import NEURON_KINDS, assert_same_result, cpu_and_cuda


def qcfs(z: torch.Tensor, levels: int, lam: float) -> torch.Tensor:
    """QCFS activation λ·clip(⌊z·L/λ + ½⌋/L, 0, 1) (Bu et al., ICLR 2022)."""
    return lam * torch.clamp(torch.floor(z * levels / lam + 0.5) / levels, 0, 1)


def away_from_rounding_edges(z: torch.Tensor, levels: int, lam: float) -> torch.Tensor:
    """Inputs whose z·L/λ + ½ is not within 1e-4 of an integer, where float
    accumulation over T steps could legitimately land on either side."""
    frac = torch.frac(z * levels / lam + 0.5).abs()
    return (frac > 1e-4) & (frac < 1 - 1e-4)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("time_steps", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("theta", [1.0, 0.37])
def test_if_on_constant_input_equals_qcfs_with_levels_T(device, time_steps, theta):
    z = torch.linspace(-0.5 * theta, 1.5 * theta, 4001, dtype=torch.float64)
    z = z[away_from_rounding_edges(z, time_steps, theta)]
    x = z.expand(time_steps, -1).to(device)
    spikes = fastspike.neuron(x, theta).spikes
    count = spikes.sum(0).cpu() / theta
    assert torch.equal(count.round(), count.round().clamp(min=0))  # whole, non-negative spikes
    assert torch.allclose(spikes.sum(0).cpu(), qcfs(z, time_steps, theta) * time_steps, atol=1e-9)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("group_size,time_steps", [(2, 1), (2, 4), (4, 2), (8, 4), (3, 5)])
def test_group_neuron_on_constant_input_equals_qcfs_with_levels_mT(device, group_size, time_steps):
    theta = 1.0
    levels = group_size * time_steps
    z = torch.linspace(-0.5, 1.5, 4001, dtype=torch.float64)
    z = z[away_from_rounding_edges(z, levels, theta)]
    x = z.expand(time_steps, -1).to(device)
    out = fastspike.neuron(x, theta, group_size=group_size).spikes.sum(0).cpu() / time_steps
    assert torch.allclose(out, qcfs(z, levels, theta), atol=1e-12)
    # and a plain IF neuron with the same T is coarser: it cannot match everywhere
    if_out = fastspike.neuron(x, theta).spikes.sum(0).cpu() / time_steps
    assert not torch.allclose(if_out, qcfs(z, levels, theta))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("time_steps", [4, 8, 16])
def test_signed_neurons_end_closer_to_quantized_mean(device, time_steps):
    gen = torch.Generator().manual_seed(time_steps)
    mean = torch.rand(20000, generator=gen, dtype=torch.float64)  # x̄ in (0, θ)
    noise = torch.randn(time_steps, 20000, generator=gen, dtype=torch.float64) * 0.6
    noise -= noise.mean(0)  # the inputs vary, their mean is exactly x̄
    x = (mean + noise).to(device)
    target = qcfs(mean, time_steps, 1.0)
    errors = {}
    for signed in (False, True):
        rate = fastspike.neuron(x, 1.0, signed=signed).spikes.mean(0).cpu()
        errors[signed] = (rate - target).abs().mean().item()
    assert errors[True] < 0.75 * errors[False], errors


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("group_size,signed", NEURON_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunked_run_equals_whole_run(device, group_size, signed, dtype):
    x = (torch.randn(12, 3, 40) * 0.7).to(dtype).to(device)
    whole = fastspike.neuron(x, 0.6, group_size=group_size, signed=signed)
    first = fastspike.neuron(x[:5], 0.6, group_size=group_size, signed=signed)
    second = fastspike.neuron(x[5:], 0.6, group_size=group_size, signed=signed,
                              v_init=first.v, count_init=first.count)
    assert_same_result(whole, (torch.cat([first.spikes, second.spikes]), second.v, second.count))


@pytest.mark.parametrize("signed", [False, True])
def test_seed_style_masked_loop_agrees(signed):
    x = torch.randn(10, 4, 300) * 0.8
    expected = neuron_reference(x, 1.0, signed=signed, grad="none").spikes
    assert torch.equal(seed_style_loop(x, 1.0, signed=signed), expected)
    assert torch.equal(fastspike.neuron(x, 1.0, signed=signed).spikes, expected)


def test_negative_spikes_never_exceed_positive_ones():
    x = torch.randn(30, 5000) * 2
    result = fastspike.neuron(x, 1.0, signed=True, group_size=3)
    units = torch.cumsum(result.spikes / (1.0 / 3), 0).round()
    assert (units >= 0).all()  # the running net count c never goes negative
    assert torch.equal(units[-1].to(torch.int32), result.count)
    assert (result.spikes < 0).any()
