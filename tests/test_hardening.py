"""Hardening (README "Reliability"): 64-bit indexing past 2^31 elements on the CPU
and on the CPU walk of the CUDA grid, concurrent calls from several threads,
bit-identical results across runs and thread counts, flat resident memory over
thousands of calls, safe checkpoint loading, and the FASTSPIKE_LIBRARY override
the sanitizer run (tools/sanitize.sh) uses."""

import ast
import glob
import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import fastspike
from fastspike import _backend

from conftest import NEURON_KINDS, assert_same_result, needs_extension
from test_build import ROOT, run_python

pytestmark = needs_extension()

SANITIZED = os.environ.get("FASTSPIKE_SANITIZED") == "1"


def mem_available_gib() -> float:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


# ----------------------------------------------------------------------------
# More than 2^31 elements: [T, N] float16 with T·N > 2^31 and N small (the state
# stays tiny), so that the flat offset t·N + n of the last rows does not fit in
# an int32. The input is a_n/8 per neuron up to the row where the offset
# crosses 2^31 and b_n/8 ≠ a_n/8 from there on (exact in float16 and float32,
# and < θ = 1), for which an IF neuron (v0 = 1/2) has the closed form
# c_t = ⌊(4 + 8·S_t)/8⌋ spikes after t steps, S_t the input summed so far, and
# v_T = 1/2 + S_T − c_T. Every value is checked against it (the reference loop
# would take hours); wrong reads past 2^31 change the final state, wrong
# writes leave the tail rows or the total spike count wrong.


def numerators(neurons: int):
    a = torch.arange(neurons, dtype=torch.int64) % 7 + 1  # 1..7
    return a, a % 7 + 1  # before and after the crossing row; never equal


def big_input(neurons: int) -> torch.Tensor:
    """[T, neurons] float16 with T·neurons = 2^31 + 2^18."""
    steps, crossing = (2**31 + 2**18) // neurons, 2**31 // neurons
    x = torch.empty(steps, neurons, dtype=torch.float16)
    for rows, num in zip((x[:crossing], x[crossing:]), numerators(neurons)):
        rows.copy_((num.to(torch.float16) / 8).expand_as(rows))
    assert x.numel() > 2**31
    return x


def check_big_result(spikes: torch.Tensor, v: torch.Tensor, count: torch.Tensor) -> None:
    steps, neurons = spikes.shape
    crossing = 2**31 // neurons
    a, b = numerators(neurons)

    def count_after(t: torch.Tensor) -> torch.Tensor:  # c_t for steps t (int64 [R]) -> [R, N]
        t = t.unsqueeze(1)
        eighths = a * t.clamp(max=crossing) + b * (t - crossing).clamp(min=0)
        return torch.div(4 + eighths, 8, rounding_mode="floor")

    final = 4 + a * crossing + b * (steps - crossing)
    assert torch.equal(count, torch.div(final, 8, rounding_mode="floor").to(torch.int32))
    assert torch.equal(v, (final % 8).to(torch.float32) / 8)
    # Rows past element 2^31 (the tail), across the crossing, and spread over the run.
    rows = torch.cat([torch.arange(steps - 4096, steps), torch.arange(crossing - 64, crossing + 64),
                      torch.linspace(0, steps - 1, 512, dtype=torch.float64).long()])
    assert torch.equal(spikes[rows], (count_after(rows + 1) - count_after(rows)).to(spikes.dtype))
    # Every spike: all spikes are 0 or 1 and there are as many as the final
    # counts say (count_nonzero is exact and streams; a float64 sum would be
    # 20x slower, and of the whole at once would copy it to float64, 17 GB).
    low, high = torch.aminmax(spikes)
    assert low.item() == 0 and high.item() == 1
    assert torch.count_nonzero(spikes).item() == count.sum(dtype=torch.int64).item()


def needs_free_gib(gib: float):
    return pytest.mark.skipif(
        SANITIZED or mem_available_gib() < gib,
        reason=f"needs {gib} GiB free for 2^31 float16 elements (MemAvailable is "
               f"{mem_available_gib():.1f} GiB); skipped under ASan (shadow memory, 3x slower)",
    )


@needs_free_gib(7)
def test_cpu_kernel_indexes_past_2_31_elements():
    """The CPU kernel (two 64-lane blocks in parallel) on 2^31 + 2^18 elements,
    spikes written in place over x (out=x: 4.3 GB in all)."""
    x = big_input(128)
    with torch.no_grad():
        result = fastspike.neuron(x, 1.0, out=x)
    check_big_result(result.spikes, result.v, result.count)


