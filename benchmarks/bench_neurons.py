"""Benchmark of the fused multi-step neuron operator against its baselines.

Run from the repository root (after building the extension):

    python benchmarks/bench_neurons.py --quick          # small subset, well under a minute on 2 CPU cores
    python benchmarks/bench_neurons.py --headline       # the CPU target: float32, T=8, N=2^20, forward
    python benchmarks/bench_neurons.py                  # the full grid (hours on a small CPU)
    python benchmarks/bench_neurons.py --T 8 --N 20 22 --dtypes float32 --kinds signed \\
        --directions forward_backward --contenders fused reference

What it measures. For every configuration (T time steps, N neurons, dtype, neuron kind,
direction) the input is ``torch.randn(T, N) * 0.5`` (seeded) with threshold 1.0, and these
contenders are timed, interleaved round-robin for ``--rounds`` rounds (the median of the rounds is
reported, since shared machines are noisy); each sample repeats the call until it lasts at least
``--min-time`` seconds and records the time per call:

* ``fused``     fastspike.neuron (the compiled operator; one call for all T steps)
* ``fused_out`` fastspike.neuron(..., out=(spikes, v, count)) into preallocated buffers (forward only)
* ``reference`` fastspike.reference.neuron_reference, the eager PyTorch time loop
* ``compiled``  torch.compile of a function calling neuron_reference (grad "none" forward,
                "surrogate" forward+backward), compiled once per configuration (dynamic=False,
                dynamo reset in between) and warmed up before timing; the first call's wall time
                (tracing, compilation and one run) is reported as compile_s, and the number of
                graphs dynamo made as graphs (the reference's host-side threshold check breaks
                the graph)
* ``seed``      fastspike.reference.seed_style_loop, the boolean-mask loop of published Fast-SNN
                code (group_size 1, forward only)
* ``copy``      x.clone() and ``copy_out`` out.copy_(x): memory-bandwidth references (forward only)
* ``sj_torch``  SpikingJelly's multi-step ``IFNode(v_reset=None, step_mode="m")`` on the same tensor
                (its memory reset before every call; the IF kind only, since SpikingJelly's IF node has
                no negative spikes or groups): its torch implementation (on the CPU, the only one).
                forward_backward uses ``detach_reset=True`` and its default ``Sigmoid`` surrogate (the
                reset detached as fastspike's is). Skipped cleanly when SpikingJelly is not installed.
* ``sj_cuda``, ``sj_triton``, ``sj_cupy``  the same node on CUDA with the implementation forced:
                SpikingJelly 2.x's registered ``cuda`` (native) and ``triton`` kernels (chosen as
                ``SJ_IF_CUDA_IMPLEMENTATION`` would), or, in SpikingJelly versions whose nodes take a
                ``backend=`` argument (0.0.0.0.14), its ``cupy`` / ``triton`` backends; each skipped
                with the reason where the installed SpikingJelly lacks it or the device is the CPU.
                SpikingJelly starts the membrane at 0: ``sj_equals_fused`` in the JSON says whether
                its spikes equal fastspike.neuron(x, 1.0, init_fraction=0)'s.

Neuron kinds: ``if`` (group_size 1), ``signed`` (group_size 1, negative spikes), ``group``
(group_size 4). Directions: ``forward`` (under torch.no_grad()) and ``forward_backward`` (x
requires grad, grad="surrogate", loss = spikes.sum(), gradient of the loss w.r.t. x; forward and
backward timed together).

Effective bandwidth (GB/s, 1e9 bytes) divides a fixed byte count, the minimum traffic of the
operation (see BYTES_MODEL), by the median time; the same count is used for every neuron
contender, so GB/s compare like with like. Ratios: speedup of fused over reference, compiled and
seed (their time / fused time), and the bandwidth of fused_out (and fused) as a fraction of
copy_out's.

Output: a table on stdout, one row per configuration as it completes, and a JSON file (default
benchmarks/results/neurons-<device-slug>.json, rewritten atomically after every configuration so
that an interrupted run keeps what it measured). Per contender the JSON has median_s, min_s,
gbps (from median_s), samples (seconds per call, one per round) and iters (calls per sample), or
skipped with the reason.

--N takes exponents or counts: a value k <= 40 (or written 2^k) means 2^k neurons, a larger value
is the count itself. A contender whose single warm call takes longer than --max-seconds-per-call is
marked skipped for that configuration instead of being timed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import logging
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

import fastspike
from fastspike.reference import accumulation_dtype, neuron_reference, seed_style_loop

SJ_CONTENDERS = ("sj_torch", "sj_cuda", "sj_triton", "sj_cupy")
ALL_CONTENDERS = ("fused", "fused_out", "reference", "compiled", "seed", "copy", "copy_out") + SJ_CONTENDERS
FWD_BWD_CONTENDERS = ("fused", "reference", "compiled") + SJ_CONTENDERS
KINDS: Dict[str, Tuple[int, bool]] = {  # name -> (group_size, signed)
    "if": (1, False),
    "signed": (1, True),
    "group": (4, False),
}
DIRECTIONS = ("forward", "forward_backward")
DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
THRESHOLD = 1.0
SEED = 0

BYTES_MODEL = (
    "Bytes counted per call, with isz = itemsize of x's dtype and acc = itemsize of the "
    "accumulation dtype (4 for float16/bfloat16/float32, 8 for float64). "
    "forward: T*N*isz (x read) + T*N*isz (spikes written) + N*(acc + 4) (final v and int32 count "
    "written). forward_backward: forward + T*N*acc (membrane recorded by the forward) + "
    "T*N*isz (grad_spikes read) + T*N*acc (membrane read) + T*N*isz (grad_x written), plus for "
    "signed neurons 2*T*N (bool negative-spike mask written and read). copy/copy_out: 2*T*N*isz. "
    "gbps = bytes / median_s / 1e9; the neuron byte count is used for every neuron contender "
    "(fused, fused_out, reference, compiled, seed), whatever traffic they actually make."
)


# ----------------------------------------------------------------------------- configuration


def parse_n(value: str) -> int:
    """'20' or '2^20' -> 2**20; '5000' -> 5000."""
    text = value.strip()
    if text.startswith("2^"):
        return 2 ** int(text[2:])
    number = int(text)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"N must be positive, got {value}")
    return 2**number if number <= 40 else number


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time fastspike.neuron against the eager reference, torch.compile, the "
        "seed-style loop and copy baselines.",
    )
    parser.add_argument("--T", type=int, nargs="+", default=None, help="time steps (default 1 2 4 8 16 32)")
    parser.add_argument(
        "--N", type=parse_n, nargs="+", default=None,
        help="neurons per step: k <= 40 or 2^k means 2^k, larger values are counts "
        "(default 2^12 .. 2^22 in steps of 4x, plus 2^24 2^26 on CUDA)",
    )
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None)
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=None)
    parser.add_argument("--directions", nargs="+", choices=list(DIRECTIONS), default=None)
    parser.add_argument("--contenders", nargs="+", choices=list(ALL_CONTENDERS), default=None)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device())
    parser.add_argument(
        "--rounds", type=int, default=None, help="round-robin rounds per configuration (default 5; 3 with --quick)"
    )
    parser.add_argument(
        "--min-time", type=float, default=None,
        help="each sample repeats the call until it lasts at least this many seconds "
        "(default 0.05; 0.02 with --quick)",
    )
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch.set_num_threads for the run (default: torch's choice); on a small shared machine "
        "1 thread is often steadier, since a parallel region waits for a descheduled thread",
    )
    parser.add_argument(
        "--max-seconds-per-call", type=float, default=10.0,
        help="skip a contender in a configuration when one warm call takes longer (default 10)",
    )
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/neurons-<device>.json)")
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument(
        "--quick", action="store_true",
        help="T 4 8, N 2^16 2^20, float32, all kinds, forward, without compiled (explicit flags override)",
    )
    preset.add_argument(
        "--headline", action="store_true",
        help="the issue's CPU target: float32, T=8, N=2^20, forward, all kinds, all contenders",
    )
    return parser


def resolve_grid(args: argparse.Namespace) -> None:
    """Fills in the defaults (or the --quick/--headline presets) for unset grid flags."""
    if args.headline:
        preset: Dict[str, Any] = dict(
            T=[8], N=[2**20], dtypes=["float32"], kinds=list(KINDS), directions=["forward"],
            contenders=list(ALL_CONTENDERS),
        )
    elif args.quick:
        preset = dict(
            T=[4, 8], N=[2**16, 2**20], dtypes=["float32"], kinds=list(KINDS), directions=["forward"],
            contenders=[c for c in ALL_CONTENDERS if c != "compiled"], rounds=3, min_time=0.02,
        )
    else:
        exps = list(range(12, 23, 2)) + ([24, 26] if args.device == "cuda" else [])
        preset = dict(
            T=[1, 2, 4, 8, 16, 32], N=[2**e for e in exps], dtypes=list(DTYPES), kinds=list(KINDS),
            directions=list(DIRECTIONS), contenders=list(ALL_CONTENDERS),
        )
    preset.setdefault("rounds", 5)
    preset.setdefault("min_time", 0.05)
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


# ----------------------------------------------------------------------------- byte model


def neuron_bytes(T: int, N: int, dtype: torch.dtype, direction: str, signed: bool) -> int:
    isz = torch.empty((), dtype=dtype).element_size()
    acc = torch.empty((), dtype=accumulation_dtype(dtype)).element_size()
    total = 2 * T * N * isz + N * (acc + 4)
    if direction == "forward_backward":
        total += 2 * T * N * acc + 2 * T * N * isz + (2 * T * N if signed else 0)
    return total


def copy_bytes(T: int, N: int, dtype: torch.dtype) -> int:
    return 2 * T * N * torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------- contenders


def spikingjelly_version() -> Optional[str]:
    """The installed SpikingJelly's version, or None when it cannot be imported."""
    try:
        import spikingjelly.activation_based.neuron  # noqa: F401
        from importlib import metadata
    except Exception:  # not installed, or broken: the contenders are skipped
        return None
    try:
        return metadata.version("spikingjelly")
    except metadata.PackageNotFoundError:
        return "unknown"


