"""The CuPy backend (fastspike/cupy_backend.py): the kernel source it builds
compiles under NVRTC with its options and yields every kernel it launches, the
argument-struct layout it computes matches the header, the choice of the path
(mocked CuPy and GPU availability), and clear errors. On a GPU with CuPy the
kernels run and agree bit for bit with the reference."""

import os
import re

import pytest
import torch

import fastspike
from fastspike import cupy_backend, ops
from test_build import CUDA_HOME, nvrtc_compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# bfloat16 differs from float16 only in the scalar type (test_build.py compiles a
# bfloat16 forward under NVRTC); three programs keep this under 15 s on two cores.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_runtime_kernel_source_compiles_under_nvrtc_without_fma(dtype):
    """The exact program and options the CuPy path hands NVRTC (plus the
    -arch and include path CuPy adds) compile, every kernel it launches is in
    the PTX, and --fmad=false leaves no fused multiply-add (docs/design.md §2)."""
    names = cupy_backend.kernel_names(dtype)
    options = list(cupy_backend.NVRTC_OPTIONS) + cupy_backend.include_options() + ["-arch=compute_90"]
    assert cupy_backend.include_options(), "no cuda_fp16.h found for NVRTC"
    status, log, ptx, lowered = nvrtc_compile(cupy_backend.kernel_source(dtype), options, names)
    assert status == 0, log
    assert "--fmad=false" in cupy_backend.NVRTC_OPTIONS
    assert not any("fast_math" in o for o in cupy_backend.NVRTC_OPTIONS)
    # 8 forward variants (signed x group x vector width), 4 surrogate, 1 rate, the layout probe
    assert len(names) == 14 and len(set(lowered.values())) == 14
    bodies = {}
    for chunk in ptx.split(".entry ")[1:]:
        bodies[chunk.split("(", 1)[0]] = chunk
    for name in names:
        assert lowered[name] in bodies, name
    # The forward dynamics are never contracted (the backward's expf may use
    # fma inside libdevice, which only changes the surrogate's rounding).
    for name in names:
        if "neuron_forward_kernel" in name:
            assert "fma.rn" not in bodies[lowered[name]], name


def test_struct_layout_follows_the_header():
    """The layout is read from neuron_args.h; NVRTC's static_asserts reject a
    layout that disagrees with the compiler's (here: a wrong size)."""
    fields = dict(cupy_backend.struct_fields("ForwardArgs"))
    assert fields["x"] == "u8" and fields["time_steps"] == "i8" and fields["group_size"] == "i4"
    assert fields["init_fraction"] == "acc"
    rate = cupy_backend.struct_dtype("RateBackwardArgs", torch.float64)
    # 3 pointers, 2 int64, 1 pointer, 2 int64: 64 bytes, no padding
    assert rate.itemsize == 64 and rate.fields["grad_x"][1] == 40
    offsets = cupy_backend.expected_offsets(torch.float32)
    assert len(offsets) == sum(len(cupy_backend.struct_fields(s)) for s in cupy_backend._STRUCTS)
    source = cupy_backend.kernel_source(torch.float32)
    size = cupy_backend.struct_dtype("RateBackwardArgs", torch.float32).itemsize
    broken = source.replace(f"sizeof(fastspike::RateBackwardArgs<float, float>) == {size}",
                            f"sizeof(fastspike::RateBackwardArgs<float, float>) == {size + 8}")
    assert broken != source
    options = list(cupy_backend.NVRTC_OPTIONS) + ["-arch=compute_90", f"-I{os.path.join(CUDA_HOME, 'include')}"]
    status, log, _, _ = nvrtc_compile(broken, options, [])
    assert status != 0 and "RateBackwardArgs changed" in log


def test_launch_constants_match_the_cuda_launcher():
    text = open(os.path.join(ROOT, "csrc", "neuron", "neuron_dispatch.h")).read()
    assert f"kThreadsPerBlock = {cupy_backend.THREADS_PER_BLOCK};" in text
    assert f"kForwardVectorWidth = {cupy_backend.FORWARD_VECTOR_WIDTH};" in text
    cu = open(os.path.join(ROOT, "csrc", "neuron", "cuda", "neuron_kernel.cu")).read()
    assert re.search(rf"sm_count\)\s*\*\s*{cupy_backend.BLOCKS_PER_SM}\b", cu)


