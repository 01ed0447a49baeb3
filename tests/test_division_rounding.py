"""Issue 16, item 1: the reference rounds its divisions (u = θ/m, the rate
gradient's time averages) the same way on every device, as the kernels do.

PyTorch's CUDA `div` of a tensor by a Python number multiplies by the
reciprocal 1/n rounded to the op's math type; the CPU divides (docs/design.md §4). A
reference dividing by Python numbers therefore passes every CPU test and fails
the bit-for-bit CUDA ones (u one ulp off for about a third of the thresholds
when m = 3). With no GPU here, `CudaScalarDivision` emulates that rule on the
CPU: run under it, the reference must still equal the CPU kernels bit for bit.
"""

import pytest
import torch

import fastspike
from fastspike.reference import exact_div, neuron_reference

from conftest import assert_same_result, cpu_and_cuda, needs_extension


class CudaScalarDivision:
    """Floating-point tensor / Python number computed as CUDA computes it,
    a · (1/n) with 1/n rounded to the op math type (float32, or float64 for
    float64) and the product rounded to a's dtype, for every `/`, div and
    true_divide inside ``with CudaScalarDivision() as mode:`` (patched on
    torch.Tensor, so that backward functions run by the autograd engine see it
    too, which they would not under a TorchFunctionMode). Counts the divisions
    it rewrote in ``mode.hits``."""

    TENSOR_METHODS = ("__truediv__", "__itruediv__", "div", "div_", "true_divide", "true_divide_")
    FUNCTIONS = ("div", "true_divide")

    def __init__(self):
        self.hits = 0
        self._patch = None

    def __enter__(self):
        self._patch = pytest.MonkeyPatch()
        for name in self.TENSOR_METHODS:
            self._patch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), name.endswith("_")))
        for name in self.FUNCTIONS:
            self._patch.setattr(torch, name, self._wrap(getattr(torch, name), False))
        return self

    def __exit__(self, *exc):
        self._patch.undo()

    def _wrap(self, original, in_place):
        def divide(a, b, *args, **kwargs):
            if (args or kwargs.get("rounding_mode") is not None or not isinstance(a, torch.Tensor)
                    or not a.is_floating_point() or isinstance(b, bool) or not isinstance(b, (int, float))):
                return original(a, b, *args, **kwargs)
            self.hits += 1
            opmath = torch.float64 if a.dtype == torch.float64 else torch.float32
            reciprocal = torch.scalar_tensor(1.0, dtype=opmath) / torch.scalar_tensor(b, dtype=opmath)
            result = (a.to(opmath) * reciprocal.to(a.device)).to(a.dtype)
            return a.copy_(result) if in_place else result
        return divide


def reciprocal_sensitive_thresholds(count: int, m: int = 3, seed: int = 0) -> torch.Tensor:
    """float32 thresholds in [0.3, 1.3) for which θ·(1/m) != θ/m."""
    theta = torch.rand(64 * count, generator=torch.Generator().manual_seed(seed)) + 0.3
    reciprocal = torch.ones(()) / m
    chosen = theta[theta * reciprocal != theta / m][:count]
    assert chosen.numel() == count
    return chosen


def test_the_emulated_rule_rounds_differently():
    # Otherwise the tests below could not fail.
    theta = torch.rand(3000, generator=torch.Generator().manual_seed(1)) + 0.3
    for dtype in (torch.float32, torch.float64):
        exact = theta.to(dtype) / 3
        with CudaScalarDivision() as mode:
            emulated = theta.to(dtype) / 3
        assert mode.hits == 1
        differs = (emulated != exact).float().mean().item()
        assert 0.1 < differs < 0.6, differs  # about a third


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_div_is_correctly_rounded(dtype):
    theta = reciprocal_sensitive_thresholds(200).to(dtype)
    for n in (3, 5, 7, 3.0):
        with CudaScalarDivision() as mode:
            got = exact_div(theta, n)
        assert mode.hits == 0
        if dtype == torch.float32:  # float64 division rounded to float32 is correctly rounded
            assert torch.equal(got, (theta.double() / n).float())
        else:  # Python's float division is IEEE's
            assert got.tolist() == [t / n for t in theta.tolist()]
    assert not torch.equal(theta * (torch.ones((), dtype=dtype) / 3), exact_div(theta, 3))


def thresholds(layout: str, shape, device) -> torch.Tensor:
    """Every threshold one whose reciprocal product differs from θ/3."""
    if layout == "scalar":
        return reciprocal_sensitive_thresholds(1).reshape(()).to(device)
    if layout == "channel":
        return reciprocal_sensitive_thresholds(shape[2], seed=1).to(device)
    return reciprocal_sensitive_thresholds(shape[1:].numel(), seed=2).reshape(shape[1:]).to(device)


@needs_extension()
@pytest.mark.parametrize("group_size,signed", [(3, False), (3, True), (6, True)])
@pytest.mark.parametrize("layout", ["scalar", "channel", "neuron"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_reference_equals_kernel_under_the_cuda_division_rule(group_size, signed, layout, dtype):
    shape = torch.Size((5, 2, 4, 9))
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.8).to(dtype)
    theta = thresholds(layout, shape, "cpu")
    kwargs = dict(group_size=group_size, signed=signed)
    with torch.no_grad():
        kernel = fastspike.neuron(x, theta, **kwargs)
    with CudaScalarDivision() as mode:
        reference = neuron_reference(x, theta, grad="none", **kwargs)
    assert mode.hits == 0, "the reference divides by a Python number"
    assert_same_result(kernel, reference)
    assert (kernel.spikes > 0).any()
    # the Python-side spike scale of the compact form rounds the same way
    counts = fastspike.neuron(x, theta, compact=True, grad="none", **kwargs).spikes
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    theta_b = theta.to(acc).reshape(theta.shape + (1,) * (1 if layout == "channel" else 0))
    assert torch.equal((counts.to(acc) * exact_div(theta_b, group_size)).to(dtype), kernel.spikes)


@needs_extension()
@pytest.mark.parametrize("time_steps", [3, 7])
def test_rate_gradient_time_average_under_the_cuda_division_rule(time_steps):
    # grad x_t = (1/T)·Σ_τ g_τ: the kernel divides the float32 sum by T. The
    # g_τ are multiples of 2^-10 below 4 in magnitude, so that every summation
    # order gives the same exact sum and only the division rounds.
    shape = (time_steps, 6, 50)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=gen) * 0.5 + 0.4
    weights = torch.randint(-2**12, 2**12, shape, generator=gen).float() / 2**10
    theta = reciprocal_sensitive_thresholds(50, seed=4)

    def gradient(fn):
        xg = x.clone().requires_grad_(True)
        (fn(xg, theta, grad="rate", group_size=3, signed=True).spikes * weights).sum().backward()
        return xg.grad

    kernel = gradient(fastspike.neuron)
    with CudaScalarDivision() as mode:
        reference = gradient(neuron_reference)
    assert mode.hits == 0, "the reference divides by a Python number"
    assert torch.equal(kernel, reference)
    assert (kernel != 0).any() and (kernel == 0).any()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_exact_div_agrees_across_devices(device):
    # On CUDA this is the case that matters: dividing by a device tensor is a division.
    theta = reciprocal_sensitive_thresholds(300)
    expected = (theta.double() / 3).float()
    assert torch.equal(exact_div(theta.to(device), 3).cpu(), expected)
    if device == "cuda":  # the rule exact_div avoids (docs/design.md §4), as this test's emulation has it
        emulated = theta * (torch.ones(()) / 3)
        assert torch.equal((theta.to(device) / 3).cpu(), emulated)