def spikingjelly_if_call(name: str, x: torch.Tensor, direction: str) -> Callable[[], Any]:
    """A zero-argument callable running SpikingJelly's multi-step IFNode(v_reset=None) on ``x``
    with the implementation ``name`` names (one of SJ_CONTENDERS); raises RuntimeError with the
    reason when the installed SpikingJelly or the device cannot run it."""
    if spikingjelly_version() is None:
        raise RuntimeError("SpikingJelly is not installed")
    import inspect

    from spikingjelly.activation_based import neuron as sj_neuron

    impl = name.split("_", 1)[1]
    kw: Dict[str, Any] = dict(v_threshold=THRESHOLD, v_reset=None, step_mode="m",
                              detach_reset=direction == "forward_backward")
    force: Optional[Callable[[], None]] = None
    if "backend" in inspect.signature(sj_neuron.IFNode.__init__).parameters:  # 0.0.0.0.14 and early 2.x
        node = sj_neuron.IFNode(backend=impl, **kw)
        supported = tuple(getattr(node, "supported_backends", ()))
        if impl not in supported:
            raise RuntimeError(f"this SpikingJelly's IFNode has no {impl!r} backend (it has {supported})")
        if impl != "torch" and x.device.type != "cuda":
            raise RuntimeError(f"SpikingJelly's {impl} backend runs on CUDA only")
    else:  # 2.x with registered implementations: the CPU runs the torch one, CUDA picks cuda > triton > torch
        node = sj_neuron.IFNode(**kw)
        if x.device.type != "cuda":
            if impl != "torch":
                raise RuntimeError(f"SpikingJelly's {impl} implementation runs on CUDA only")
        else:
            force = _force_spikingjelly_cuda_impl(impl, x.device)
    node = node.to(x.device)

    def forward(x_seq: torch.Tensor) -> torch.Tensor:
        if force is not None:
            force()
        node.reset()  # each call starts from SpikingJelly's initial membrane, as fastspike's does
        return node(x_seq)

    if direction == "forward":
        return lambda: forward(x)
    xg = x.detach().requires_grad_(True)

    def fwd_bwd() -> torch.Tensor:
        (grad_x,) = torch.autograd.grad(forward(xg).sum(), xg)
        return grad_x

    return fwd_bwd


