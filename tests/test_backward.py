"""Gradients of both modes equal autograd through the reference loop; the
operators pass torch.library.opcheck and run under torch.compile."""

import pytest
import torch

import fastspike
from fastspike.reference import neuron_reference

from conftest import FLOAT_DTYPES, NEURON_KINDS, cpu_and_cuda, needs_extension

pytestmark = needs_extension()

TOLERANCE = {
    torch.float64: dict(rtol=1e-9, atol=1e-11),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=1e-2),
}


def grads(fn, x, v0, weights, weight_v, **kwargs):
    x = x.detach().requires_grad_(True)
    v0 = v0.detach().requires_grad_(True) if v0 is not None else None
    result = fn(x, kwargs.pop("threshold"), v_init=v0, **kwargs)
    loss = (result.spikes.double() * weights).sum() + (result.v.double() * weight_v).sum()
    loss.backward()
    return result, x.grad, None if v0 is None else v0.grad


@pytest.mark.parametrize("group_size,signed", NEURON_KINDS)
def test_sigmoid_surrogate_across_the_whole_exponent_range(group_size, signed):
    """The CPU backward's e^x is a polynomial on [-87, 88] and clamps outside:
    membranes from 1e-3 to 1e3 thresholds (sharp α = 10 takes the argument to
    ±10^4) must still give the reference's gradient, and a NaN input only NaN."""
    magnitudes = torch.logspace(-3, 3, 61)
    x = torch.cat([magnitudes, -magnitudes, torch.tensor([0.0, 0.5, 1.0])]).repeat(5, 1)
    x = x * torch.linspace(0.5, 1.5, 5)[:, None]
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kwargs = dict(threshold=0.9, group_size=group_size, signed=signed, grad="surrogate",
                  surrogate="sigmoid", alpha=10.0)
    expected = grads(neuron_reference, x, None, weights, torch.zeros(x.shape[1:], dtype=torch.float64), **dict(kwargs))
    actual = grads(fastspike.neuron, x, None, weights, torch.zeros(x.shape[1:], dtype=torch.float64), **dict(kwargs))
    assert torch.isfinite(actual[1]).all()
    torch.testing.assert_close(actual[1].double(), expected[1].double(), **TOLERANCE[torch.float32])
    x_nan = x.clone()
    x_nan[2, 7] = float("nan")
    grad_nan = grads(fastspike.neuron, x_nan, None, weights, torch.zeros(x.shape[1:], dtype=torch.float64),
                     **dict(kwargs))[1]
    assert grad_nan[:, 7].isnan().any()
    others = torch.ones(x.shape[1], dtype=torch.bool)
    others[7] = False
    torch.testing.assert_close(grad_nan[:, others].double(), expected[1][:, others].double(),
                               **TOLERANCE[torch.float32])


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigmoid_surrogate_tail_is_cut_to_zero(device, dtype):
    """Where |α·z| > 40 the sigmoid surrogate's derivative is exactly 0 in the
    kernels and the reference alike (SIGMOID_TAIL_CUT): no denormal gradients
    come out of neurons far from their thresholds, while just inside the cut
    the gradient is there and matches."""
    from fastspike.reference import SIGMOID_TAIL_CUT

    alpha, theta = 4.0, 1.0
    # One step, IF, v0 = θ/2: z = h − θ = x − 0.5 (units of u = θ).
    z = torch.tensor([-20.0, -10.5, -9.9, -1.0, 0.0, 2.0, 10.5, 20.0], dtype=dtype)
    x = (z + 0.5).view(1, -1).to(device)
    weights = torch.full(x.shape, 1e-3, dtype=torch.float64, device=device)
    kwargs = dict(threshold=theta, grad="surrogate", surrogate="sigmoid", alpha=alpha)
    zeros_v = torch.zeros(x.shape[1:], dtype=torch.float64, device=device)
    expected = grads(neuron_reference, x, None, weights, zeros_v, **dict(kwargs))[1]
    actual = grads(fastspike.neuron, x, None, weights, zeros_v, **dict(kwargs))[1]
    outside = (alpha * z).abs() > SIGMOID_TAIL_CUT
    assert outside.sum() == 4 and (~outside).sum() == 4
    assert torch.equal(actual[0, outside.to(device)], torch.zeros(4, dtype=dtype, device=device))
    assert torch.equal(expected[0, outside.to(device)], torch.zeros(4, dtype=dtype, device=device))
    assert (actual[0, (~outside).to(device)] > 0).all()
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])
    tiny = torch.finfo(dtype).tiny
    assert not ((actual != 0) & (actual.abs() < tiny)).any(), "denormal gradients"


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("group_size,signed", NEURON_KINDS)
@pytest.mark.parametrize("surrogate", ["sigmoid", "atan"])
def test_surrogate_gradient_matches_reference(device, dtype, group_size, signed, surrogate):
    gen = torch.Generator().manual_seed(3)
    shape = (6, 2, 3, 5)
    x = (torch.randn(shape, generator=gen) * 0.8).to(dtype).to(device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    v0 = (torch.rand(shape[1:], generator=gen) * 0.5).to(acc).to(device)
    weights = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
    weight_v = torch.randn(shape[1:], generator=gen, dtype=torch.float64).to(device)
    threshold = (torch.rand(3, generator=gen) + 0.5).to(device)
    kwargs = dict(threshold=threshold, group_size=group_size, signed=signed, grad="surrogate",
                  surrogate=surrogate)
    expected = grads(neuron_reference, x, v0, weights, weight_v, **dict(kwargs))
    actual = grads(fastspike.neuron, x, v0, weights, weight_v, **dict(kwargs))
    assert torch.equal(expected[0].spikes, actual[0].spikes)
    assert torch.allclose(actual[1].double(), expected[1].double(), **TOLERANCE[dtype])
    assert torch.allclose(actual[2].double(), expected[2].double(), **TOLERANCE[dtype])
    assert actual[1].abs().sum() > 0


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("group_size,signed", NEURON_KINDS)
def test_rate_gradient_matches_reference(device, dtype, group_size, signed):
    gen = torch.Generator().manual_seed(4)
    shape = (5, 4, 3, 2)
    x = (torch.randn(shape, generator=gen) * 0.8 + 0.3).to(dtype).to(device)
    weights = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
    threshold = (torch.rand(3, 2, generator=gen) + 0.5).to(device)
    kwargs = dict(threshold=threshold, group_size=group_size, signed=signed, grad="rate")
    expected = grads(neuron_reference, x, None, weights, 0.0, **dict(kwargs))
    actual = grads(fastspike.neuron, x, None, weights, 0.0, **dict(kwargs))
    assert torch.allclose(actual[1].double(), expected[1].double(), **TOLERANCE[dtype])
    # The formula itself: (1/T)·Σ_τ g_τ where 0 < x̄ < θ, the same for every t.
    mean = x.double().mean(0)
    passed = (mean > 0) & (mean < threshold.double())
    formula = torch.where(passed, weights.sum(0) / shape[0], torch.zeros_like(mean))
    assert torch.allclose(actual[1].double(), formula.expand(shape), **TOLERANCE[dtype])
    assert passed.any() and (~passed).any()


@pytest.mark.parametrize("group_size,signed", NEURON_KINDS)
def test_cuda_backward_bodies_on_cpu_grid(group_size, signed):
    x = torch.randn(7, 3, 37) * 0.8
    threshold = torch.rand(37) + 0.4
    fwd = torch.ops.fastspike.neuron_forward(
        x, threshold, None, None, group_size, signed, 0.5, 1e-3, "surrogate")
    grad_spikes = torch.randn_like(x)
    grad_v = torch.randn(3, 37)
    expected = torch.ops.fastspike.neuron_backward_surrogate(
        grad_spikes, grad_v, fwd[3], fwd[4], threshold, group_size, signed, 1e-3, "atan", 2.0)
    rate_fwd = torch.ops.fastspike.neuron_forward(
        x, threshold, None, None, group_size, signed, 0.5, 1e-3, "rate")
    expected_rate = torch.ops.fastspike.neuron_backward_rate(grad_spikes, rate_fwd[5], threshold)
    for blocks, threads in [(1, 1), (3, 7), (2, 64)]:
        emulated = torch.ops.fastspike._emulate_cuda_backward_surrogate(
            grad_spikes, grad_v, fwd[3], fwd[4], threshold, group_size, signed, 1e-3, "atan", 2.0,
            blocks, threads)
        assert all(torch.equal(e, a) for e, a in zip(expected, emulated))
        emulated_rate = torch.ops.fastspike._emulate_cuda_backward_rate(
            grad_spikes, rate_fwd[5], threshold, blocks, threads)
        assert torch.equal(expected_rate, emulated_rate)


def test_backward_without_recorded_trace_is_refused():
    x = torch.randn(3, 4, requires_grad=True)
    spikes = torch.ops.fastspike.neuron(x, torch.tensor(1.0), None, None, 1, False, 0.5, 1e-3, "none", "sigmoid", 4.0)[0]
    with pytest.raises(RuntimeError, match="grad='none'"):
        spikes.sum().backward()


def test_the_kernel_operator_has_no_derivative_of_its_own():
    """neuron_forward's schema carries no surrogate, so it cannot differentiate: a call that would
    need a backward fails at once instead of leaving outputs that silently carry no gradient."""
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="has no derivative of its own.*fastspike::neuron"):
        torch.ops.fastspike.neuron_forward(x, torch.tensor(1.0), None, None, 1, False, 0.5, 1e-3, "surrogate")
    with torch.no_grad():  # the forward itself still runs (and records) for any input
        assert torch.ops.fastspike.neuron_forward(x, torch.tensor(1.0), None, None, 1, False, 0.5, 1e-3,
                                                  "surrogate")[3].shape == x.shape