def test_kernel_source_errors():
    with pytest.raises(TypeError, match="scalar must be one of"):
        cupy_backend.kernel_source(torch.int32)
    with pytest.raises(FileNotFoundError, match="needs .*neuron_arith.h"):
        cupy_backend.kernel_source(torch.float32, csrc="/nonexistent")


@pytest.fixture
def fresh_state(monkeypatch):
    """A clean, unregistered backend state for the selection tests."""
    monkeypatch.setattr(cupy_backend, "_state", {"registered": False, "reason": "not tried yet", "library": None})
    monkeypatch.delenv("FASTSPIKE_CUPY", raising=False)
    return monkeypatch


def test_available_says_why_not(fresh_state):
    fresh_state.setattr(torch.cuda, "is_available", lambda: False)
    assert cupy_backend.available() == (False, "torch sees no CUDA device")
    fresh_state.setattr(torch.cuda, "is_available", lambda: True)
    import builtins
    real_import = builtins.__import__

    def no_cupy(name, *args, **kwargs):
        if name == "cupy":
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    fresh_state.setattr(builtins, "__import__", no_cupy)
    ok, why = cupy_backend.available()
    assert not ok and "CuPy is not importable" in why and "cupy-cuda13x" in why
    fresh_state.setenv("FASTSPIKE_CUPY", "0")
    assert cupy_backend.available() == (False, "disabled by FASTSPIKE_CUPY=0")


def test_selection_registers_once_only_where_the_library_lacks_cuda(fresh_state):
    calls = []
    fresh_state.setattr(cupy_backend, "available", lambda: (calls.append(1), (True, "CuPy 14.0"))[1])
    compiled = []
    fresh_state.setattr(cupy_backend, "_module", lambda device, scalar: compiled.append((device.type, scalar)))
    fresh_state.setattr(torch.cuda, "current_device", lambda: 0)
    registered = []

    class FakeLibrary:
        def __init__(self, ns, kind):
            assert (ns, kind) == ("fastspike", "IMPL")

        def impl(self, name, fn, key):
            registered.append((name, fn, key))

    fresh_state.setattr(torch.library, "Library", FakeLibrary)
    # a library with its own CUDA kernels keeps them
    assert cupy_backend.ensure_registered(library_has_cuda=True) is False and not calls
    # FASTSPIKE_CUPY=0 never registers
    fresh_state.setenv("FASTSPIKE_CUPY", "0")
    assert cupy_backend.ensure_registered(library_has_cuda=False) is False and not calls
    fresh_state.delenv("FASTSPIKE_CUPY")
    assert cupy_backend.ensure_registered(library_has_cuda=False) is True
    assert cupy_backend.ensure_registered(library_has_cuda=False) is True and len(calls) == 1
    assert [(n, k) for n, _, k in registered] == [
        ("neuron_forward", "CUDA"), ("neuron_forward.out", "CUDA"),
        ("neuron_backward_surrogate", "CUDA"), ("neuron_backward_rate", "CUDA")]
    assert registered[0][1] is cupy_backend.neuron_forward
    assert compiled == [("cuda", torch.float32)]  # compiled once, eagerly, before registering
    status = cupy_backend.status()
    assert status["active"] and "CuPy 14.0" in status["reason"] and "NVRTC" in status["reason"]


def test_force_mode_registers_over_compiled_cuda_kernels(fresh_state):
    fresh_state.setattr(cupy_backend, "available", lambda: (True, "CuPy 14.0"))
    fresh_state.setattr(cupy_backend, "_module", lambda device, scalar: None)
    fresh_state.setattr(torch.cuda, "current_device", lambda: 0)
    fresh_state.setattr(torch.library, "Library", lambda ns, kind: type("L", (), {"impl": lambda *a: None})())
    fresh_state.setenv("FASTSPIKE_CUPY", "force")
    assert cupy_backend.ensure_registered(library_has_cuda=True) is True


def test_a_failing_compile_leaves_the_reference_path(fresh_state):
    fresh_state.setattr(cupy_backend, "available", lambda: (True, "CuPy 14.0"))
    fresh_state.setattr(torch.cuda, "current_device", lambda: 0)

    def broken(device, scalar):
        raise RuntimeError("NVRTC: error: identifier x is undefined")

    fresh_state.setattr(cupy_backend, "_module", broken)
    assert cupy_backend.ensure_registered(library_has_cuda=False) is False
    status = cupy_backend.status()
    assert not status["active"] and "identifier x is undefined" in status["reason"]


