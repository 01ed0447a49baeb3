"""Issue 6, items 1-3: the fused residual add, compact int8 spikes and the
constant input computed once, from the operator up to whole converted
networks. Every new path is checked against the reference loop (bit for bit in
the forward) or against the conversion without the option."""

import contextlib
import copy
import io
import math
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fastspike
from fastspike.convert import RepeatOverTime, fold_spike_scales
from fastspike.models import get_model
from fastspike.nn import SpikingNeuron, record_spike_trains
from fastspike.reference import exact_div, neuron_reference

from conftest import FLOAT_DTYPES, NEURON_KINDS, assert_same_result, cpu_and_cuda, needs_extension

pytestmark = needs_extension()

SHAPE = (6, 3, 5, 7, 3)  # 315 neurons per step: not a multiple of the CPU block or the vector width
GRAD_TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def randn(shape, seed, scale=0.7, dtype=torch.float32, device="cpu"):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype).to(device)


def broadcast(step: torch.Tensor, time_steps: int) -> torch.Tensor:
    return step.unsqueeze(0).expand((time_steps,) + tuple(step.shape))


# ---------------------------------------------------------------------------
# The operator


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("group_size,signed", NEURON_KINDS)
def test_residual_charges_with_the_rounded_sum(device, dtype, group_size, signed):
    x, r = randn(SHAPE, 0, dtype=dtype, device=device), randn(SHAPE, 1, dtype=dtype, device=device)
    threshold = (torch.rand(SHAPE[2], generator=torch.Generator().manual_seed(2)) + 0.3).to(device)
    kwargs = dict(group_size=group_size, signed=signed)
    expected = neuron_reference(x + r, threshold, grad="none", **kwargs)  # torch's add, then the neuron
    assert_same_result(expected, neuron_reference(x, threshold, grad="none", residual=r, **kwargs))
    with torch.no_grad():
        assert_same_result(expected, fastspike.neuron(x, threshold, residual=r, **kwargs))
        # any strides: a transposed residual is read as it is laid out
        r_t = r.transpose(1, 3).contiguous().transpose(1, 3)
        assert not r_t.is_contiguous()
        assert_same_result(expected, fastspike.neuron(x, threshold, residual=r_t, **kwargs))
    assert (expected.spikes != 0).any()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("group_size,signed", NEURON_KINDS + [(127, True)])
def test_compact_spikes_are_the_signed_counts(device, dtype, group_size, signed):
    x = randn(SHAPE, 3, scale=2.0 if group_size < 100 else 60.0, dtype=dtype, device=device)
    threshold = torch.tensor(0.9, device=device)
    full = fastspike.neuron(x, threshold, group_size=group_size, signed=signed)
    compact = fastspike.neuron(x, threshold, group_size=group_size, signed=signed, compact=True)
    assert compact.spikes.dtype == torch.int8 and compact.spikes.shape == x.shape
    assert_same_result(neuron_reference(x, threshold, group_size=group_size, signed=signed, grad="none",
                                        compact=True), compact)
    assert torch.equal(compact.v, full.v) and torch.equal(compact.count, full.count)
    unit = exact_div(threshold.to(torch.float64 if dtype == torch.float64 else torch.float32), group_size)
    assert torch.equal((compact.spikes.to(unit.dtype) * unit).to(dtype), full.spikes)
    if signed:
        assert (compact.spikes < 0).any()
    if group_size == 127 and dtype != torch.bfloat16:
        assert compact.spikes.abs().max() >= 100  # int8 range actually used


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("group_size,signed", NEURON_KINDS)
def test_time_broadcast_input_is_read_without_copies(device, dtype, group_size, signed):
    step, r = randn(SHAPE[1:], 4, dtype=dtype, device=device), randn(SHAPE, 5, dtype=dtype, device=device)
    x = broadcast(step, SHAPE[0])
    assert x.stride(0) == 0
    kwargs = dict(group_size=group_size, signed=signed)
    expected = neuron_reference(x.contiguous(), 0.8, grad="none", **kwargs)
    with torch.no_grad():
        assert_same_result(expected, fastspike.neuron(x, 0.8, **kwargs))
        # either operand of the fused add may be the broadcast one, or both
        assert_same_result(neuron_reference(x.contiguous() + r, 0.8, grad="none", **kwargs),
                           fastspike.neuron(r, 0.8, residual=x, **kwargs))
        both = neuron_reference(x.contiguous() + x.contiguous(), 0.8, grad="none", compact=True, **kwargs)
        assert_same_result(both, fastspike.neuron(x, 0.8, residual=x, compact=True, **kwargs))
    # a step that is itself strided is made contiguous once, not T times
    odd = broadcast(randn(SHAPE[1:], 6, dtype=dtype, device=device).transpose(1, 2), SHAPE[0])
    with torch.no_grad():
        assert_same_result(neuron_reference(odd.contiguous(), 0.8, grad="none", **kwargs),
                           fastspike.neuron(odd, 0.8, **kwargs))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("grad", ["surrogate", "rate"])