@needs_free_gib(11)
def test_cuda_grid_walk_indexes_past_2_31_elements():
    """The CUDA kernel body over the launcher's grid, walked on the CPU, on
    2^31 + 2^18 elements: x and the emulation's own spikes (8.6 GB). 4 neurons,
    so the vector path is 1 work item (one thread of 1 block x 256) whose
    offsets t·4 run past 2^31 contiguously: the walk is serial, and this is
    the shape it can stream through in seconds."""
    x = big_input(4)
    spikes, v, count, _, _, _ = torch.ops.fastspike._emulate_cuda_forward(
        x, torch.tensor(1.0), None, None, 1, False, 0.5, 1e-3, "none", 1, 256, 0)
    del x
    check_big_result(spikes, v, count)


def test_cuda_grid_walk_with_grids_larger_and_smaller_than_the_work():
    """Grid-stride loops visit every neuron exactly once whatever the grid:
    2^26 threads for 37 work items (indices past the work must do nothing),
    and 1 thread doing them all. (More than 2^31 neurons per step cannot be
    allocated here: their v and count alone take 17 GB; the index n and the
    grid-stride index are int64 in the kernels and in the walk.)"""
    x = torch.randn(3, 4 * 37) * 0.8
    expected = fastspike.neuron(x, 0.7, signed=True, group_size=2)
    for blocks, threads in [(2**16, 1024), (5, 3), (1, 1)]:
        for width in (1, 4):
            emulated = torch.ops.fastspike._emulate_cuda_forward(
                x, torch.tensor(0.7), None, None, 2, True, 0.5, 1e-3, "none", blocks, threads, width)
            assert_same_result(expected, emulated[:3])


# ----------------------------------------------------------------------------
# Concurrency and determinism

def workload(seed: int):
    """Forward (no grad), surrogate and rate backward on inputs large enough
    for the CPU kernels to split the work over threads."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 4, 16, 33, generator=gen) * 0.8
    threshold = torch.rand(16, generator=gen) + 0.5
    out = []
    for group_size, signed in NEURON_KINDS:
        with torch.no_grad():
            out.extend(fastspike.neuron(x, threshold, group_size=group_size, signed=signed))
        for grad in ("surrogate", "rate"):
            xg = x.clone().requires_grad_(True)
            spikes = fastspike.neuron(xg, threshold, group_size=group_size, signed=signed, grad=grad).spikes
            (spikes * torch.linspace(-1, 1, spikes.shape[-1])).sum().backward()
            out.extend([spikes.detach(), xg.grad])
    return out


def assert_all_equal(expected, actual) -> None:
    assert len(expected) == len(actual)
    for i, (e, a) in enumerate(zip(expected, actual)):
        assert e.dtype == a.dtype and torch.equal(e, a), f"output {i} differs"


def test_concurrent_calls_equal_serial_calls():
    seeds = list(range(8))
    serial = [workload(s) for s in seeds]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):  # several rounds, different interleavings
            concurrent = list(pool.map(workload, seeds))
            for s, c in zip(serial, concurrent):
                assert_all_equal(s, c)


def test_bit_identical_across_runs_and_thread_counts():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = workload(11)
        torch.set_num_threads(2)
        two = workload(11)
        again = workload(11)
    finally:
        torch.set_num_threads(before)
    assert_all_equal(one, two)
    assert_all_equal(two, again)


# ----------------------------------------------------------------------------
# Leaks: resident memory stays flat over thousands of calls.

LEAK_ROUNDS = 2000  # 3 calls each: 6000 calls
LEAK_TOLERANCE_MIB = 8.0

# Run in a fresh interpreter: inside the suite the heap holds whatever earlier
# tests freed, which would absorb (hide) a leak as well as the control below.
LEAK_SCRIPT = """
import gc, json, os, sys
import torch, fastspike

def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

rounds = int(sys.argv[1])
x = torch.randn(8, 2, 256) * 0.8  # 16 KB; every call allocates >= 8 KB of outputs
threshold = torch.rand(2, 256) + 0.5
bad_threshold = torch.ones(7)

def calls(n):
    for i in range(n):
        with torch.no_grad():
            fastspike.neuron(x, threshold, signed=True, group_size=1 + i % 3)
        xg = x.clone().requires_grad_(True)
        grad = "surrogate" if i % 2 else "rate"
        fastspike.neuron(xg, threshold, signed=True, group_size=2, grad=grad).spikes.sum().backward()
        try:  # the error path (a C++ exception through the dispatcher) must not leak either
            torch.ops.fastspike.neuron_forward(x, bad_threshold, None, None, 1, False, 0.5, 1e-3, "none")
        except ValueError:
            pass