def _force_spikingjelly_cuda_impl(impl: str, device: torch.device) -> Callable[[], None]:
    """SpikingJelly 2.x picks its CUDA IF implementation once per device (cuda > triton > torch,
    or the one SJ_IF_CUDA_IMPLEMENTATION names at import): this selects ``impl`` as that variable
    would and returns a callable that installs it again before each call (contenders interleave)."""
    try:
        from spikingjelly._ops import if_ as sj_if

        selection = sj_if._selection
        requested, selections = selection._requested, selection._selections
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(f"cannot select SpikingJelly's {impl} implementation in this version: {exc}") from None
    if impl == "cupy":
        raise RuntimeError("this SpikingJelly (2.x registered kernels) has no cupy implementation")
    index = device.index if device.index is not None else torch.cuda.current_device()
    saved = dict(selections)
    try:
        selection._requested = impl
        selections.clear()
        chosen = selection._get_cuda_selection(device)
    finally:
        selection._requested = requested
        selections.clear()
        selections.update(saved)
    if chosen.name != impl:
        raise RuntimeError(f"SpikingJelly gave its {chosen.name} implementation when {impl} was asked")

    def install() -> None:
        selections[index] = chosen

    return install


def make_calls(
    name: str, x: torch.Tensor, group_size: int, signed: bool, direction: str
) -> Callable[[], Any]:
    """A zero-argument callable doing one timed unit of work for `name` (forward contenders run
    under no_grad; forward_backward ones compute d(spikes.sum())/dx)."""
    kw = dict(group_size=group_size, signed=signed)
    if name in SJ_CONTENDERS:
        return spikingjelly_if_call(name, x, direction)
    if direction == "forward":
        if name == "fused":
            return lambda: fastspike.neuron(x, THRESHOLD, **kw)
        if name == "fused_out":
            # every output preallocated, as an inference loop that reuses its buffers has it
            bufs = tuple(fastspike.neuron(x, THRESHOLD, **kw))
            return lambda: fastspike.neuron(x, THRESHOLD, out=bufs, **kw)
        if name == "reference":
            return lambda: neuron_reference(x, THRESHOLD, grad="none", **kw)
        if name == "compiled":
            # all three outputs, so that inductor cannot drop the work for the final v and count
            def forward_fn(x_seq: torch.Tensor) -> Tuple[torch.Tensor, ...]:
                return tuple(neuron_reference(x_seq, THRESHOLD, grad="none", **kw))

            compiled = torch.compile(forward_fn, dynamic=False)
            return lambda: compiled(x)
        if name == "seed":
            return lambda: seed_style_loop(x, THRESHOLD, signed)
        if name == "copy":
            return lambda: x.clone()
        if name == "copy_out":
            buf = torch.empty_like(x)
            return lambda: buf.copy_(x)
        raise ValueError(name)

    xg = x.detach().requires_grad_(True)
    if name == "fused":
        def fn(x_seq: torch.Tensor) -> fastspike.NeuronResult:
            return fastspike.neuron(x_seq, THRESHOLD, grad="surrogate", **kw)
    elif name == "reference":
        def fn(x_seq: torch.Tensor) -> fastspike.NeuronResult:
            return neuron_reference(x_seq, THRESHOLD, grad="surrogate", **kw)
    elif name == "compiled":
        def eager(x_seq: torch.Tensor) -> fastspike.NeuronResult:
            return neuron_reference(x_seq, THRESHOLD, grad="surrogate", **kw)

        fn = torch.compile(eager, dynamic=False)
    else:
        raise ValueError(f"{name} has no forward_backward variant")

    def fwd_bwd() -> torch.Tensor:
        loss = fn(xg)[0].sum()  # spikes; v and count are returned too, as from the fused op
        (grad_x,) = torch.autograd.grad(loss, xg)
        return grad_x

    return fwd_bwd