@pytest.mark.parametrize("group_size,signed", NEURON_KINDS)
def test_gradients_of_residual_and_broadcast_operands(device, grad, group_size, signed):
    step0, r0 = randn(SHAPE[1:], 7, device=device), randn(SHAPE, 8, device=device)
    weights = randn(SHAPE, 9, device=device)

    def run(fn):
        step, r = step0.clone().requires_grad_(True), r0.clone().requires_grad_(True)
        spikes = fn(broadcast(step, SHAPE[0]), 0.8, residual=r, grad=grad, group_size=group_size,
                    signed=signed).spikes
        (spikes * weights).sum().backward()
        return spikes.detach(), step.grad, r.grad

    spikes, step_grad, r_grad = run(fastspike.neuron)
    ref_spikes, ref_step_grad, ref_r_grad = run(neuron_reference)
    assert torch.equal(spikes, ref_spikes)
    torch.testing.assert_close(r_grad, ref_r_grad, **GRAD_TOLERANCE)
    torch.testing.assert_close(step_grad, ref_step_grad, **GRAD_TOLERANCE)
    # the same gradient reaches both operands; the broadcast one sums it over T
    torch.testing.assert_close(step_grad, r_grad.sum(0), **GRAD_TOLERANCE)
    assert r_grad.abs().sum() > 0


@pytest.mark.parametrize("group_size,signed", NEURON_KINDS)
@pytest.mark.parametrize("blocks,threads", [(1, 1), (3, 7), (64, 256)])
def test_cuda_kernel_bodies_on_cpu_grid_with_the_new_inputs(group_size, signed, blocks, threads):
    for neurons in (4 * 37, 37):  # the vector path, and not
        x = randn((5, neurons), neurons)
        step, r = randn((neurons,), 10), randn((5, neurons), 11)
        threshold = torch.rand(neurons, generator=torch.Generator().manual_seed(12)) + 0.4
        for x_in, r_in, compact in ((x, r, False), (broadcast(step, 5), r, True), (x, broadcast(step, 5), False)):
            expected = fastspike.neuron(x_in, threshold, group_size=group_size, signed=signed,
                                        residual=r_in, compact=compact)
            for width in (0, 1):
                emulated = torch.ops.fastspike._emulate_cuda_forward(
                    x_in, threshold, None, None, group_size, signed, 0.5, 1e-3, "none", blocks, threads,
                    width, r_in, compact)
                assert_same_result(expected, emulated[:3])


def opcheck_cases():
    # Few cases: opcheck's AOT tests of a differentiable call take seconds each.
    x, r = randn((4, 2, 3, 5), 13), randn((4, 2, 3, 5), 14)
    thr = torch.rand(3, generator=torch.Generator().manual_seed(15)) + 0.5
    return [  # the differentiable operator (fastspike::neuron), then the kernel
        (broadcast(x[0].clone().requires_grad_(True), 4), thr, None, None, 2, True, 0.5, 1e-3, "surrogate",
         "sigmoid", 4.0, r.clone().requires_grad_(True)),
        (broadcast(x[0], 4), thr, None, None, 1, True, 0.5, 1e-3, "none", r, True),
    ]


@pytest.mark.parametrize("args", opcheck_cases())
def test_opcheck_with_residual_compact_and_broadcast(args):
    # The AOT-dispatch check of a differentiable call alone takes ~15 s here;
    # test_torch_compile_fullgraph_with_the_new_inputs traces that path instead.
    differentiable = args[0].requires_grad
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") if differentiable else None
    kwargs = {"test_utils": utils} if utils else {}
    op = torch.ops.fastspike.neuron if differentiable else torch.ops.fastspike.neuron_forward
    torch.library.opcheck(op.default, args, **kwargs)