def test_unavailable_cupy_is_tried_once_and_reported(fresh_state):
    calls = []
    fresh_state.setattr(cupy_backend, "available", lambda: (calls.append(1), (False, "CuPy is not importable (x)"))[1])
    assert cupy_backend.ensure_registered(library_has_cuda=False) is False
    assert cupy_backend.ensure_registered(library_has_cuda=False) is False
    assert len(calls) == 1
    assert cupy_backend.status() == {"active": False, "reason": "CuPy is not importable (x)", "mode": "auto"}


def test_ops_choose_cupy_for_cuda_tensors_without_cuda_kernels(fresh_state):
    """ops._use_reference: a CUDA tensor on a library without CUDA kernels
    asks the CuPy path; the reference runs (with the CuPy reason in the
    warning) when it is unavailable. A meta tensor stands in for a CUDA one."""
    if fastspike.backend_info()["backend"] != "extension":
        pytest.skip("the compiled operators are not loaded")
    x = torch.empty(2, 3, device="meta")
    fresh_state.setattr(torch.Tensor, "is_cuda", property(lambda self: self.device.type in ("cuda", "meta")))
    fresh_state.setattr(ops._backend, "has_cuda_kernels", lambda: False)
    fresh_state.setattr(cupy_backend, "ensure_registered", lambda has_cuda: not has_cuda)
    assert ops._use_reference(x) is False
    fresh_state.setattr(cupy_backend, "ensure_registered", lambda has_cuda: False)
    fresh_state.setattr(cupy_backend, "_state", {"registered": False, "reason": "CuPy is not importable (x)"})
    fresh_state.setattr(ops, "_warned_cuda_fallback", False)
    with pytest.warns(RuntimeWarning, match=r"install CuPy .*CuPy is not importable \(x\)"):
        assert ops._use_reference(x) is True
    with ops.use_reference():
        assert ops._use_reference(x) is True
    assert "cupy" in fastspike.backend_info()


def test_input_errors_name_the_argument():
    x = torch.zeros(2, 4)
    with pytest.raises(TypeError, match="x_seq must be a floating-point tensor"):
        cupy_backend.neuron_forward(x.int(), torch.tensor(1.0), None, None, 1, False, 0.5, 1e-3, "none")
    with pytest.raises(ValueError, match="group_size must be an integer in"):
        cupy_backend.neuron_forward(x, torch.tensor(1.0), None, None, 0, False, 0.5, 1e-3, "none")
    with pytest.raises(ValueError, match="grad_mode must be"):
        cupy_backend.neuron_forward(x, torch.tensor(1.0), None, None, 1, False, 0.5, 1e-3, "bptt")
    with pytest.raises(ValueError, match="threshold must be a scalar, a per-channel"):
        cupy_backend.neuron_forward(x, torch.ones(3), None, None, 1, False, 0.5, 1e-3, "none")
    with pytest.raises(ValueError, match="compact spikes .* grad must be .none."):
        cupy_backend.neuron_forward(x, torch.tensor(1.0), None, None, 1, False, 0.5, 1e-3, "surrogate", None, True)
    with pytest.raises(ValueError, match="spikes \\(the out= tensor\\) must have x_seq's shape"):
        cupy_backend.neuron_forward_out(x, torch.tensor(1.0), None, None, 1, False, 0.5, 1e-3, spikes=torch.zeros(3),
                                        v_final=torch.zeros(x.shape[1:]),
                                        count_final=torch.zeros(x.shape[1:], dtype=torch.int32))


def test_threshold_layout_matches_the_header_rule():
    x = torch.zeros(3, 2, 5, 4, 4)
    values, inner, size = cupy_backend.threshold_layout(torch.arange(1.0, 6.0), x)
    assert (inner, size) == (16, 5) and values.tolist() == [1, 2, 3, 4, 5]
    assert cupy_backend.threshold_layout(torch.tensor(2.0), x)[1:] == (1, 1)
    assert cupy_backend.threshold_layout(torch.ones(5, 4, 4), x)[1:] == (1, 80)
    assert cupy_backend.threshold_layout(torch.ones(2, 5, 4, 4), x)[1:] == (1, 160)


# ----------------------------------------------------------------------------- on a GPU with CuPy

def _cupy_ready():
    """GPU cases: the `cuda` marker (`pytest -m cuda`), skipped without a GPU and CuPy."""
    ok, why = cupy_backend.available() if torch.cuda.is_available() else (False, "no GPU")
    skip = pytest.mark.skipif(not ok, reason=f"needs a GPU and CuPy: {why}")
    return lambda test: pytest.mark.cuda(skip(test))