calls(300)  # warm-up: allocator pools, autograd and dispatcher caches
gc.collect()
start = resident_mib()
calls(rounds)
gc.collect()
grown = resident_mib() - start
# Control: a leak of one 8 KB buffer per call (48 MB over 6000 calls).
kept = [torch.ones(2048) for _ in range(3 * rounds)]
control = resident_mib() - start - grown
print(json.dumps({"grown": grown, "control": control}))
"""


@pytest.mark.skipif(SANITIZED, reason="ASan's quarantine holds freed memory on purpose")
def test_resident_memory_stays_flat_over_thousands_of_calls():
    """Forward (no grad), both backwards and the error path, 6000 calls after a
    warm-up: resident memory grows < 8 MiB, while the same measurement sees a
    leak of 8 KB per call (the control), so the check can fail."""
    result = run_python(f"import sys; sys.argv = ['leak', '{LEAK_ROUNDS}']\n" + LEAK_SCRIPT, {})
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["grown"] < LEAK_TOLERANCE_MIB, \
        f"resident memory grew {measured['grown']:.1f} MiB over {LEAK_ROUNDS} rounds"
    assert measured["control"] > LEAK_TOLERANCE_MIB, f"statm does not see small leaks: {measured}"


# ----------------------------------------------------------------------------
# Kernel bugs found while hardening (regression tests)

COUNT_OVERFLOW = """
import torch, fastspike
from fastspike.reference import neuron_reference
x = torch.full((3, 5), 2.0)
count = torch.full((5,), 2**31 - 2, dtype=torch.int32)
actual = fastspike.neuron(x, 1.0, signed=True, count_init=count)
expected = neuron_reference(x, 1.0, signed=True, count_init=count, grad="none")
ok = all(torch.equal(a, e) for a, e in zip(actual, expected))
print(actual.spikes[:, 0].tolist(), expected.spikes[:, 0].tolist())
"""


def test_count_overflow_matches_reference():
    """Regression: the int32 count and k⁺ − k⁻ overflowed (UB) with count_init near 2^31;
    the count now wraps as torch's int32 arithmetic does and k⁺ − k⁻ is computed in acc_t."""
    if SANITIZED:  # in a subprocess: UBSan aborts the process it finds this in
        result = run_python(COUNT_OVERFLOW + "raise SystemExit(0 if ok else 1)", {})
        assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    else:
        scope = {}
        exec(COUNT_OVERFLOW, scope)
        assert scope["ok"], "count overflow: kernel and reference differ"


# ----------------------------------------------------------------------------
# Safe checkpoints and the operator library override

def torch_load_calls(path: str):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            yield node


def test_every_torch_load_in_the_package_is_weights_only():
    calls = []
    for path in glob.glob(os.path.join(ROOT, "fastspike", "**", "*.py"), recursive=True):
        for call in torch_load_calls(path):
            kwargs = {k.arg: k.value for k in call.keywords}
            where = f"{os.path.relpath(path, ROOT)}:{call.lineno}"
            weights_only = kwargs.get("weights_only")
            assert isinstance(weights_only, ast.Constant) and weights_only.value is True, \
                f"{where}: torch.load without weights_only=True"
            calls.append(where)
    assert calls, "no torch.load found: the check looks in the wrong place"


def test_library_override_loads_the_named_library():
    prebuilt = glob.glob(os.path.join(ROOT, "fastspike", "_C*.so"))
    if not prebuilt or SANITIZED:
        pytest.skip("needs the prebuilt library, and a process without the sanitized one")
    code = """
    import json, torch, fastspike
    info = fastspike.backend_info()
    x = torch.randn(4, 70)
    same = torch.equal(fastspike.neuron(x, 0.6, signed=True).spikes,
                       fastspike.neuron_reference(x, 0.6, signed=True, grad="none").spikes)
    print(json.dumps(dict(source=info["source"], library=info["library"], same=same)))
    """
    result = run_python(code, {"FASTSPIKE_LIBRARY": prebuilt[0]})
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info == dict(source="library", library=os.path.abspath(prebuilt[0]), same=True)
    # A named library that cannot be used is an error, never a silent fallback.
    with pytest.raises(ImportError, match="FASTSPIKE_LIBRARY must name an operator library file"):
        _backend._load_library("/nonexistent/lib.so")
    with pytest.raises(ImportError, match="could not be loaded"):
        _backend._load_library(__file__)  # not a shared library


@pytest.mark.skipif(not SANITIZED, reason="only in the sanitizer run (tools/sanitize.sh)")
def test_sanitized_library_is_the_one_loaded():
    info = fastspike.backend_info()
    assert info["source"] == "library"
    assert os.path.samefile(info["library"], os.environ["FASTSPIKE_LIBRARY"])
    maps = open("/proc/self/maps").read()
    assert "libasan" in maps and "fastspike/_C" not in maps
