"""Regression tests of the adversarial pass over the operator API (issue 19):
double backward, torch.compile with dynamic shapes, the rate mode's final
membrane, argument errors of the nn modules, TorchScript and jit.trace,
recording from several threads."""

import threading

import pytest
import torch

import fastspike
import fastspike.models
from fastspike.nn import SpikingNeuron, record_spike_trains
from fastspike.reference import neuron_reference

from conftest import needs_extension


def _x(seed=0, shape=(5, 2, 3, 4)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.8


# ---------------------------------------------------------------------------
# 2. double backward: an error that says so (surrogate), the true value (rate)


@needs_extension()
def test_surrogate_double_backward_raises_instead_of_returning_zero():
    x = _x().requires_grad_()
    spikes = fastspike.neuron(x, 0.7, signed=True).spikes
    (g,) = torch.autograd.grad((spikes * spikes).sum(), x, create_graph=True)
    # The first derivative under create_graph=True is the usual one.
    x2 = x.detach().requires_grad_()
    s2 = fastspike.neuron(x2, 0.7, signed=True).spikes
    (g2,) = torch.autograd.grad((s2 * s2).sum(), x2)
    assert torch.equal(g.detach(), g2)
    with pytest.raises(RuntimeError, match=r"no second derivative.*double backward.*not supported.*"
                                           r"fastspike.use_reference\(\)"):
        g.pow(2).sum().backward()


def test_surrogate_double_backward_of_the_reference_is_not_zero():
    """What use_reference() (the error's advice) gives: the surrogate differentiated twice."""
    x = torch.tensor([[0.3], [0.45], [0.2]], dtype=torch.float64, requires_grad=True)
    with fastspike.use_reference():
        spikes = fastspike.neuron(x, 1.0).spikes
    (g,) = torch.autograd.grad(spikes.sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    assert gg.abs().sum() > 0


@pytest.mark.parametrize("signed", [False, True])
def test_rate_double_backward_equals_the_reference(signed):
    """grad x = M·g with M symmetric: its derivative in g (the gradient of a
    gradient penalty with respect to what comes after the neuron) is M again."""
    x = _x(1)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    results = []
    for fn in (fastspike.neuron, neuron_reference):
        xr = x.clone().requires_grad_()
        w = weights.clone().requires_grad_()
        spikes = fn(xr, 0.9, signed=signed, grad="rate").spikes
        (g,) = torch.autograd.grad((spikes * w).sum(), xr, create_graph=True)
        (gw,) = torch.autograd.grad((g * g).sum(), w)
        results.append((g.detach(), gw))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    assert results[0][1].abs().sum() > 0


# ---------------------------------------------------------------------------
# 3. torch.compile(dynamic=True, fullgraph=True)


@pytest.mark.parametrize("reference", [False, True])
def test_compile_with_dynamic_shapes_and_numbers(reference):
    torch._dynamo.reset()

    def layer(x, threshold, margin, fraction):
        return fastspike.neuron(x, threshold, neg_margin=margin, init_fraction=fraction, signed=True,
                                group_size=2).spikes

    compiled = torch.compile(layer, dynamic=True, fullgraph=True)
    with fastspike.use_reference() if reference else torch.no_grad():
        for seed, shape, args in [(0, (4, 3, 5), (1.0, 1e-3, 0.5)), (1, (6, 2, 7), (0.7, 2e-3, 0.25)),
                                  (2, (3, 5, 2, 2), (0.9, 0.0, 0.0))]:
            x = _x(seed, shape)
            assert torch.equal(compiled(x, *args), layer(x, *args))


def test_compile_dynamic_module_forward_and_backward():
    torch._dynamo.reset()
    layer = SpikingNeuron(torch.rand(4, generator=torch.Generator().manual_seed(3)) + 0.5, 3, signed=True)
    compiled = torch.compile(layer, dynamic=True, fullgraph=True)
    for rows in (6, 9):
        x = torch.randn(rows, 4, 5, generator=torch.Generator().manual_seed(rows))
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = layer(xe), compiled(xc)
        assert torch.equal(ye, yc)
        ye.pow(2).sum().backward()
        yc.pow(2).sum().backward()
        torch.testing.assert_close(xe.grad, xc.grad)


# ---------------------------------------------------------------------------
# 6. grad="rate": the final membrane has no gradient on every backend


def test_rate_final_membrane_does_not_require_grad_on_any_backend():
    x = _x(4)
    outputs = []
    for ctx in (torch.enable_grad, fastspike.use_reference):
        with ctx():
            xr = x.clone().requires_grad_()
            result = fastspike.neuron(xr, 0.8, signed=True, grad="rate")
        assert result.spikes.requires_grad
        assert not result.v.requires_grad and not result.count.requires_grad
        outputs.append(result)
    assert torch.equal(outputs[0].v, outputs[1].v)
    # The surrogate mode keeps its (defined) gradient of v.
    assert fastspike.neuron(x.clone().requires_grad_(), 0.8).v.requires_grad


# ---------------------------------------------------------------------------
# 7. the nn modules name their bad arguments, with TypeError / ValueError

BAD_MODULES = [
    (dict(threshold=1e300), ValueError, r"threshold must be finite and > 0 .*at most 3.40282e\+38"),
    (dict(threshold=-1.0), ValueError, r"threshold must be finite and > 0"),
    (dict(threshold=torch.tensor([1.0, float("nan")])), ValueError, r"threshold must be finite and > 0 everywhere"),
    (dict(threshold=torch.tensor([1.0, 1e300], dtype=torch.float64)), ValueError,
     r"threshold must be finite and > 0 everywhere .*got inf"),
    (dict(threshold="1"), TypeError, r"threshold must be a number or a tensor"),
    (dict(threshold=torch.ones(2, dtype=torch.int32)), TypeError, r"threshold must be a number or a floating"),
    (dict(time_steps=0), ValueError, r"time_steps must be an integer >= 1"),
    (dict(time_steps=2.5), TypeError, r"time_steps must be an integer >= 1 \(T\), got float 2.5"),
    (dict(group_size=2_000_000), ValueError, r"group_size must be an integer in \[1, 2\^20\]"),
    (dict(group_size="2"), TypeError, r"group_size must be an integer"),
    (dict(signed="yes"), TypeError, r"signed must be True or False"),
    (dict(layout="time"), ValueError, r"layout must be 'merged' or 'sequence', got 'time'"),
    (dict(init_fraction="0.5"), TypeError, r"init_fraction .* a real number; got str '0.5'"),
    (dict(init_fraction=float("inf")), ValueError, r"init_fraction .* must be finite"),
    (dict(neg_margin=-1.0), ValueError, r"neg_margin must be a finite number >= 0"),
    (dict(grad="bptt"), ValueError, r"grad must be 'none', 'surrogate' or 'rate'"),
    (dict(surrogate=None), TypeError, r"surrogate must be one of 'sigmoid', 'atan'"),
    (dict(alpha=-2.0), ValueError, r"alpha \(surrogate sharpness\) must be a finite number > 0"),
    (dict(compact=1), TypeError, r"compact must be True or False"),
    (dict(compact=True, group_size=200), ValueError, r"group_size must be <= 127"),
    (dict(record="no"), TypeError, r"record must be True or False"),
]


@pytest.mark.parametrize("kwargs,error,pattern", BAD_MODULES, ids=[str(c[0])[:40] for c in BAD_MODULES])
def test_module_arguments_are_checked_at_construction(kwargs, error, pattern):
    kwargs = dict(kwargs)
    threshold = kwargs.pop("threshold", 1.0)
    time_steps = kwargs.pop("time_steps", 2)
    with pytest.raises(Exception) as info:
        SpikingNeuron(threshold, time_steps, **kwargs)
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert info.match(pattern)


def test_module_forward_checks_its_input():
    layer = SpikingNeuron(1.0, 2)
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor .*got list"):
        layer([[1.0]])
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor .*got torch.int64"):
        layer(torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"not a multiple of time_steps=2"):
        layer(torch.ones(3, 3))
    with pytest.raises(TypeError, match=r"state must be a NeuronState"):
        layer.step(torch.ones(4, 3), state=0.5)


# ---------------------------------------------------------------------------
# 8. TorchScript and jit.trace (export stays tested in test_convert / test_fusion)


def _small_snn(neuron="signed"):
    from fastspike.models import get_model

    torch.manual_seed(0)
    net = get_model("digits_cnn", 10, in_channels=1)
    qnet = fastspike.quantize(net, levels=4, example_input=torch.randn(2, 1, 8, 8))
    return fastspike.to_snn(qnet, 4, neuron).eval()


@needs_extension()
@pytest.mark.parametrize("kwargs", [dict(), dict(group_size=3, signed=True), dict(layout="sequence"),
                                    dict(compact=True), dict(constant_input=True),
                                    dict(signed=True, surrogate="atan", alpha=1.5)])
def test_spiking_neuron_scripts(kwargs):
    """A scripted layer computes and differentiates as the eager one, with its own surrogate
    shape: TorchScript calls the differentiable operator fastspike::neuron, whose autograd
    context keeps surrogate/alpha (the kernel neuron_forward no longer takes them)."""
    threshold = torch.rand(3, generator=torch.Generator().manual_seed(5)) + 0.5
    layer = SpikingNeuron(threshold, 4, **kwargs)
    scripted = torch.jit.script(layer)
    shape = {"constant_input": (2, 3, 5), "layout": (4, 2, 3, 5)}
    x = _x(6, next((shape[k] for k in kwargs if k in shape), (8, 3, 5)))
    with torch.no_grad():
        assert torch.equal(scripted(x), layer(x))
    if not kwargs.get("compact"):
        xe, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
        layer(xe).pow(2).sum().backward()
        scripted(xs).pow(2).sum().backward()
        torch.testing.assert_close(xe.grad, xs.grad)


@needs_extension()
def test_converted_network_traces_and_passes_the_trace_check():
    snn = _small_snn()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    traced = torch.jit.trace(snn, (x,))  # check_trace=True: re-run under no_grad and compared
    other = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(traced(x), snn(x))


@needs_extension()
@pytest.mark.parametrize("once", [True, False])
def test_converted_network_scripts(once):
    torch.manual_seed(0)
    net = fastspike.models.get_model("digits_cnn", 10, in_channels=1)
    qnet = fastspike.quantize(net, levels=4, example_input=torch.randn(2, 1, 8, 8))
    snn = fastspike.to_snn(qnet, 4, "signed", constant_input_once=once).eval()
    scripted = torch.jit.script(snn)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        assert torch.equal(scripted(x), snn(x))


def test_converted_network_exports():
    snn = _small_snn()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    exported = torch.export.export(snn, (x,))
    with torch.no_grad():
        assert torch.equal(exported.module()(x), snn(x))


# ---------------------------------------------------------------------------
# 9. record_spike_trains records per call, whatever other threads do


def test_record_spike_trains_is_per_call_across_threads():
    """Thread A is held inside its forward while thread B records a whole call
    on the same model: A must still get its own trains, and B its own."""
    torch.manual_seed(0)
    first = SpikingNeuron(1.0, 2, signed=True)
    second = SpikingNeuron(0.5, 2)
    hold, released = threading.Event(), threading.Event()

    class Gate(torch.nn.Module):
        def forward(self, x):
            if threading.current_thread().name == "A":
                hold.set()
                assert released.wait(30)
            return x

    model = torch.nn.Sequential(first, Gate(), second)
    xa, xb = torch.rand(4, 3) * 2, torch.rand(4, 3) * 2 - 1
    expected = {name: record_spike_trains(model, x)[1] for name, x in (("A", xa), ("B", xb))}
    got = {}

    def run_a():
        got["A"] = record_spike_trains(model, xa)[1]

    thread = threading.Thread(target=run_a, name="A")
    thread.start()
    assert hold.wait(30)
    got["B"] = record_spike_trains(model, xb)[1]
    released.set()
    thread.join(30)
    for name in ("A", "B"):
        assert got[name].keys() == expected[name].keys() == {"0", "2"}
        for layer in ("0", "2"):
            assert torch.equal(got[name][layer], expected[name][layer])
    assert first.recorded is None and not first.record  # the modules' own state is untouched
