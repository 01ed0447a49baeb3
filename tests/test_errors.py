"""Bad input gets a clear error naming the argument, from the public API and
from the raw operators alike; never a crash or a silent wrong result."""

import math
import re

import pytest
import torch

import fastspike

from conftest import needs_extension


def raw_forward(x, threshold, v_init=None, count_init=None, group_size=1, signed=False,
                init_fraction=0.5, neg_margin=1e-3, grad_mode="none", surrogate=None, alpha=None):
    """The kernel operator; with a surrogate or alpha, the differentiable operator that takes them."""
    if surrogate is not None or alpha is not None:
        return torch.ops.fastspike.neuron(x, threshold, v_init, count_init, group_size, signed, init_fraction,
                                          neg_margin, "surrogate", surrogate or "sigmoid",
                                          4.0 if alpha is None else alpha)
    return torch.ops.fastspike.neuron_forward(x, threshold, v_init, count_init, group_size, signed,
                                              init_fraction, neg_margin, grad_mode)


X = torch.randn(4, 2, 3, 5)

# (what is wrong, keyword arguments, the exception fastspike.neuron raises, pattern its message must
# contain): TypeError for a wrong type, ValueError for a wrong value, the same from every backend.
BAD_CALLS = [
    ("integer input", dict(x=X.to(torch.int32)), TypeError, r"x_seq must be a floating-point tensor"),
    ("list input", dict(x=[[1.0]]), TypeError, r"x_seq must be a floating-point tensor .*got list"),
    ("0-dim input", dict(x=torch.tensor(1.0)), ValueError, r"x_seq must have a leading time axis"),
    ("zero threshold", dict(threshold=torch.tensor(0.0)), ValueError, r"threshold must be finite and > 0"),
    ("negative threshold", dict(threshold=torch.tensor([0.5, -1.0, 0.5])), ValueError,
     r"threshold must be finite and > 0"),
    ("NaN threshold", dict(threshold=torch.tensor(math.nan)), ValueError, r"threshold must be finite and > 0"),
    ("inf threshold", dict(threshold=torch.full((3,), math.inf)), ValueError, r"threshold must be finite and > 0"),
    ("float64 threshold overflowing float32", dict(threshold=torch.full((3,), 1e300, dtype=torch.float64)),
     ValueError, r"threshold must be finite and > 0 everywhere \(in torch.float32\), got inf .*1e\+300"),
    ("huge number threshold", dict(threshold=1e300), ValueError,
     r"threshold must be finite and > 0 .*at most 3.40282e\+38 .*got 1e\+300"),
    ("tiny number threshold", dict(threshold=1e-60), ValueError, r"threshold must be finite and > 0 in "
                                                                 r"torch.float32 .*rounds to 0"),
    ("string threshold", dict(threshold="1.0"), TypeError, r"threshold must be a number or a tensor .*got str '1.0'"),
    ("threshold shape", dict(threshold=torch.ones(4)), ValueError,
     r"threshold must be a scalar, a per-channel.*shape \[4\]"),
    ("integer threshold", dict(threshold=torch.ones(3, dtype=torch.int64)), TypeError,
     r"threshold must be a floating-point tensor"),
    ("group size 0", dict(group_size=0), ValueError, r"group_size must be an integer in \[1, 2\^20\]"),
    ("group size 2^20 + 1", dict(group_size=2**20 + 1), ValueError, r"group_size must be an integer in \[1, 2\^20\]"),
    ("float group size", dict(group_size=2.0), TypeError, r"group_size must be an integer .*got float 2.0"),
    ("signed as a string", dict(signed="yes"), TypeError, r"signed must be True or False, got str 'yes'"),
    ("negative margin", dict(neg_margin=-0.1), ValueError, r"neg_margin must be a finite number >= 0"),
    ("huge margin", dict(neg_margin=1e300), ValueError, r"neg_margin must be .*at most 3.40282e\+38"),
    ("NaN init fraction", dict(init_fraction=math.nan), ValueError, r"init_fraction .* must be finite"),
    ("string init fraction", dict(init_fraction="0.5"), TypeError,
     r"init_fraction .* must be finite, a real number; got str '0.5'"),
    ("huge init fraction", dict(init_fraction=-1e300), ValueError, r"init_fraction .* at most 3.40282e\+38"),
    ("number v_init", dict(v_init=0.5), TypeError, r"v_init must be a torch.float32 tensor of shape \[2, 3, 5\] "
                                                   r"or None, got float 0.5"),
    ("v_init shape", dict(v_init=torch.zeros(2, 3)), ValueError,
     r"v_init must have the shape of one time step of x_seq, \[2, 3, 5\]"),
    ("v_init dtype", dict(v_init=torch.zeros(2, 3, 5, dtype=torch.float64)), TypeError,
     r"v_init must have dtype (Float|torch.float32)"),
    ("count_init dtype", dict(count_init=torch.zeros(2, 3, 5)), TypeError, r"count_init must have dtype (Int|torch.int32)"),
    ("count_init shape", dict(count_init=torch.zeros(3, 5, dtype=torch.int32)), ValueError,
     r"count_init must have the shape"),
    ("count_init list", dict(count_init=[0]), TypeError, r"count_init must be a torch.int32 tensor"),
    ("threshold device", dict(threshold=torch.ones((), device="meta")), ValueError,
     r"threshold must be on the same device as x_seq"),
    ("v_init device", dict(v_init=torch.zeros(2, 3, 5, device="meta")), ValueError,
     r"v_init must be on the same device as x_seq"),
    ("grad name", dict(grad="bptt"), ValueError, r"grad must be 'none', 'surrogate' or 'rate', got 'bptt'"),
    ("grad None", dict(grad=None), TypeError, r"grad must be one of .* \(a str\), got NoneType"),
    ("surrogate name", dict(surrogate="relu"), ValueError, r"surrogate must be 'sigmoid' or 'atan'"),
    ("alpha", dict(alpha=0.0), ValueError, r"alpha \(surrogate sharpness\) must be a finite number > 0"),
    ("string alpha", dict(alpha="4"), TypeError, r"alpha \(surrogate sharpness\) must be .*a real number; got str"),
    ("residual dtype", dict(residual=X.double()), TypeError, r"residual must have x_seq's dtype"),
    ("residual shape", dict(residual=X[:, :1]), ValueError, r"residual must have x_seq's shape"),
    ("compact as a string", dict(compact="no"), TypeError, r"compact must be True or False"),
    ("compact group of 200", dict(compact=True, group_size=200, grad="none"), ValueError, r"group_size must be <= 127"),
]
RAW_CALLS = [(what, case, pattern) for what, case, _, pattern in BAD_CALLS
             if what not in ("list input", "string threshold", "float group size", "signed as a string",
                             "string init fraction", "number v_init", "count_init list", "grad None",
                             "string alpha", "residual dtype", "residual shape", "compact as a string",
                             "compact group of 200", "grad name", "huge number threshold",
                             "tiny number threshold", "huge margin", "huge init fraction",
                             "float64 threshold overflowing float32")]


