"""The fused forward equals the reference loop bit for bit (docs/design.md §2)."""

import os
import platform
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastspike
from fastspike.reference import neuron_reference

from conftest import FLOAT_DTYPES, NEURON_KINDS, assert_same_result, cpu_and_cuda, needs_extension

pytestmark = needs_extension()


def make_threshold(layout: str, x_shape, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if layout == "scalar":
        return torch.tensor(0.8, device=device)
    if layout == "channel":
        return (torch.rand(x_shape[2], generator=gen) + 0.3).to(device)
    if layout == "neuron":  # shared over the batch
        return (torch.rand(x_shape[2:], generator=gen) + 0.3).to(device)
    return (torch.rand(x_shape[1:], generator=gen) + 0.3).to(device)  # every neuron its own


def run_both(x, threshold, **kwargs):
    expected = neuron_reference(x, threshold, grad="none", **kwargs)
    with torch.no_grad():
        actual = fastspike.neuron(x, threshold, **kwargs)
    return expected, actual


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("group_size,signed", NEURON_KINDS)
@pytest.mark.parametrize("layout", ["scalar", "channel", "neuron", "per_sample_neuron"])
def test_forward_matches_reference(device, dtype, group_size, signed, layout):
    # 3·5·7·3 neurons: not a multiple of the CPU block or the CUDA vector width.
    shape = (7, 3, 5, 7, 3)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.7).to(dtype).to(device)
    threshold = make_threshold(layout, shape, device)
    expected, actual = run_both(x, threshold, group_size=group_size, signed=signed)
    assert_same_result(expected, actual)
    # The kernel must actually fire both ways for this to mean anything.
    assert (actual.spikes > 0).any()
    if signed:
        assert (actual.spikes < 0).any()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("neurons", [1, 255, 256, 257, 1024 + 3, 4096])
