"""Property tests (hypothesis) over every argument of the neuron operator and
of the quantizers, against the reference loop; and the documented behaviour of
NaN and ±inf inputs (README "Reliability").

Deterministic in CI: every test runs with derandomize=True and no example
database (the examples are a function of the test alone) and deadline=None (a
loaded 2-core machine must not turn slowness into failures)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastspike
from fastspike.quant import PRESETS, QuantReLU, quantize_tensor
from fastspike.reference import accumulation_dtype, neuron_reference

from conftest import FLOAT_DTYPES, NEURON_KINDS, assert_same_result, needs_extension
from test_backward import TOLERANCE, grads
from test_forward import run_both
from test_quant_nn import edge_free

pytestmark = needs_extension()

FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow])

# Sizes that hit the CPU kernel's 64-lane blocks and their tails, odd sizes and empties.
SIZES = [1, 2, 3, 5, 7, 0, 65]
MAX_NEURONS = 2048


@st.composite
def x_seqs(draw, max_time_steps=8):
    """An input [T, ...] of any float dtype, possibly non-contiguous (permuted,
    strided, offset or broadcast with stride 0), with values from tiny to huge
    or on an exact grid of the threshold (ties h = j·u)."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    time_steps = draw(st.sampled_from([0, 1, 2, 3, 5, max_time_steps]))
    state = draw(st.lists(st.sampled_from(SIZES), min_size=0, max_size=4))
    while math.prod(state) > MAX_NEURONS:  # keep the reference loop quick
        state[state.index(max(state))] = 1
    shape = (time_steps, *state)
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    values = draw(st.sampled_from(["grid", "normal"]))
    layout = draw(st.sampled_from(["contiguous", "permuted", "strided", "offset", "expanded"]))

    def sample(sizes):
        if values == "grid":  # exact multiples of 1/8: membranes land exactly on levels
            return torch.randint(-12, 13, sizes, generator=gen).double() / 8
        scale = draw(st.sampled_from([1e-30, 1e-3, 0.4, 1.0, 3.0, 1e3, 1e30]))
        return torch.randn(sizes, generator=gen, dtype=torch.float64) * scale

    if layout == "permuted" and len(shape) >= 2:
        perm = draw(st.permutations(range(len(shape))))
        base = sample([shape[p] for p in perm])
        inverse = [perm.index(d) for d in range(len(shape))]
        x = base.permute(inverse)
    elif layout == "strided" and len(shape) >= 2:
        x = sample((*shape[:-1], 2 * shape[-1]))[..., ::2]
    elif layout == "offset":
        x = sample((shape[0] + 1, *shape[1:]))[1:]
    elif layout == "expanded" and len(shape) >= 2:
        x = sample((*shape[:-1], 1)).expand(shape)
    else:
        x = sample(shape)
    if dtype == torch.float16:  # finite in the dtype: ±inf has its own tests below
        x = x.clamp(-6e4, 6e4)
    return x.to(dtype) if x.dtype != dtype else x