def applicable(name: str, direction: str, group_size: int) -> Optional[str]:
    """None if `name` runs in this configuration, else why not."""
    if direction == "forward_backward" and name not in FWD_BWD_CONTENDERS:
        return "forward only"
    if name == "seed" and group_size != 1:
        return "seed-style loop has no group neurons"
    return None


def sj_applicable(name: str, group_size: int, signed: bool, device: torch.device) -> Optional[str]:
    """None if the SpikingJelly contender ``name`` can run here, else why not (a skip reason)."""
    if spikingjelly_version() is None:
        return "SpikingJelly is not installed"
    if group_size != 1 or signed:
        return "SpikingJelly's IFNode has no negative spikes or groups (the if kind only)"
    if name != "sj_torch" and device.type != "cuda":
        return f"SpikingJelly's {name[3:]} implementation runs on CUDA only"
    return None


# ----------------------------------------------------------------------------- timing


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def run(self, call: Callable[[], Any], iters: int, no_grad: bool) -> float:
        """Seconds per call over `iters` back-to-back calls."""
        with torch.set_grad_enabled(not no_grad):
            self.sync()
            start = time.perf_counter()
            for _ in range(iters):
                call()
            self.sync()
            return (time.perf_counter() - start) / iters


def bench_config(
    T: int, N: int, dtype_name: str, kind: str, direction: str, args: argparse.Namespace,
    device: torch.device, timer: Timer,
) -> Dict[str, Any]:
    dtype = DTYPES[dtype_name]
    group_size, signed = KINDS[kind]
    no_grad = direction == "forward"
    gen = torch.Generator().manual_seed(SEED)
    x = (torch.randn(T, N, generator=gen) * 0.5).to(device=device, dtype=dtype)

    contenders: Dict[str, Dict[str, Any]] = {}
    calls: Dict[str, Callable[[], Any]] = {}
    iters: Dict[str, int] = {}
    if "compiled" in args.contenders:
        torch._dynamo.reset()  # one compilation per configuration; drop the previous shapes
    for name in args.contenders:
        reason = applicable(name, direction, group_size)
        if reason is not None:
            continue
        entry: Dict[str, Any] = {"median_s": None, "gbps": None, "samples": []}
        contenders[name] = entry
        if name in SJ_CONTENDERS:
            why = sj_applicable(name, group_size, signed, device)
            if why is not None:
                entry["skipped"] = why
                continue
        try:
            call = make_calls(name, x, group_size, signed, direction)
            if name == "compiled":
                torch._dynamo.utils.counters.clear()
            first = timer.run(call, 1, no_grad)  # compile (torch.compile) / allocator warm-up
            if name == "compiled":
                entry["compile_s"] = first
                entry["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            # the first call of the others already tells a too-slow contender
            warm = timer.run(call, 1, no_grad) if name == "compiled" or first <= args.max_seconds_per_call else first
        except Exception as exc:  # a failing contender must not stop the benchmark
            entry["skipped"] = f"error: {type(exc).__name__}: {exc}"
            continue
        if warm > args.max_seconds_per_call:
            entry["skipped"] = (
                f"one call took {warm:.2f} s > --max-seconds-per-call {args.max_seconds_per_call}"
            )
            continue
        calls[name] = call
        iters[name] = max(1, math.ceil(args.min_time / max(warm, 1e-9)))
        entry["iters"] = iters[name]

    for _ in range(args.rounds):
        for name, call in calls.items():
            contenders[name]["samples"].append(timer.run(call, iters[name], no_grad))

    neuron_b = neuron_bytes(T, N, dtype, direction, signed)
    for name, entry in contenders.items():
        if not entry["samples"]:
            continue
        entry["median_s"] = statistics.median(entry["samples"])
        entry["min_s"] = min(entry["samples"])
        nbytes = copy_bytes(T, N, dtype) if name in ("copy", "copy_out") else neuron_b
        entry["gbps"] = nbytes / entry["median_s"] / 1e9

    def median(name: str) -> Optional[float]:
        return contenders.get(name, {}).get("median_s")

    def gbps(name: str) -> Optional[float]:
        return contenders.get(name, {}).get("gbps")

    ratios: Dict[str, Optional[float]] = {}
    fused = median("fused")
    for base in ("reference", "compiled", "seed") + SJ_CONTENDERS:
        if base in contenders and not (base in SJ_CONTENDERS and "skipped" in contenders[base]):
            other = median(base)
            ratios[f"fused_speedup_vs_{base}"] = other / fused if fused and other else None
    sj_times = [median(n) for n in SJ_CONTENDERS if median(n)]
    if sj_times:
        ratios["fused_speedup_vs_fastest_sj"] = min(sj_times) / fused if fused else None
    if "copy_out" in contenders:
        copy_bw = gbps("copy_out")
        for name in ("fused_out", "fused"):
            if name in contenders:
                bw = gbps(name)
                ratios[f"{name}_bw_fraction_of_copy_out"] = bw / copy_bw if bw and copy_bw else None

    # SpikingJelly's node against fastspike's from SpikingJelly's initial membrane (0), bit for bit
    agreement: Dict[str, bool] = {}
    if direction == "forward":
        for name in SJ_CONTENDERS:
            if name in calls:
                with torch.no_grad():
                    ours = fastspike.neuron(x, THRESHOLD, group_size=group_size, signed=signed, init_fraction=0.0)
                    agreement[name] = bool(torch.equal(calls[name](), ours.spikes))
    del calls, x
    gc.collect()
    result = {
        "T": T, "N": N, "dtype": dtype_name, "kind": kind, "group_size": group_size, "signed": signed,
        "direction": direction, "bytes": neuron_b, "contenders": contenders, "ratios": ratios,
    }
    if agreement:
        result["sj_equals_fused"] = agreement
    return result


# ----------------------------------------------------------------------------- output


TABLE_CONTENDERS = ("fused", "fused_out", "reference", "compiled", "seed", "copy", "copy_out") + SJ_CONTENDERS
SHORT = {"fused_out": "f_out", "reference": "ref", "compiled": "comp", "copy_out": "c_out"}


def table_header(contenders: Sequence[str]) -> str:
    cols = [c for c in TABLE_CONTENDERS if c in contenders]
    head = f"{'T':>3} {'N':>9} {'dtype':>8} {'kind':>6} {'dir':>7} "
    head += " ".join(f"{SHORT.get(c, c) + ' ms':>10}" for c in cols)
    head += f" {'fused GB/s':>10} {'x ref':>7} {'x comp':>7} {'x seed':>7} {'x sj':>7} {'out/copy':>8}"
    return head


def _fmt_ms(entry: Optional[Dict[str, Any]]) -> str:
    if entry is None:
        return f"{'':>10}"
    if entry.get("median_s") is None:
        return f"{'skip':>10}"
    return f"{entry['median_s'] * 1e3:>10.3f}"


def _fmt_ratio(value: Optional[float], width: int = 7, pct: bool = False) -> str:
    if value is None:
        return f"{'-':>{width}}"
    return f"{value * 100:>{width - 1}.0f}%" if pct else f"{value:>{width - 1}.2f}x"


def table_row(result: Dict[str, Any], contenders: Sequence[str]) -> str:
    cols = [c for c in TABLE_CONTENDERS if c in contenders]
    direction = "fwd" if result["direction"] == "forward" else "fwd+bwd"
    row = f"{result['T']:>3} {result['N']:>9} {result['dtype']:>8} {result['kind']:>6} {direction:>7} "
    row += " ".join(_fmt_ms(result["contenders"].get(c)) for c in cols)
    fused_bw = result["contenders"].get("fused", {}).get("gbps")
    row += f" {fused_bw:>10.2f}" if fused_bw else f" {'-':>10}"
    r = result["ratios"]
    row += " " + _fmt_ratio(r.get("fused_speedup_vs_reference"))
    row += " " + _fmt_ratio(r.get("fused_speedup_vs_compiled"))
    row += " " + _fmt_ratio(r.get("fused_speedup_vs_seed"))
    row += " " + _fmt_ratio(r.get("fused_speedup_vs_fastest_sj"))
    row += " " + _fmt_ratio(r.get("fused_out_bw_fraction_of_copy_out"), 8, pct=True)
    return row


def write_json(path: str, payload: Dict[str, Any]) -> None:
    """Writes through a temporary file in the same directory and os.replace, so a reader (or an
    interrupted run) never sees a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".neurons-", suffix=".json.tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=1)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- main


def run_header(device: torch.device, argv: Optional[Sequence[str]]) -> Dict[str, Any]:
    """What every benchmark JSON starts with: the device, versions, backend,
    threads, date and the command-line arguments of the run."""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "backend": fastspike.backend_info(),
        "threads": torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv[1:] if argv is None else argv),
    }


def cpu_compute_scaling(threads: int, rounds: int = 7) -> Dict[str, float]:
    """How much faster a compute-bound op (torch.sin of 2^20 floats, cache
    resident) runs on `threads` threads than on one, interleaved, medians. On a
    shared VM whose vCPUs may share physical cores this is the ceiling of any
    thread scaling in the run; it is recorded so results can be read against it."""
    previous = torch.get_num_threads()
    x = torch.rand(1 << 20)
    out = torch.empty_like(x)
    times: Dict[int, List[float]] = {1: [], threads: []}
    try:
        for _ in range(rounds):
            for n in times:
                torch.set_num_threads(n)
                torch.sin(x, out=out)
                start = time.perf_counter()
                for _ in range(5):
                    torch.sin(x, out=out)
                times[n].append((time.perf_counter() - start) / 5)
    finally:
        torch.set_num_threads(previous)
    one, many = statistics.median(times[1]), statistics.median(times[threads])
    return {"threads": threads, "one_thread_s": one, "all_threads_s": many, "speedup": one / many}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no GPU", file=sys.stderr)
        return 2
    resolve_grid(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = device_name(device)
    out_path = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"neurons-{slug(name)}.json"
    )
    if "compiled" in args.contenders:
        # dynamic=False and a reset per configuration: one graph per shape, never a dynamic one.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        # the expected graph break (threshold check in the reference) would print a page per shape
        torch._logging.set_logs(dynamo=logging.ERROR)

    payload: Dict[str, Any] = {
        **run_header(device, argv),
        "settings": {
            "T": args.T, "N": args.N, "dtypes": args.dtypes, "kinds": args.kinds,
            "directions": args.directions, "contenders": args.contenders, "rounds": args.rounds,
            "min_time": args.min_time, "threads": args.threads, "max_seconds_per_call": args.max_seconds_per_call,
            "threshold": THRESHOLD, "input": f"torch.randn(T, N, generator seeded {SEED}) * 0.5",
            # PyTorch's switch for backing large CPU tensors with transparent huge
            # pages: it decides what a fresh output's page faults cost (README).
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
            "spikingjelly": spikingjelly_version(),
        },
        "bytes_model": BYTES_MODEL,
        "results": [],
    }
    if device.type == "cpu":
        payload["cpu_compute_scaling"] = cpu_compute_scaling(torch.get_num_threads())
    configs = [
        (T, N, dt, kind, direction)
        for direction in args.directions
        for dt in args.dtypes
        for kind in args.kinds
        for T in args.T
        for N in args.N
    ]
    timer = Timer(device)
    scaling = payload.get("cpu_compute_scaling")
    scaling_note = f" (compute scales {scaling['speedup']:.2f}x on them now)" if scaling else ""
    if device.type == "cpu":
        scaling_note += f", huge-page outputs {payload['backend']['cpu_huge_page_outputs']}"
    print(f"# {name} ({device.type}), torch {torch.__version__}, {torch.get_num_threads()} threads"
          f"{scaling_note}, backend {payload['backend']['backend']}; {len(configs)} configurations -> {out_path}")
    print(table_header(args.contenders), flush=True)
    started = time.perf_counter()
    for config in configs:
        result = bench_config(*config, args=args, device=device, timer=timer)
        payload["results"].append(result)
        print(table_row(result, args.contenders), flush=True)
        for cname, entry in result["contenders"].items():
            if "skipped" in entry:
                print(f"    {cname}: skipped ({entry['skipped']})", flush=True)
        payload["elapsed_s"] = time.perf_counter() - started
        write_json(out_path, payload)
    print(f"# {len(configs)} configurations in {time.perf_counter() - started:.1f} s; wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