def test_torch_compile_fullgraph_with_the_new_inputs():
    torch._dynamo.reset()

    def layer(step, r, threshold):
        x = step.unsqueeze(0).expand((4,) + tuple(step.shape))
        return fastspike.neuron(x, threshold, residual=r, signed=True, group_size=2).spikes * 0.5

    def counts(step, r, threshold):
        x = step.unsqueeze(0).expand((4,) + tuple(step.shape))
        return fastspike.neuron(x, threshold, residual=r, compact=True).spikes

    threshold = torch.rand(3) + 0.5
    step, r = randn((2, 3, 4), 16), randn((4, 2, 3, 4), 17)
    # aot_eager traces what inductor traces (fake kernels, autograd) at a
    # fraction of the time; test_backward covers inductor on the plain op.
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    s_eager, s_comp = step.clone().requires_grad_(True), step.clone().requires_grad_(True)
    out_eager, out_comp = layer(s_eager, r, threshold), compiled(s_comp, r, threshold)
    assert torch.equal(out_eager, out_comp)
    out_eager.pow(2).sum().backward()
    out_comp.pow(2).sum().backward()
    torch.testing.assert_close(s_eager.grad, s_comp.grad, **GRAD_TOLERANCE)
    with torch.no_grad():
        assert torch.equal(torch.compile(counts, fullgraph=True)(step, r, threshold), counts(step, r, threshold))


X = torch.randn(4, 2, 3, 5)
# (what is wrong, keyword arguments, exception, pattern)
BAD_CALLS = [
    ("residual shape", dict(residual=torch.randn(4, 2, 3, 1)), ValueError, r"residual must have x_seq's shape \[4, 2, 3, 5\]"),
    ("residual dtype", dict(residual=X.double()), TypeError, r"residual must have x_seq's dtype torch.float32"),
    ("residual device", dict(residual=torch.randn(4, 2, 3, 5, device="meta")), ValueError,
     r"residual must be on the same device as x_seq"),
    ("residual type", dict(residual=1.0), TypeError, r"residual must be a tensor or None"),
    ("compact group size", dict(compact=True, group_size=128), ValueError, r"group_size must be <= 127, got 128"),
    ("compact out dtype", dict(compact=True, out=torch.empty_like(X)), TypeError,
     r"spikes \(the out= tensor\) of compact=True must have dtype torch.int8, got torch.float32"),
    ("compact out shape", dict(compact=True, out=torch.empty(4, 2, 3, dtype=torch.int8)), ValueError,
     r"spikes \(the out= tensor\) of compact=True must have x_seq's shape \[4, 2, 3, 5\]"),
    ("broadcast out", dict(out=broadcast(X[0], 4)), ValueError, r"spikes \(the out= tensor\) must be contiguous"),
]