def test_forward_sizes_across_block_and_vector_boundaries(device, neurons):
    x = torch.randn(5, neurons, generator=torch.Generator().manual_seed(neurons)).to(device)
    for group_size, signed in NEURON_KINDS:
        assert_same_result(*run_both(x, 1.0, group_size=group_size, signed=signed))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_forward_time_step_one_and_zero(device):
    x = torch.randn(1, 2, 3, 4, device=device) * 2
    assert_same_result(*run_both(x, 1.0, signed=True))
    empty_t = torch.randn(0, 2, 3, device=device)
    expected, actual = run_both(empty_t, 1.0, signed=True, group_size=2)
    assert_same_result(expected, actual)
    assert actual.spikes.shape == (0, 2, 3)
    assert torch.equal(actual.v, torch.full((2, 3), 0.25, device=device))  # φ·θ/m
    empty_n = torch.randn(4, 0, 3, device=device)
    result = fastspike.neuron(empty_n, 1.0)
    assert result.spikes.shape == (4, 0, 3) and result.v.shape == (0, 3)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_forward_non_contiguous_input(device):
    base = torch.randn(6, 4, 10, 3, device=device)
    x = base.transpose(1, 2)  # [6, 10, 4, 3], not contiguous
    assert not x.is_contiguous()
    threshold = torch.rand(4, device=device) + 0.5
    expected, actual = run_both(x, threshold, signed=True)
    assert_same_result(expected, actual)
    strided = base[:, ::2]
    assert_same_result(*run_both(strided, 0.9, group_size=2))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_forward_from_given_state(device, dtype):
    x = (torch.randn(4, 2, 6) * 0.6).to(dtype).to(device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    v0 = torch.randn(2, 6, dtype=acc, device=device)
    c0 = torch.randint(0, 3, (2, 6), dtype=torch.int32, device=device)
    assert_same_result(*run_both(x, 0.7, signed=True, group_size=2, v_init=v0, count_init=c0))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_out_buffer_including_in_place(device):
    x = torch.randn(8, 3, 300, device=device)
    expected = neuron_reference(x, 1.0, signed=True, grad="none")
    buffer = torch.empty_like(x)
    with torch.no_grad():
        result = fastspike.neuron(x, 1.0, signed=True, out=buffer)
    assert result.spikes is buffer
    assert_same_result(expected, result)
    # The spikes may overwrite the input itself (each element is read before
    # it is written), the cheapest form for inference.
    x_copy = x.clone()
    with torch.no_grad():
        result = fastspike.neuron(x_copy, 1.0, signed=True, out=x_copy)
    assert_same_result(expected, result)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cpu_forward_streams_large_outputs_exactly(dtype):
    """A spike output of 16 MB or more (kStreamingBytes in csrc/neuron/cpu/neuron_kernel.cpp)
    is written with non-temporal stores when its rows are 16-byte multiples; one whose rows
    are not takes the plain stores. Both, fresh, into out= and in place, equal the reference."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    time_steps = 2
    streamed = (16 << 20) // (time_steps * itemsize)  # exactly the threshold
    gen = torch.Generator().manual_seed(3)
    for neurons in (streamed, streamed + 1):
        x = (torch.randn(time_steps, neurons, generator=gen) * 0.8).to(dtype)
        expected = neuron_reference(x, 0.9, signed=True, group_size=2, grad="none")
        with torch.no_grad():
            assert_same_result(expected, fastspike.neuron(x, 0.9, signed=True, group_size=2))
            if neurons == streamed:
                buffers = (torch.full_like(x, float("nan")), torch.empty_like(expected.v),
                           torch.empty_like(expected.count))
                result = fastspike.neuron(x, 0.9, signed=True, group_size=2, out=buffers)
                assert_same_result(expected, result)
                in_place = fastspike.neuron(x, 0.9, signed=True, group_size=2, out=x)
                assert in_place.spikes is x
                assert_same_result(expected, in_place)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("group_size,signed", NEURON_KINDS)
def test_out_buffers_with_state_in_place_over_chunks_of_time(device, group_size, signed):
    """out=(spikes, v, count) fills the caller's buffers and nothing else; with
    v/count being v_init/count_init themselves, chunks of time carry the state
    in place and together equal one call over all steps."""
    gen = torch.Generator().manual_seed(group_size)
    x = (torch.randn(12, 3, 5, 67, generator=gen) * 0.8).to(device)
    threshold = (torch.rand(5, generator=gen) + 0.4).to(device)
    kw = dict(group_size=group_size, signed=signed)
    expected = neuron_reference(x, threshold, grad="none", **kw)
    spikes = torch.empty(4, *x.shape[1:], device=device)
    v = torch.empty(x.shape[1:], device=device)
    count = torch.empty(x.shape[1:], dtype=torch.int32, device=device)
    chunks = []
    with torch.no_grad():
        for i, chunk in enumerate(x.split(4)):
            state = dict(v_init=v, count_init=count) if i else {}
            result = fastspike.neuron(chunk, threshold, out=(spikes, v, count), **state, **kw)
            assert result.spikes is spikes and result.v is v and result.count is count
            chunks.append(spikes.clone())
    assert torch.equal(torch.cat(chunks), expected.spikes)
    assert torch.equal(v, expected.v) and torch.equal(count, expected.count)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_extreme_parameters(device):
    x = torch.randn(6, 50, device=device) * 3
    for kwargs in [
        dict(init_fraction=0.0),
        dict(init_fraction=-1.5, signed=True),
        dict(neg_margin=0.0, signed=True),
        dict(neg_margin=0.4, signed=True, group_size=5),
        dict(group_size=64, signed=True),
    ]:
        assert_same_result(*run_both(x, 0.3, **kwargs))


@settings(max_examples=40, deadline=None)
@given(
    time_steps=st.integers(0, 9),
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    dtype=st.sampled_from(FLOAT_DTYPES),
    group_size=st.integers(1, 6),
    signed=st.booleans(),
    layout=st.sampled_from(["scalar", "channel", "neuron", "per_sample_neuron"]),
    scale=st.floats(0.01, 5.0),
    init_fraction=st.floats(-1.0, 1.5),
    neg_margin=st.floats(0.0, 0.5),
    seed=st.integers(0, 2**16),
)
def test_forward_random_parameters(time_steps, shape, dtype, group_size, signed, layout, scale,
                                   init_fraction, neg_margin, seed):
    if layout == "channel" and len(shape) < 2:
        layout = "scalar"
    x_shape = (time_steps, *shape)
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(x_shape, generator=gen) * scale).to(dtype)
    threshold = make_threshold(layout, x_shape, "cpu") if len(x_shape) >= 3 or layout in ("scalar", "per_sample_neuron") else 1.0
    assert_same_result(*run_both(x, threshold, group_size=group_size, signed=signed,
                                 init_fraction=init_fraction, neg_margin=neg_margin))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("group_size,signed", NEURON_KINDS)
@pytest.mark.parametrize("blocks,threads", [(1, 1), (2, 32), (3, 7), (64, 256)])
def test_cuda_kernel_bodies_on_cpu_grid(dtype, group_size, signed, blocks, threads):
    """Walks the CUDA launch grid on the CPU with the kernels' own bodies:
    grid-stride loops, vector and scalar paths, recorded traces."""
    for neurons in (4 * 37, 37):  # vectorisable, and not
        x = (torch.randn(5, neurons, generator=torch.Generator().manual_seed(neurons)) * 0.8).to(dtype)
        threshold = torch.rand(neurons) + 0.4
        expected = fastspike.neuron(x, threshold, group_size=group_size, signed=signed)
        for width in (0, 1):
            for grad_mode in ("none", "surrogate", "rate"):
                emulated = torch.ops.fastspike._emulate_cuda_forward(
                    x, threshold, None, None, group_size, signed, 0.5, 1e-3, grad_mode,
                    blocks, threads, width,
                )
                assert_same_result(expected, emulated[:3])
                real = torch.ops.fastspike.neuron_forward(
                    x, threshold, None, None, group_size, signed, 0.5, 1e-3, grad_mode
                )
                for e, a in zip(real[3:], emulated[3:]):
                    assert torch.equal(e, a)


def test_emulated_grid_uses_vector_path_when_aligned():
    # 4·k neurons with an aligned start: the launcher's rule picks width 4,
    # while a view starting one element in cannot use it. Both must agree.
    x = torch.randn(3, 65) * 0.8
    aligned, shifted = x[:, :64].contiguous(), torch.randn(3 * 64 + 1)[1:].view(3, 64)
    for t in (aligned, shifted):
        expected = fastspike.neuron(t, 0.5, signed=True)
        emulated = torch.ops.fastspike._emulate_cuda_forward(
            t, torch.tensor(0.5), None, None, 1, True, 0.5, 1e-3, "none", 2, 8, 0)
        assert_same_result(expected, emulated[:3])


# The CPU lane loops have three builds: AVX-512 (16 float lanes), AVX2 (8) and
# the baseline instruction set (SSE2 on x86-64), picked at run time. The suite
# runs the widest one the CPU has; this script checks a narrower one in a process
# where ATen's capability is capped (ATEN_CPU_CAPABILITY): the forward bit for
# bit, the surrogate backward to the tolerance of its polynomial e^x.
_CAPPED_BUILD_SCRIPT = r"""
import sys
import torch, fastspike
from fastspike.reference import neuron_reference
assert fastspike.backend_info()["cpu_kernels"] == sys.argv[1], fastspike.backend_info()
gen = torch.Generator().manual_seed(0)
checked = 0
for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    for group_size, signed in ((1, False), (1, True), (4, False), (3, True), (7, True)):
        x = (torch.randn(6, 3, 5, 67, generator=gen) * 0.8).to(dtype)
        r = (torch.randn(6, 3, 5, 67, generator=gen) * 0.3).to(dtype)
        theta = torch.rand(5, generator=gen) + 0.3
        for kwargs in ({}, {"residual": r}):
            e = neuron_reference(x, theta, group_size=group_size, signed=signed, grad="none", **kwargs)
            with torch.no_grad():
                a = fastspike.neuron(x, theta, group_size=group_size, signed=signed, **kwargs)
            for ee, aa in zip(e, a):
                assert torch.equal(ee, aa), (dtype, group_size, signed, kwargs.keys())
            checked += 1
        if dtype == torch.float32:
            weights = torch.randn(x.shape, generator=gen)
            grads = []
            for fn in (neuron_reference, fastspike.neuron):
                leaf = x.clone().requires_grad_(True)
                (fn(leaf, theta, group_size=group_size, signed=signed).spikes * weights).sum().backward()
                grads.append(leaf.grad)
            torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)