@pytest.mark.parametrize("surrogate,alpha", [("sigmoid", 4.0), ("atan", 1.5)])
@pytest.mark.parametrize("grad", ["surrogate", "rate"])
def test_differentiable_operator_keeps_the_surrogate_in_its_context(grad, surrogate, alpha):
    """fastspike::neuron called directly differentiates as the reference with that surrogate."""
    from fastspike.reference import neuron_reference

    x = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(2)) * 0.8
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    spikes, v, count = torch.ops.fastspike.neuron(xs, torch.tensor(0.9), None, None, 2, True, 0.5, 1e-3, grad,
                                                  surrogate, alpha)
    ref = neuron_reference(xr, torch.tensor(0.9), group_size=2, signed=True, grad=grad, surrogate=surrogate,
                           alpha=alpha)
    assert torch.equal(spikes, ref.spikes) and torch.equal(count, ref.count)
    spikes.pow(2).sum().backward()
    ref.spikes.pow(2).sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad)


def opcheck_cases():
    x = torch.randn(4, 2, 3, 5) * 0.8
    thr = torch.rand(3) + 0.5
    v0 = torch.rand(2, 3, 5)
    c0 = torch.randint(0, 2, (2, 3, 5), dtype=torch.int32)
    cases = []
    for grad_mode in ("none", "surrogate", "rate"):
        for signed in (False, True):
            cases.append(("neuron_forward", (x, thr, v0, c0, 2, signed, 0.5, 1e-3, grad_mode)))
    fwd = torch.ops.fastspike.neuron_forward(x, thr, None, None, 2, True, 0.5, 1e-3, "surrogate")
    rate = torch.ops.fastspike.neuron_forward(x, thr, None, None, 2, True, 0.5, 1e-3, "rate")
    cases.append(("neuron_backward_surrogate", (torch.randn_like(x), torch.randn(2, 3, 5), fwd[3], fwd[4], thr, 2, True, 1e-3, "atan", 2.0)))
    cases.append(("neuron_backward_rate", (torch.randn_like(x), rate[5], thr)))
    state = (torch.empty(2, 3, 5), torch.empty(2, 3, 5, dtype=torch.int32))
    def out(spikes_dtype=x.dtype):
        return dict(spikes=torch.empty_like(x, dtype=spikes_dtype), v_final=torch.empty(2, 3, 5),
                    count_final=torch.empty(2, 3, 5, dtype=torch.int32))
    cases.append(("neuron_forward.out", (x, thr, None, None, 1, True, 0.5, 1e-3), out()))
    cases.append(("neuron_forward.out", (x, thr, v0.clone(), c0.clone(), 2, True, 0.5, 1e-3), out()))
    cases.append(("neuron_forward.out", (x, thr, None, None, 3, True, 0.5, 1e-3, torch.randn_like(x), True),
                  out(torch.int8)))
    return [case if len(case) == 3 else case + ({},) for case in cases]


@pytest.mark.parametrize("name,args,kwargs", opcheck_cases(), ids=lambda c: c if isinstance(c, str) else "")
def test_opcheck(name, args, kwargs):
    op, _, overload = name.partition(".")
    torch.library.opcheck(getattr(getattr(torch.ops.fastspike, op), overload or "default"), args, kwargs)


@pytest.mark.parametrize("grad", ["surrogate", "rate"])
def test_torch_compile_fullgraph_forward_and_backward(grad):
    torch._dynamo.reset()

    def layer(x, threshold):
        spikes = fastspike.neuron(x * 1.5, threshold, signed=True, group_size=2, grad=grad).spikes
        return spikes * spikes.new_tensor(0.5)  # elementwise: exact in both

    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    threshold = torch.rand(3) + 0.5
    x = torch.randn(5, 2, 3, 4)
    x_eager, x_comp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_eager, out_comp = layer(x_eager, threshold), compiled(x_comp, threshold)
    assert torch.equal(out_eager, out_comp)
    out_eager.pow(2).sum().backward()
    out_comp.pow(2).sum().backward()
    assert torch.allclose(x_eager.grad, x_comp.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the inference path (grad_mode none) compiles too
        assert torch.equal(compiled(x, threshold), layer(x, threshold))