@pytest.mark.parametrize("what,kwargs,error,pattern", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_new_arguments_are_named(what, kwargs, error, pattern):
    with torch.no_grad(), pytest.raises(error, match=pattern):
        fastspike.neuron(X, 1.0, **kwargs)


def test_out_state_may_not_overlap_the_residual():
    residual = X.clone()
    out = (torch.empty_like(X), residual[1], torch.empty(2, 3, 5, dtype=torch.int32))
    with torch.no_grad(), pytest.raises(ValueError, match=r"v \(the out= state\) overlaps residual in memory"):
        fastspike.neuron(X, 1.0, residual=residual, out=out)


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("backend", ["operator", "reference"])
def test_out_form_takes_residual_and_compact(compact, backend):
    """neuron_forward.out takes residual= and compact= as the functional form does: the same
    spikes and state, written into the caller's buffers (spikes may be the residual itself)."""
    r = randn((4, 2, 3, 5), 31)
    expected = fastspike.neuron(X, 0.7, group_size=3, signed=True, residual=r, compact=compact)
    spikes = torch.empty_like(X, dtype=torch.int8) if compact else r.clone()
    residual = r if compact else spikes  # the float form writes its spikes over its residual
    state = (torch.empty(2, 3, 5), torch.empty(2, 3, 5, dtype=torch.int32))
    with (fastspike.use_reference() if backend == "reference" else contextlib.nullcontext()):
        got = fastspike.neuron(X, 0.7, group_size=3, signed=True, residual=residual, compact=compact,
                               out=(spikes, *state))
    assert got.spikes is spikes and got.v is state[0] and got.count is state[1]
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_compact_refuses_gradients():
    with pytest.raises(ValueError, match=r"compact spikes \(int8 counts\) are for inference"):
        fastspike.neuron(X.clone().requires_grad_(True), 1.0, compact=True)


@pytest.mark.parametrize("case,pattern", [
    (dict(residual=torch.randn(4, 2, 3)), r"residual must have x_seq's shape \[4, 2, 3, 5\]"),
    (dict(residual=X.half()), r"residual must have x_seq's dtype Float"),
    (dict(residual=torch.randn(4, 2, 3, 5, device="meta")), r"residual must be on the same device as x_seq"),
    (dict(compact=True, group_size=200), r"group_size must be <= 127, got 200"),
    (dict(compact=True, grad_mode="surrogate"), r"grad_mode must be 'none', got 'surrogate'"),
])
def test_raw_operator_rejects_bad_new_arguments(case, pattern):
    args = dict(residual=None, compact=False, group_size=1, grad_mode="none")
    args.update(case)
    # A meta tensor routes the call to the fake kernel, which raises in Python.
    with pytest.raises((RuntimeError, ValueError, TypeError), match=pattern):
        torch.ops.fastspike.neuron_forward(X, torch.tensor(1.0), None, None, args["group_size"], False, 0.5, 1e-3,
                                           args["grad_mode"], args["residual"], args["compact"])


# ---------------------------------------------------------------------------
# The layer: residual, constant input, recording


def test_layer_residual_constant_input_and_recording():
    step, r = randn((2, 3, 4, 4), 18), randn((8, 3, 4, 4), 19)
    threshold = torch.tensor([0.5, 0.8, 1.1])
    plain = SpikingNeuron(threshold, 4, signed=True, group_size=2)
    expected = plain(step.repeat(4, 1, 1, 1) + r)
    layer = SpikingNeuron(threshold, 4, signed=True, group_size=2, constant_input=True, record=True)
    assert torch.equal(layer(step, r), expected)
    assert layer.recorded.dtype == torch.int8 and layer.recorded.shape == (4, 2, 3, 4, 4)
    scale = layer.spike_scale().view(3, 1, 1)
    assert torch.equal((layer.recorded.float() * scale).reshape(8, 3, 4, 4), expected)
    # a residual that broadcasts is added as the unfused graph did
    bias = r.mean((2, 3), keepdim=True)
    assert torch.equal(layer(step, bias), plain(step.repeat(4, 1, 1, 1) + bias))
    with pytest.raises(ValueError, match="constant_input/constant_residual need time_steps"):
        SpikingNeuron(1.0, None, layout="sequence", constant_input=True)


# ---------------------------------------------------------------------------
# The converter


def calibrated(name, kwargs, shape, preset="qcfs", levels=4):
    torch.manual_seed(0)
    net = get_model(name, **kwargs).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(shape, generator=gen) for _ in range(2)]
    qnet = fastspike.quantize(net, levels=levels, preset=preset, example_input=batches[0])
    fastspike.calibrate(qnet, batches[:1])
    return qnet.eval(), batches[1]


def quantized(module_class, x):
    torch.manual_seed(0)
    qnet = fastspike.quantize(module_class().eval(), levels=4)
    fastspike.calibrate(qnet, [x])
    return qnet


def first(y):
    return y if isinstance(y, torch.Tensor) else y[0]


def neuron_nodes(snet):
    return [n for n in snet.graph.nodes if n.op == "call_module" and isinstance(snet.get_submodule(n.target), SpikingNeuron)]


def repeats(snet):
    return sum(n.op == "call_module" and n.target == "repeat_over_time" for n in snet.graph.nodes)


def repeated_values(snet):
    """The names of the nodes a RepeatOverTime call takes, in graph order."""
    return [n.args[0].name for n in snet.graph.nodes
            if n.op == "call_module" and isinstance(snet.get_submodule(n.target), RepeatOverTime)]


OFF = dict(fuse_residual=False, constant_input_once=False, compact_spikes=False)