@st.composite
def thresholds(draw, x):
    """Every threshold form the op accepts for x: a number, a 0-dim or 1-element
    tensor, per channel [C], per neuron x.shape[2:] or x.shape[1:], in any float
    dtype, possibly non-contiguous."""
    forms = ["number", "0-dim", "1-element"]
    if x.dim() >= 3:
        forms += ["channel", "neuron-shared"]
    if x.dim() >= 2:
        forms.append("neuron")
    form = draw(st.sampled_from(forms))
    scale = draw(st.sampled_from([1e-3, 0.25, 1.0, 7.0, 1e4]))
    if form == "number":
        return scale * draw(st.floats(0.5, 2.0))
    sizes = {"0-dim": (), "1-element": (1,), "channel": tuple(x.shape[2:3]),
             "neuron-shared": tuple(x.shape[2:]), "neuron": tuple(x.shape[1:])}[form]
    dtype = draw(st.sampled_from([torch.float16, torch.float32, torch.float64]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    theta = (torch.rand(tuple(reversed(sizes)), generator=gen, dtype=torch.float64) + 0.5) * scale
    theta = theta.permute(tuple(reversed(range(len(sizes)))))  # non-contiguous for >= 2 dims
    return theta.to(dtype)


@st.composite
def neuron_kwargs(draw, x):
    group_size = draw(st.sampled_from([1, 1, 2, 3, 4, 7, 64]))
    kwargs = dict(group_size=group_size, signed=draw(st.booleans()),
                  init_fraction=draw(st.sampled_from([0.5, 0.0, -1.5, 1.0]) | st.floats(-2, 2)),
                  neg_margin=draw(st.sampled_from([1e-3, 0.0, 0.5]) | st.floats(0, 1)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    acc = accumulation_dtype(x.dtype)
    if draw(st.booleans()):
        kwargs["v_init"] = (torch.randn(x.shape[1:], generator=gen, dtype=torch.float64) * 2).to(acc)
    if draw(st.booleans()):
        # Small counts, negative ones included (the op accepts any int32
        # state; see test_count_overflow_matches_reference for huge ones).
        kwargs["count_init"] = torch.randint(-2, 7, x.shape[1:], generator=gen, dtype=torch.int32)
    return kwargs


@st.composite
def fused_kwargs(draw, x):
    """residual= (x-like, contiguous or a stride-0 time broadcast) and compact=."""
    kwargs = {}
    if draw(st.booleans()):
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        if x.shape[0] > 0 and draw(st.booleans()):
            residual = torch.randn(x.shape[1:], generator=gen).to(x.dtype).unsqueeze(0).expand(x.shape)
        else:
            residual = torch.randn(x.shape, generator=gen).to(x.dtype)
        kwargs["residual"] = residual
    if draw(st.booleans()):
        kwargs["compact"] = True
    return kwargs


@settings(max_examples=400, **FUZZ)
@given(data=st.data())
def test_fuzz_forward_matches_reference_bit_for_bit(data):
    x = data.draw(x_seqs())
    threshold = data.draw(thresholds(x))
    kwargs = data.draw(neuron_kwargs(x))
    fused = data.draw(fused_kwargs(x))
    expected, actual = run_both(x, threshold, **kwargs, **fused)
    assert_same_result(expected, actual)
    if not fused:  # the inference form with a preallocated output gives the same
        buffer = torch.empty(x.shape, dtype=x.dtype)
        with torch.no_grad():
            assert_same_result(expected, fastspike.neuron(x, threshold, out=buffer, **kwargs))


@settings(max_examples=150, **FUZZ)
@given(data=st.data(), split=st.integers(0, 8))
def test_fuzz_chunked_run_equals_whole_run(data, split):
    x = data.draw(x_seqs())
    threshold = data.draw(thresholds(x))
    kwargs = data.draw(neuron_kwargs(x))
    split = min(split, x.shape[0])
    with torch.no_grad():
        whole = fastspike.neuron(x, threshold, **kwargs)
        first = fastspike.neuron(x[:split], threshold, **kwargs)
        rest = dict(kwargs, v_init=first.v, count_init=first.count)
        second = fastspike.neuron(x[split:], threshold, **rest)
    assert_same_result(whole, (torch.cat([first.spikes, second.spikes]), second.v, second.count))


@settings(max_examples=100, **FUZZ)
@given(
    dtype=st.sampled_from(FLOAT_DTYPES),
    shape=st.lists(st.sampled_from([1, 2, 3, 5, 66]), min_size=1, max_size=3),
    time_steps=st.integers(1, 6),
    kind=st.sampled_from(NEURON_KINDS),
    grad=st.sampled_from(["surrogate", "rate"]),
    surrogate=st.sampled_from(["sigmoid", "atan"]),
    alpha=st.sampled_from([None, 0.5, 10.0]),
    with_v_init=st.booleans(),
    per_channel=st.booleans(),
    # 40: surrogate arguments far outside the range where the host's e^x is a
    # polynomial (it clamps there), as well as the usual ones
    scale=st.sampled_from([0.8, 40.0]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_gradients_match_reference(dtype, shape, time_steps, kind, grad, surrogate, alpha,
                                        with_v_init, per_channel, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    full = (time_steps, *shape)
    x = (torch.randn(full, generator=gen) * scale + 0.2).to(dtype)
    acc = accumulation_dtype(dtype)
    v0 = (torch.rand(full[1:], generator=gen) * 0.5).to(acc) if with_v_init else None
    weights = torch.randn(full, generator=gen, dtype=torch.float64)
    weight_v = torch.randn(full[1:], generator=gen, dtype=torch.float64)
    threshold = torch.rand(full[2], generator=gen) + 0.5 if per_channel and len(full) >= 3 else 0.9
    group_size, signed = kind
    kwargs = dict(threshold=threshold, group_size=group_size, signed=signed, grad=grad,
                  surrogate=surrogate, alpha=alpha)
    expected = grads(neuron_reference, x, v0, weights, weight_v, **dict(kwargs))
    actual = grads(fastspike.neuron, x, v0, weights, weight_v, **dict(kwargs))
    assert torch.equal(expected[0].spikes, actual[0].spikes)
    for e, a in zip(expected[1:], actual[1:]):
        if e is not None or a is not None:
            torch.testing.assert_close(a.double(), e.double(), **TOLERANCE[dtype])


# ----------------------------------------------------------------------------
# Quantizers

@settings(max_examples=100, **FUZZ)
@given(
    levels=st.integers(1, 255),
    lam=st.floats(1e-3, 1e3),
    values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=64),
)
def test_fuzz_quantize_tensor_is_a_clipped_rounding_grid(levels, lam, values):
    z = torch.tensor(values, dtype=torch.float32)
    threshold = torch.tensor(lam, dtype=torch.float32)
    y = quantize_tensor(z, threshold, levels)
    # NaN stays NaN (in its own element); everything else lands on the grid k·λ/L, k ∈ 0..L.
    assert torch.equal(torch.isnan(y), torch.isnan(z))
    finite = ~torch.isnan(z)
    yf, zf = y[finite], z[finite]
    k = yf / threshold * levels
    assert torch.allclose(k, k.round(), atol=1e-3) and (k.round() >= 0).all() and (k.round() <= levels).all()
    assert torch.equal(yf[zf <= 0], torch.zeros_like(yf[zf <= 0]))  # -inf and negatives give 0
    # Within half a step of the clipped input (rounding to nearest), and monotone.
    step = lam / levels
    assert ((yf - zf.clamp(0, lam)).abs() <= step / 2 * (1 + 1e-4) + 1e-6 * lam).all()
    order = torch.argsort(zf)
    assert (torch.diff(yf[order]) >= 0).all()


@settings(max_examples=60, **FUZZ)
@given(
    preset=st.sampled_from(list(PRESETS)),
    levels=st.integers(1, 32),
    lam=st.floats(0.05, 50.0),
    shape=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    scale=st.sampled_from([0.1, 1.0, 10.0]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_quant_relu_presets_compute_quantize_tensor(preset, levels, lam, shape, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    quant = QuantReLU(levels=levels, preset=preset, threshold=lam, num_channels=shape[1])
    z = torch.randn(shape, generator=gen) * scale * lam
    y = quant(z)
    threshold = quant.broadcast_threshold(z).detach()
    expected = quantize_tensor(z, threshold, levels)
    if preset == "lsq":  # s·⌊clip(z/s)+½⌋: another operation order, equal off the rounding edges
        keep = edge_free(z, threshold, levels)
        torch.testing.assert_close(y[keep], expected[keep], rtol=1e-5, atol=1e-6 * lam)
        assert ((y - expected).abs() <= threshold / levels * 1.0001).all()
    else:  # the same operations in the same order: bit for bit
        assert torch.equal(y.detach(), expected)


@settings(max_examples=40, **FUZZ)
@given(
    z=st.lists(st.floats(-2.0, 3.0), min_size=1, max_size=16),
    theta=st.floats(0.1, 4.0),
    time_steps=st.integers(1, 16),
    group_size=st.sampled_from([1, 2, 4]),
)
def test_fuzz_neuron_on_constant_input_equals_quantizer(z, theta, time_steps, group_size):
    """docs/design.md §1: an IF (group) neuron with v0 = u/2 fed z for T steps emits
    quantize(z; θ, L = m·T)·T in total, away from the rounding edges."""
    z = torch.tensor(z, dtype=torch.float64) * theta
    levels = group_size * time_steps
    lam = torch.tensor(theta, dtype=torch.float64)
    spikes = fastspike.neuron(z.expand(time_steps, -1), theta, group_size=group_size).spikes
    keep = edge_free(z, lam, levels)
    torch.testing.assert_close(spikes.sum(0)[keep] / time_steps, quantize_tensor(z, lam, levels)[keep])


# ----------------------------------------------------------------------------
# NaN and ±inf in the input (README "Reliability"): they stay in their neuron.

NONFINITE = [math.nan, math.inf, -math.inf]


def poisoned(x: torch.Tensor, cells, values):
    """x with values written at (t, n) cells of its [T, N] view, and the mask of touched neurons."""
    bad = x.clone()
    flat = bad.view(bad.shape[0], -1)
    touched = torch.zeros(flat.shape[1], dtype=torch.bool)
    for (t, n), value in zip(cells, values):
        flat[t, n] = value
        touched[n] = True
    return bad, touched.view(x.shape[1:])


@settings(max_examples=120, **FUZZ)
@given(
    dtype=st.sampled_from(FLOAT_DTYPES),
    kind=st.sampled_from(NEURON_KINDS + [(64, True)]),
    neurons=st.sampled_from([3, 64, 130]),
    cells=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 129)), min_size=1, max_size=6),
    values=st.lists(st.sampled_from(NONFINITE), min_size=6, max_size=6),
    per_neuron_threshold=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_nonfinite_inputs_never_touch_neighbours(dtype, kind, neurons, cells, values,
                                                 per_neuron_threshold, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(6, 2, neurons, generator=gen) * 0.8).to(dtype)
    cells = [(t, n % (2 * neurons)) for t, n in cells]
    bad, touched = poisoned(x, cells, values)
    threshold = torch.rand(2, neurons, generator=gen) + 0.5 if per_neuron_threshold else 0.7
    group_size, signed = kind
    kwargs = dict(group_size=group_size, signed=signed)

    def run(inp):
        inp = inp.clone().requires_grad_(True)
        result = fastspike.neuron(inp, threshold, **kwargs)
        (result.spikes.double() * torch.arange(6.0, dtype=torch.float64).view(6, 1, 1)).sum().backward()
        return result, inp.grad

    (clean, clean_grad), (dirty, dirty_grad) = run(x), run(bad)
    keep = ~touched
    for name, c, d in zip(("spikes", "v", "count"), clean, dirty):
        c, d = (c[:, keep], d[:, keep]) if name == "spikes" else (c[keep], d[keep])
        assert torch.equal(c, d), f"{name} of untouched neurons changed"
    assert torch.equal(clean_grad[:, keep], dirty_grad[:, keep])
    # The spikes stay finite even in the touched neurons: (k⁺ − k⁻)·u.
    assert torch.isfinite(dirty.spikes).all()


def same_with_nan(expected, actual) -> None:
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)


# The signed group neuron (m > 1) has its own test below.
@pytest.mark.parametrize("group_size,signed", [(1, False), (1, True), (4, False)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nonfinite_input_rule(group_size, signed, dtype):
    """The rule, per neuron, from the step t where the value arrives:
    NaN: v is NaN from t on, the neuron never fires again (spikes 0), count frozen;
    +inf: v = +inf, it fires its maximum m·u = θ every step (count + m per step);
    −inf: v = −inf, no positive spikes; a signed neuron fires −u per member
    (min(count, m) per step) until its count is 0. Same as the reference."""
    theta, t0 = 1.0, 3
    x = torch.full((7, 4), 0.3).to(dtype)
    x[:t0] = torch.tensor([0.9, 0.9, 0.9, 0.9]).to(dtype)  # some spikes before, so count > 0
    x[t0, 1], x[t0, 2], x[t0, 3] = math.nan, math.inf, -math.inf
    with torch.no_grad():
        actual = fastspike.neuron(x, theta, group_size=group_size, signed=signed)
    expected = neuron_reference(x, theta, group_size=group_size, signed=signed, grad="none")
    same_with_nan(expected, actual)
    before = actual.count  # counts at t0 from a clean run
    with torch.no_grad():
        count_t0 = fastspike.neuron(x[:t0], theta, group_size=group_size, signed=signed).count
    s = actual.spikes.float()
    assert torch.isnan(actual.v[1]) and (s[t0:, 1] == 0).all() and before[1] == count_t0[1]
    assert actual.v[2] == math.inf and (s[t0:, 2] == theta).all()
    assert actual.count[2] == count_t0[2] + group_size * (7 - t0)
    assert actual.v[3] == -math.inf and (s[t0:, 3] <= 0).all()
    if signed:
        assert actual.count[3] == 0 and s[t0:, 3].sum() == -count_t0[3] * theta / group_size
    else:
        assert (s[t0:, 3] == 0).all()


@pytest.mark.parametrize("group_size", [3, 64])
def test_nan_in_signed_group_neuron_matches_reference(group_size):
    """Regression: negative_count() once counted a NaN membrane as one negative level crossed,
    so a signed group neuron with a NaN membrane fired -u until its count was 0."""
    x = torch.full((6, 3), 0.9)
    x[2, 1] = math.nan
    with torch.no_grad():
        actual = fastspike.neuron(x, 1.0, group_size=group_size, signed=True)
    expected = neuron_reference(x, 1.0, group_size=group_size, signed=True, grad="none")
    same_with_nan(expected, actual)
