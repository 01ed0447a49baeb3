"""Large CPU outputs of the operators live in memory advised for transparent huge
pages (csrc/neuron/cpu/huge_page_allocator.cpp): the values, the tensors' behaviour
and torch.profiler's view of them are those of ordinary tensors."""

import os
import subprocess
import sys

import pytest
import torch

import fastspike
from fastspike.reference import neuron_reference

from conftest import assert_same_result, needs_extension

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import bench_models  # noqa: E402

pytestmark = [
    needs_extension(),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages are Linux only"),
]

HUGE_PAGE = 2 << 20
MIN_BYTES = 4 << 20  # kHugePageOutputMinBytes
TIME_STEPS = 4
NEURONS = MIN_BYTES // (TIME_STEPS * 4) + 5  # float32 spikes just over the threshold


def large_input(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(TIME_STEPS, NEURONS, generator=gen) * 0.8


@pytest.mark.skipif(os.environ.get("FASTSPIKE_HUGE_PAGES") == "0", reason="switched off")
def test_large_outputs_are_huge_page_aligned_and_exact():
    x = large_input(0)
    with torch.no_grad():
        result = fastspike.neuron(x, 0.9, signed=True, group_size=2)
        small = fastspike.neuron(x[:, :1000], 0.9)
    assert fastspike.backend_info()["cpu_huge_page_outputs"].startswith("on")
    assert result.spikes.data_ptr() % HUGE_PAGE == 0
    assert_same_result(neuron_reference(x, 0.9, signed=True, group_size=2, grad="none"), result)
    assert_same_result(neuron_reference(x[:, :1000], 0.9, grad="none"), small)


def test_large_gradients_equal_the_reference():
    """The backward's grad_x and the forward's training records come from the same
    allocator; a large surrogate backward still equals autograd through the reference."""
    x = large_input(1)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    grads = []
    for fn in (neuron_reference, fastspike.neuron):
        leaf = x.clone().requires_grad_(True)
        (fn(leaf, 0.9, signed=True).spikes * weights).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)
    assert grads[1].abs().sum() > 0


def test_large_outputs_behave_like_ordinary_tensors():
    """Resizable storage (resize_ grows it, keeping the values), in-place ops,
    clone and pickling through torch.save all work on a huge-page output."""
    x = large_input(3)
    with torch.no_grad():
        spikes = fastspike.neuron(x, 0.9).spikes
    expected = spikes.clone()
    flat = spikes.view(-1)
    flat.resize_(flat.numel() + (1 << 20))
    assert torch.equal(flat[: expected.numel()], expected.view(-1))
    spikes.mul_(2.0)
    assert torch.equal(spikes, expected * 2)
    import io
    buffer = io.BytesIO()
    torch.save(spikes, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer), expected * 2)


def test_profiler_sees_large_outputs():
    """torch.profiler's memory events report the huge-page outputs (allocation and
    free), so the model benchmark's CPU peak memory counts them: spikes, v and count."""
    x = large_input(4)
    expected = x.numel() * 4 + 2 * NEURONS * 4
    with torch.no_grad():
        peak = bench_models.PeakMemory(torch.device("cpu")).measure(lambda: fastspike.neuron(x, 0.9))
    assert expected <= peak["peak_bytes"] < expected + 1024  # plus the 4-byte threshold tensor


def test_switched_off_by_environment():
    """FASTSPIKE_HUGE_PAGES=0: plain PyTorch allocations, the same values, and
    backend_info() says so."""
    code = (
        "import torch, fastspike; from fastspike.reference import neuron_reference\n"
        f"x = torch.randn({TIME_STEPS}, {NEURONS}, generator=torch.Generator().manual_seed(5))\n"
        "r = fastspike.neuron(x, 0.9, signed=True)\n"
        "e = neuron_reference(x, 0.9, signed=True, grad='none')\n"
        "assert all(torch.equal(a, b) for a, b in zip(r, e))\n"
        "print(fastspike.backend_info()['cpu_huge_page_outputs'])\n"
    )
    env = dict(os.environ, FASTSPIKE_HUGE_PAGES="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "off (FASTSPIKE_HUGE_PAGES=0)"