print("checked", checked)
"""

# ATEN_CPU_CAPABILITY value that caps the lane loops at each narrower build.
_CAPABILITY_FOR_BUILD = {"baseline": "default", "avx2": "avx2"}
_BUILDS = ["baseline", "avx2", "avx512"]  # narrowest first


@pytest.mark.parametrize("build", ["baseline", "avx2"])
def test_cpu_narrower_builds_match_reference(build):
    widest = fastspike.backend_info()["cpu_kernels"]
    if _BUILDS.index(build) >= _BUILDS.index(widest):
        pytest.skip(f"the suite itself runs the {widest} build on this CPU")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=_CAPABILITY_FOR_BUILD[build])
    result = subprocess.run([sys.executable, "-c", _CAPPED_BUILD_SCRIPT, build], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checked 40" in result.stdout


def test_cpu_lane_loops_use_the_widest_build_the_cpu_has():
    if platform.machine() != "x86_64" or torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("no AVX2 on this CPU (or ATEN_CPU_CAPABILITY=default)")
    expected = "avx512" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "avx2"
    assert fastspike.backend_info()["cpu_kernels"] == expected


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_out_buffers_written_are_seen_by_autograd(device):
    """out= bumps the buffers' version counters, so a buffer some graph saved for
    backward and then overwritten by the operator gives autograd's in-place error,
    never a silently wrong gradient."""
    x = torch.randn(4, 3, 8, device=device)
    buffers = fastspike.neuron(x, 1.0, grad="none")
    versions = [b._version for b in buffers]
    weight = torch.randn(4, 3, 8, device=device, requires_grad=True)
    loss = (weight * buffers.spikes).sum()  # mul saves the spikes buffer
    with torch.no_grad():
        fastspike.neuron(x * 2, 1.0, out=buffers)
    assert all(b._version > v for b, v in zip(buffers, versions))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_calls_without_grad_give_ordinary_tensors(device):
    """A call that records no backward (no_grad, or no input requiring grad) skips
    the autograd layer, yet its outputs are ordinary tensors (not inference
    tensors) that later autograd code can use, equal to a recording call's."""
    x = torch.randn(5, 2, 7, device=device, requires_grad=True)
    with torch.no_grad():
        quiet = fastspike.neuron(x, 0.8, signed=True)
    recorded = fastspike.neuron(x, 0.8, signed=True)
    assert recorded.spikes.requires_grad and not quiet.spikes.requires_grad
    assert not any(t.is_inference() for t in quiet)
    assert_same_result(fastspike.NeuronResult(*(t.detach() for t in recorded)), quiet)
    weight = torch.randn(7, device=device, requires_grad=True)
    (quiet.spikes * weight).sum().backward()
    assert torch.equal(weight.grad, quiet.spikes.sum((0, 1)))