RESNETS = [  # name, kwargs, input shape, residual joins
    ("cifar_resnet18", dict(base_width=4), (2, 3, 8, 8), 8),
    ("cifar_resnet20", dict(base_width=4), (2, 3, 16, 16), 9),
    ("resnet18", {}, (1, 3, 16, 16), 8),  # torchvision: out += identity; relu(out)
]


@pytest.mark.parametrize("name,kwargs,shape,joins", RESNETS, ids=[r[0] for r in RESNETS])
@torch.no_grad()
def test_fused_residual_joins_give_identical_outputs(name, kwargs, shape, joins):
    qnet, x = calibrated(name, kwargs, shape)
    unfused = fastspike.to_snn(qnet, 2, "signed", **OFF)
    fused = fastspike.to_snn(qnet, 2, "signed", **dict(OFF, fuse_residual=True))
    assert sum(len(n.args) == 2 for n in neuron_nodes(fused)) == joins
    adds = {operator.add, operator.iadd, torch.add}
    assert not any(n.op == "call_function" and n.target in adds for n in fused.graph.nodes)
    assert torch.equal(fused(x), unfused(x))


class Joins(nn.Module):
    """Residual joins spelt every way, one whose sum is used twice, and one that broadcasts."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.r1, self.r2, self.r3, self.r4, self.r5 = (nn.ReLU() for _ in range(5))

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        y1 = self.r1(torch.add(a, b))
        y2 = self.r2(y1.add(a))
        s = y2 + b
        y3 = self.r3(s) + s                      # the sum has a second use: not fused
        y4 = self.r4(y3 + y3.mean((2, 3), keepdim=True))  # broadcasting: added by the layer
        z = y4 * 1.0
        z += y1
        return F.relu(z)


@torch.no_grad()
def test_every_add_spelling_and_the_cases_that_must_not_fuse():
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    qnet = quantized(Joins, x)
    unfused = fastspike.to_snn(qnet, 3, "signed", **OFF)
    fused = fastspike.to_snn(qnet, 3, "signed", **dict(OFF, fuse_residual=True))
    assert [len(n.args) for n in neuron_nodes(fused)] == [2, 2, 1, 2, 2]
    assert torch.equal(fused(x), unfused(x))
    both = fastspike.to_snn(qnet, 3, "signed", **dict(OFF, fuse_residual=True, constant_input_once=True))
    assert torch.equal(both(x), unfused(x))


CONSTANT_INPUT_MODELS = [  # name, kwargs, input shape, repeats left
    ("cifar_resnet18", dict(base_width=4), (2, 3, 8, 8), 0),
    ("cifar_vgg16", dict(width=1 / 16, hidden=16, dropout=0.0), (2, 3, 32, 32), 0),
    ("tiny_yolov2", dict(num_classes=3, width=0.125), (2, 3, 32, 32), 0),
    ("small_deeplab", dict(num_classes=4, width=4), (2, 3, 16, 16), 0),  # reads x.shape[-2:] only
]


@pytest.mark.parametrize("name,kwargs,shape,left", CONSTANT_INPUT_MODELS, ids=[m[0] for m in CONSTANT_INPUT_MODELS])
@torch.no_grad()
def test_constant_input_once_gives_identical_outputs(name, kwargs, shape, left):
    qnet, x = calibrated(name, kwargs, shape)
    for readout in ("mean", "sequence"):
        before = fastspike.to_snn(qnet, 2, "if", readout=readout, **OFF)
        once = fastspike.to_snn(qnet, 2, "if", readout=readout, **dict(OFF, constant_input_once=True))
        assert repeats(before) == 1 and repeats(once) == left
        assert once.get_submodule(neuron_nodes(once)[0].target).constant_input
        assert torch.equal(first(once(x)), first(before(x)))


class InputSkips(nn.Module):
    """The input meets time-varying values later (a skip from the image), is
    read for its size, and reaches the output directly."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.skip = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(3, 4, 1)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        s = self.skip(x)
        y = self.relu2(self.c2(self.relu1(self.c1(x)) + s))
        flat = y.view(x.size(0), -1)
        return flat, x.mean((1, 2, 3))