def public_kwargs(case):
    kwargs = dict(case)
    x = kwargs.pop("x", X)
    threshold = kwargs.pop("threshold", torch.tensor(1.0))
    return x, threshold, kwargs


@pytest.mark.parametrize("what,case,error,pattern", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_public_api_rejects(what, case, error, pattern):
    x, threshold, kwargs = public_kwargs(case)
    with pytest.raises(Exception) as info:
        fastspike.neuron(x, threshold, **kwargs)
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert re.search(pattern, str(info.value)), str(info.value)


@pytest.mark.parametrize("what,case,error,pattern", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_every_backend_raises_the_same_exception(what, case, error, pattern):
    """The checks run before any backend: the reference (use_reference(), or
    neuron_reference itself) raises what the compiled operators' path raises."""
    x, threshold, kwargs = public_kwargs(case)
    for call in (lambda: fastspike.neuron(x, threshold, **kwargs),
                 lambda: fastspike.neuron_reference(x, threshold, **kwargs)):
        with fastspike.use_reference(), pytest.raises(Exception) as info:
            call()
        assert type(info.value) is error and re.search(pattern, str(info.value)), \
            f"{type(info.value).__name__}: {info.value}"


@needs_extension()
@pytest.mark.parametrize("what,case,pattern", RAW_CALLS, ids=[c[0] for c in RAW_CALLS])
def test_raw_operator_rejects(what, case, pattern):
    x, threshold, kwargs = public_kwargs(case)
    # A meta tensor routes the call to the fake kernel, which raises in Python.
    with pytest.raises((RuntimeError, ValueError, TypeError), match=pattern):
        raw_forward(x, threshold, **kwargs)


def test_python_number_thresholds_are_checked_before_use():
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="threshold must be finite and > 0"):
            fastspike.neuron(X, bad)
    with pytest.raises(TypeError, match="threshold must be a number or a tensor"):
        fastspike.neuron(X, "1.0")


def test_grad_mode_errors():
    with pytest.raises(ValueError, match="grad must be 'none', 'surrogate' or 'rate'"):
        fastspike.neuron(X, 1.0, grad="bptt")
    with pytest.raises(ValueError, match="grad='none' was given but an input requires grad"):
        fastspike.neuron(X.clone().requires_grad_(), 1.0, grad="none")


@needs_extension()
def test_raw_grad_mode_error():
    with pytest.raises(ValueError, match="grad_mode must be 'none', 'surrogate' or 'rate'"):
        raw_forward(X, torch.tensor(1.0), grad_mode="bptt")


@pytest.mark.parametrize(
    "out,error,pattern",
    [
        (torch.empty(4, 2, 3), ValueError, r"spikes \(the out= tensor\) must have x_seq's shape"),
        (torch.empty(4, 2, 3, 5, dtype=torch.float64), TypeError,
         r"spikes \(the out= tensor\) must have x_seq's dtype"),
        (torch.empty(4, 2, 5, 3).transpose(2, 3), ValueError, r"spikes \(the out= tensor\) must be contiguous"),
    ],
)
@pytest.mark.parametrize("reference", [False, True])
def test_out_buffer_errors(out, error, pattern, reference):
    with torch.no_grad(), fastspike.use_reference() if reference else torch.no_grad(), \
            pytest.raises(Exception) as info:
        fastspike.neuron(X, 1.0, out=out)
    assert type(info.value) is error and info.match(pattern)


STATE = (torch.empty(2, 3, 5), torch.empty(2, 3, 5, dtype=torch.int32))


@pytest.mark.parametrize(
    "out,error,pattern",
    [
        ((torch.empty_like(X), torch.empty(2, 3), STATE[1]), ValueError,
         r"v \(the out= state\) must have the shape of one time step of x_seq, \[2, 3, 5\]"),
        ((torch.empty_like(X), STATE[0].double(), STATE[1]), TypeError,
         r"v \(the out= state\) must have dtype torch.float32"),
        ((torch.empty_like(X), STATE[0], STATE[1].long()), TypeError,
         r"count \(the out= state\) must have dtype torch.int32"),
        ((torch.empty_like(X), torch.empty(2, 5, 3).transpose(1, 2), STATE[1]), ValueError,
         r"v \(the out= state\) must be contiguous"),
        ((torch.empty_like(X), STATE[0], None), TypeError, r"count \(the out= state\) must be a tensor"),
        ((torch.empty_like(X), STATE[0]), TypeError, r"out must be a spikes tensor or a \(spikes, v, count\)"),
        ("buffer", TypeError, r"out must be a spikes tensor"),
    ],
)
def test_out_state_buffer_errors(out, error, pattern):
    with torch.no_grad(), pytest.raises(error, match=pattern):
        fastspike.neuron(X, 1.0, out=out)


@pytest.mark.parametrize("reference", [False, True])
def test_out_buffers_must_not_overlap_partially(reference):
    """A ValueError from every backend (checked in Python before dispatch), where the
    extension's own check raised RuntimeError and the reference none."""
    x = torch.randn(4, 2, 3, 5)
    storage = torch.empty(2 * 30 + 1)
    v_init = storage[:30].view(2, 3, 5)
    shifted = storage[1:31].view(2, 3, 5)  # one element off v_init: a race between neurons
    count = torch.empty(2, 3, 5, dtype=torch.int32)
    with torch.no_grad(), fastspike.use_reference() if reference else torch.no_grad():
        with pytest.raises(ValueError, match=r"v \(the out= state\) overlaps v_init in memory other than "
                                             r"element for element"):
            fastspike.neuron(x, 1.0, v_init=v_init, out=(torch.empty_like(x), shifted, count))
        with pytest.raises(ValueError, match=r"v \(the out= state\) overlaps spikes \(the out= tensor\)"):
            spikes = torch.empty(4 * 30 + 30)
            fastspike.neuron(x, 1.0, out=(spikes[:120].view_as(x), spikes[110:140].view(2, 3, 5), count))
        # Exactly the same tensors stay allowed: an update in place.
        v = torch.zeros(2, 3, 5)
        c = torch.zeros(2, 3, 5, dtype=torch.int32)
        xs = x.clone()
        fastspike.neuron(xs, 1.0, v_init=v, count_init=c, out=(xs, v, c))


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("case", ["spikes over v_init", "spikes over count_init", "v over threshold",
                                  "spikes over threshold"])
def test_out_buffers_must_not_overlap_what_the_kernel_reads(case, reference):
    """Found by a red-team pass: spikes over v_init/count_init and any buffer over a threshold
    read in place were not checked, and the CPU kernel's blocks then read values other blocks had
    already written (a silently wrong v). Now a ValueError from every backend and from the raw
    operator; the race needs blocks of 64 neurons, hence N = 256."""
    T, N = 4, 256
    x = torch.rand(T, N, generator=torch.Generator().manual_seed(3)) * 2
    buf = torch.zeros(T * N + N)
    theta = torch.ones(N)
    v_init = count_init = None
    spikes, v, count = torch.empty(T, N), torch.empty(N), torch.empty(N, dtype=torch.int32)
    if case == "spikes over v_init":
        spikes, v_init = buf[:T * N].view(T, N), buf[128:128 + N]
    elif case == "spikes over count_init":
        spikes, count_init = buf[:T * N].view(T, N), buf[128:128 + N].view(torch.int32)
    elif case == "v over threshold":
        theta, v = buf[:N], buf[128:128 + N]
    else:
        theta, spikes = buf[T * N - 8:T * N - 8 + N], buf[:T * N].view(T, N)
    if case.endswith("threshold"):
        theta.fill_(1.0)
    buffer_name, other = case.split(" over ")
    pattern = rf"{buffer_name} \(the out= (tensor|state)\) overlaps {other} in memory"
    with torch.no_grad(), fastspike.use_reference() if reference else torch.no_grad():
        with pytest.raises(ValueError, match=pattern):
            fastspike.neuron(x, theta, v_init=v_init, count_init=count_init, out=(spikes, v, count))
    if not reference and fastspike.backend_info()["backend"] == "extension":
        with pytest.raises(ValueError, match=pattern):
            torch.ops.fastspike.neuron_forward.out(x, theta, v_init, count_init, 1, False, 0.5, 1e-3,
                                                   spikes=spikes, v_final=v, count_final=count)


def test_out_buffer_refuses_autograd():
    with pytest.raises(ValueError, match="out= is for inference"):
        fastspike.neuron(X.clone().requires_grad_(), 1.0, out=torch.empty_like(X))


@needs_extension()
def test_backward_operator_checks_its_trace():
    grad = torch.randn(4, 2, 3, 5)
    with pytest.raises(ValueError, match="membrane_seq must be the Float tensor of shape"):
        torch.ops.fastspike.neuron_backward_surrogate(
            grad, None, torch.empty(0), torch.empty(0, dtype=torch.bool), torch.tensor(1.0), 1,
            False, 1e-3, "sigmoid", 4.0)
    with pytest.raises(ValueError, match="negative_open_seq must be the bool tensor"):
        torch.ops.fastspike.neuron_backward_surrogate(
            grad, None, torch.zeros(4, 2, 3, 5), torch.empty(0, dtype=torch.bool),
            torch.tensor(1.0), 1, True, 1e-3, "sigmoid", 4.0)
    with pytest.raises(ValueError, match="input_mean must have the shape of one time step"):
        torch.ops.fastspike.neuron_backward_rate(grad, torch.empty(0), torch.tensor(1.0))


def test_nan_and_inf_inputs_stay_in_their_neuron():
    x = torch.randn(6, 10) * 0.5
    x[2, 3] = math.nan
    x[1, 7] = math.inf
    result = fastspike.neuron(x, 1.0, signed=True)
    clean = fastspike.neuron(torch.cat([x[:, :3], x[:, 4:7], x[:, 8:]], 1), 1.0, signed=True)
    keep = [i for i in range(10) if i not in (3, 7)]
    assert torch.equal(result.spikes[:, keep], clean.spikes)
    assert torch.isnan(result.v[3])


def test_threshold_values_are_checked_again_after_a_change():
    """The value check of a threshold tensor is remembered per version of the
    tensor (not per call), and is redone after an in-place change or a .data swap;
    nothing is attached to the caller's tensor."""
    threshold = torch.tensor([0.5, 1.0, 2.0])
    fastspike.neuron(X, threshold)
    assert not threshold.__dict__
    threshold[1] = math.nan
    with pytest.raises(ValueError, match=r"threshold must be finite and > 0 everywhere .*got nan at flat index 1"):
        fastspike.neuron(X, threshold)
    threshold[1] = 1.0
    fastspike.neuron(X, threshold)
    threshold.data = torch.tensor([1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match=r"got -1.0 at flat index 1"):
        fastspike.neuron(X, threshold)