@_cupy_ready()
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size,signed", [(1, False), (1, True), (4, False), (3, True)])
def test_cupy_kernels_match_the_reference_bit_for_bit(dtype, group_size, signed):
    from fastspike.reference import neuron_reference
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 2, 3, 37, generator=gen) * 0.8).to(dtype).cuda()
    threshold = (torch.rand(3, generator=gen) + 0.5).cuda()
    spikes, v, count, *_ = cupy_backend.neuron_forward(x, threshold, None, None, group_size, signed, 0.5, 1e-3,
                                                       "none")
    ref = neuron_reference(x, threshold, group_size=group_size, signed=signed, grad="none")
    assert torch.equal(spikes, ref.spikes) and torch.equal(v, ref.v) and torch.equal(count, ref.count)
    # vector width 4 (N % 4 == 0) and the in-place out= form
    x4 = x[..., :36].contiguous()
    out = torch.empty_like(x4)
    v4 = x4.new_empty(x4.shape[1:], dtype=ref.v.dtype)
    c4 = x4.new_empty(x4.shape[1:], dtype=torch.int32)
    cupy_backend.neuron_forward_out(x4, threshold, None, None, group_size, signed, 0.5, 1e-3, spikes=out, v_final=v4,
                                    count_final=c4)
    ref4 = neuron_reference(x4, threshold, group_size=group_size, signed=signed, grad="none")
    assert torch.equal(out, ref4.spikes) and torch.equal(v4, ref4.v) and torch.equal(c4, ref4.count)


@_cupy_ready()
@pytest.mark.parametrize("grad", ["surrogate", "rate"])
def test_cupy_backward_kernels_match_the_reference_gradients(grad):
    """Both backwards through the CuPy kernels, against the reference's autograd."""
    from fastspike.reference import neuron_reference
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 4, 50, generator=gen) * 0.8).double().cuda()
    g = torch.randn(6, 4, 50, generator=gen).double().cuda()
    spikes, _, _, membrane, negative_open, mean = cupy_backend.neuron_forward(
        x, torch.tensor(1.0, device="cuda"), None, None, 2, True, 0.5, 1e-3, grad)
    if grad == "surrogate":
        grad_x, _ = cupy_backend.neuron_backward_surrogate(g, None, membrane, negative_open,
                                                           torch.tensor(1.0, device="cuda"), 2, True, 1e-3,
                                                           "sigmoid", 4.0)
    else:
        grad_x = cupy_backend.neuron_backward_rate(g, mean, torch.tensor(1.0, device="cuda"))
    xr = x.clone().requires_grad_()
    ref = neuron_reference(xr, 1.0, group_size=2, signed=True, grad=grad)
    ref.spikes.backward(g)
    assert torch.equal(spikes, ref.spikes.detach())
    torch.testing.assert_close(grad_x, xr.grad, rtol=1e-9, atol=1e-11)  # as test_backward.py


@_cupy_ready()
def test_fastspike_neuron_on_cuda_runs_through_cupy_with_autograd():
    """End to end in a fresh process: fastspike.neuron on CUDA tensors goes
    through the registered CuPy kernels (forced over compiled CUDA kernels
    where the library has them), on torch's current stream, with both
    gradients, and agrees with the reference."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent("""
        import torch, fastspike
        from fastspike.reference import neuron_reference
        gen = torch.Generator().manual_seed(0)
        x = (torch.randn(4, 3, 8, 5, generator=gen) * 0.8).cuda()
        thr = (torch.rand(8, generator=gen) + 0.5).cuda()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            out = fastspike.neuron(x, thr, group_size=2, signed=True)
        stream.synchronize()
        ref = neuron_reference(x, thr, group_size=2, signed=True, grad="none")
        assert torch.equal(out.spikes, ref.spikes) and torch.equal(out.v, ref.v), "forward"
        info = fastspike.backend_info()
        assert info["cupy"]["active"], info
        for grad in ("surrogate", "rate"):
            a = x.double().clone().requires_grad_()
            b = x.double().clone().requires_grad_()
            fastspike.neuron(a, thr, signed=True, grad=grad).spikes.square().sum().backward()
            neuron_reference(b, thr, signed=True, grad=grad).spikes.square().sum().backward()
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-11)
        print("ok", info["cupy"]["reason"])
    """)
    env = dict(os.environ)
    if fastspike.backend_info()["cuda_kernels"]:
        env["FASTSPIKE_CUPY"] = "force"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "ok" in result.stdout