@torch.no_grad()
def test_constant_values_are_repeated_where_they_meet_time_varying_ones():
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    qnet = quantized(InputSkips, x)
    before = fastspike.to_snn(qnet, 4, "signed", **OFF)
    once = fastspike.to_snn(qnet, 4, "signed", **dict(OFF, constant_input_once=True, fuse_residual=True))
    # s meets relu1's spikes, the mean reaches the output; x.size(0) is read off T·B rows, no repeat
    assert repeated_values(once) == ["skip", "mean"]
    for a, b in zip(once(x), before(x)):
        assert torch.equal(a, b)


fx.wrap("len")  # lets ShapeReads' len(x) be traced (as a call node)


class ShapeReads(nn.Module):
    """Reads the input's size every way: batch-free reads (rank, dtype, shape[1],
    shape[2:]) used with the constant part, and reads that may count the batch
    (shape[-2:] as in DeepLab, size(0), numel, len) used with time-varying
    values. ``early_negative``: shape[-2:] also meets a constant value."""

    def __init__(self, early_negative=False):
        super().__init__()
        self.early_negative = early_negative
        self.down = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.c1, self.c2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        size = x.shape[-2:] if self.early_negative else x.shape[2:]
        a = F.interpolate(self.down(x), size=size, mode="bilinear", align_corners=False)
        a = a * (x.shape[1] / x.ndim) + x.size(dim=1) / x.dim() + torch.ones((), dtype=x.dtype)
        y = self.relu2(self.c2(self.relu1(self.c1(a))))
        up = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        # reads that count the batch used for shapes only (as values they are refused:
        # tests/test_convert_exact.py)
        return up.reshape(x.size(0), -1) + up.new_zeros((len(x), 1)) + up.new_ones(torch.numel(x) // x.nelement())


@pytest.mark.parametrize("early_negative,left", [(False, []), (True, ["down"])])
@torch.no_grad()
def test_size_reads_of_the_input_need_no_repeat(early_negative, left):
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    qnet = fastspike.quantize(ShapeReads(early_negative).eval(), levels=4)
    fastspike.calibrate(qnet, [x])
    before = fastspike.to_snn(qnet, 3, "signed", **OFF)
    once = fastspike.to_snn(qnet, 3, "signed", **dict(OFF, constant_input_once=True))
    # shape[-2:] may include dim 0 (a 2-D tensor): where it meets the constant
    # part, that part is repeated (the input itself still is not).
    assert repeated_values(once) == left
    assert once.get_submodule(neuron_nodes(once)[0].target).constant_input is not early_negative
    y_once, y_before = once(x), before(x)
    assert torch.equal(y_once, y_before)
    assert y_once.shape == (2, 4 * 6 * 6)
    saved = io.BytesIO()
    torch.save(once, saved)  # reloading re-traces the graph, keeping ShapeOverTime as one call
    saved.seek(0)
    assert torch.equal(torch.load(saved, weights_only=False)(x), y_before)


@torch.no_grad()
def test_torchvision_deeplab_reads_the_input_size_without_repeats():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    qnet = fastspike.quantize(get_model("deeplabv3_resnet50", num_classes=2).eval(), levels=4,
                              example_input=x)
    before = fastspike.to_snn(qnet, 2, "if", **OFF)
    once = fastspike.to_snn(qnet, 2, "if", **dict(OFF, constant_input_once=True))
    assert repeated_values(before) == ["x"] and repeated_values(once) == []
    assert torch.equal(once(x)["out"], before(x)["out"])


@pytest.mark.parametrize("grad", ["surrogate", "rate"])
def test_constant_input_once_gradients_match(grad):
    qnet, x = calibrated("cifar_resnet20", dict(base_width=4), (2, 3, 8, 8))

    def grads(snet):
        xr = x.clone().requires_grad_(True)
        snet(xr).square().sum().backward()
        out = {n: p.grad for n, p in snet.named_parameters()}
        out["input"] = xr.grad
        return out

    before = grads(fastspike.to_snn(qnet, 2, "signed", grad=grad, **OFF))
    after = grads(fastspike.to_snn(qnet, 2, "signed", grad=grad, **dict(OFF, constant_input_once=True,
                                                                        fuse_residual=True)))
    assert set(before) == set(after)
    assert {n for n, g in before.items() if g is None} == {n for n, g in after.items() if g is None}
    checked = [n for n, g in before.items() if g is not None]
    assert "input" in checked and len(checked) > 20
    for name in checked:  # sums over T are taken in another order: rounding only
        assert before[name].abs().sum() > 0, name
        torch.testing.assert_close(after[name], before[name], rtol=1e-4, atol=1e-6, msg=name)


def power_of_two_thresholds(snet):
    """Thresholds 2^k make W·u and k·u exact, so folding u changes no bit."""
    for m in snet.modules():
        if isinstance(m, SpikingNeuron):
            m.threshold.copy_(torch.exp2(torch.round(torch.log2(m.threshold))))
    return snet


@pytest.mark.parametrize("name,kwargs,shape,preset,folded", [
    ("cifar_vgg16", dict(width=1 / 16, hidden=16, dropout=0.0), (2, 3, 32, 32), "qcfs", 15),
    ("cifar_resnet18", dict(base_width=4), (2, 3, 8, 8), "cs-qcfs", 12),  # per channel, avgpool+flatten+fc
])
@torch.no_grad()
def test_compact_spikes_fold_the_scale_into_the_next_layer(name, kwargs, shape, preset, folded):
    qnet, x = calibrated(name, kwargs, shape, preset=preset)
    snet = power_of_two_thresholds(fastspike.to_snn(qnet, 4, "signed", **OFF))
    compact = fold_spike_scales(copy.deepcopy(snet))
    assert sum(m.compact for m in compact.modules() if isinstance(m, SpikingNeuron)) == folded
    assert torch.equal(compact(x), snet(x))
    # with any thresholds, only float rounding separates the two
    plain = fastspike.to_snn(qnet, 4, "signed", **OFF)
    rounded = fastspike.to_snn(qnet, 4, "signed", **dict(OFF, compact_spikes=True))
    y, y_compact = plain(x), rounded(x)
    assert ((y - y_compact).norm() / y.norm()).item() < 1e-3
    with torch.enable_grad(), pytest.raises(ValueError, match="compact=True .* inference only"):
        rounded(x.clone().requires_grad_(True))


@torch.no_grad()
def test_record_spike_trains_of_a_converted_network():
    qnet, x = calibrated("cifar_resnet20", dict(base_width=4), (2, 3, 8, 8))
    snet = fastspike.to_snn(qnet, 3, "signed", **dict(OFF, fuse_residual=True, constant_input_once=True))
    expected = snet(x)
    output, trains = record_spike_trains(snet, x)
    assert torch.equal(output, expected)
    names = [n for n, m in snet.named_modules() if isinstance(m, SpikingNeuron)]
    assert list(trains) == names and len(names) == 19
    spikes_seen = {}
    hooks = [snet.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: spikes_seen.__setitem__(n, o))
             for n in names]
    snet(x)
    for h in hooks:
        h.remove()
    for n in names:
        counts = trains[n]
        assert counts.dtype == torch.int8 and counts.shape[:2] == (3, 2)
        scale = snet.get_submodule(n).spike_scale()
        scale = scale.view(-1, *([1] * (counts.dim() - 3))) if scale.dim() else scale
        assert torch.equal((counts.float() * scale).reshape(spikes_seen[n].shape), spikes_seen[n]), n
    assert all(not m.record and m.recorded is None for m in snet.modules() if isinstance(m, SpikingNeuron))
    with pytest.raises(ValueError, match="found no SpikingNeuron"):
        record_spike_trains(nn.Linear(2, 2), torch.zeros(1, 2))


def test_converted_network_with_all_options_compiles():
    torch._dynamo.reset()
    qnet, x = calibrated("cifar_resnet20", dict(base_width=4), (2, 3, 8, 8))
    snet = fastspike.to_snn(qnet, 2, "signed", fuse_residual=True, constant_input_once=True, compact_spikes=True)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(snet, fullgraph=True, backend="aot_eager")(x), snet(x))


def test_to_snn_defaults_are_the_documented_ones():
    import inspect

    from fastspike import convert

    params = inspect.signature(fastspike.to_snn).parameters
    assert params["fuse_residual"].default is convert.FUSE_RESIDUAL_DEFAULT
    assert params["constant_input_once"].default is convert.CONSTANT_INPUT_ONCE_DEFAULT
    assert params["compact_spikes"].default is convert.COMPACT_SPIKES_DEFAULT
