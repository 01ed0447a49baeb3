"""Profiling entry point: one neuron-kernel configuration run a fixed number of times inside NVTX
ranges, for Nsight Compute / Nsight Systems, and a torch.profiler Chrome trace of a converted
model's forward.

    python benchmarks/profile_kernels.py --op signed --T 8 --N 2^20 --dtype float32 --direction forward
    python benchmarks/profile_kernels.py --direction backward --grad surrogate --op group --group-size 4
    python benchmarks/profile_kernels.py --trace trace.json --model cifar_resnet18 --T 4   # Chrome trace

The kernel mode builds x = torch.randn(T, N) * 0.5 (seeded), threshold 1.0, runs --warmup
untimed calls, then --iters calls, each inside an NVTX range "fastspike/<op>/<direction>/iter<i>"
within one outer range "fastspike" (torch.cuda.nvtx on CUDA; on the CPU the ranges are no-ops,
the timing still runs). --direction forward times fastspike.neuron under no_grad (one forward
launch per call); backward records one forward with grad once, outside the ranges, then runs the
backward operator alone (fastspike::neuron_backward_surrogate or ..._rate) per call, so the
profiler sees exactly one kernel per iteration. The median time per call is printed.

--trace FILE exports a torch.profiler trace (CPU activity, plus CUDA on --device cuda) of the
forward of a converted model (the models of bench_models.py, quantized, calibrated on random
images and converted with fastspike.to_snn) as Chrome trace JSON: open it in chrome://tracing or
https://ui.perfetto.dev.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Any, Callable, Iterator, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastspike  # noqa: E402
from fastspike.reference import accumulation_dtype  # noqa: E402

from bench_neurons import DTYPES, KINDS, default_device, parse_n  # noqa: E402

SCRIPT = "benchmarks/profile_kernels.py"
NSIGHT_EPILOG = f"""\
Nsight commands (run from the repository root on a GPU machine):

  # Nsight Systems: timeline of the --iters calls only (the capture starts and stops at the
  # outer NVTX range "fastspike")
  nsys profile --trace=cuda,nvtx --capture-range=nvtx --nvtx-capture=fastspike \\
      --capture-range-end=stop -o fastspike-neuron -f true \\
      python {SCRIPT} --device cuda --op signed --T 8 --N 2^24 --dtype float32 --direction forward

  # Nsight Compute: every kernel launched inside the "fastspike" range, full metric set
  ncu --nvtx --nvtx-include "fastspike/" --set full -o fastspike-neuron -f \\
      python {SCRIPT} --device cuda --op signed --T 8 --N 2^24 --dtype float32 --direction forward --iters 3

  # Nsight Compute on the backward kernel alone
  ncu --nvtx --nvtx-include "fastspike/" -k regex:neuron_backward --set full -o fastspike-backward -f \\
      python {SCRIPT} --device cuda --direction backward --grad surrogate --iters 3

  # torch.profiler Chrome trace of a converted model's forward
  python {SCRIPT} --device cuda --trace trace.json --model cifar_resnet18 --T 4
"""


@contextlib.contextmanager
def nvtx_range(name: str, enabled: bool) -> Iterator[None]:
    """An NVTX range on CUDA (torch.cuda.nvtx), nothing on the CPU."""
    if enabled:
        torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        if enabled:
            torch.cuda.nvtx.range_pop()


def kernel_call(args: argparse.Namespace, device: torch.device) -> Callable[[], Any]:
    """The one operation to profile, ready to be called repeatedly."""
    group_size, signed = KINDS[args.op]
    if args.op == "group":
        group_size = args.group_size
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(args.T, args.N, generator=gen) * 0.5).to(device=device, dtype=DTYPES[args.dtype])
    if args.direction == "forward":
        def forward() -> Any:
            with torch.no_grad():
                return fastspike.neuron(x, 1.0, group_size=group_size, signed=signed)
        return forward
    if fastspike.backend_info()["backend"] != "extension":
        raise SystemExit("profile_kernels.py: --direction backward runs the compiled backward operator, "
                         "but the extension is not loaded (see fastspike.backend_info())")
    threshold = torch.tensor(1.0, dtype=accumulation_dtype(x.dtype), device=device)
    _, _, _, membrane, negative_open, mean = torch.ops.fastspike.neuron_forward(
        x, threshold, None, None, group_size, signed, 0.5, 1e-3, args.grad)
    grad_spikes = torch.randn(x.shape, generator=gen).to(device=device, dtype=x.dtype)
    if args.grad == "surrogate":
        return lambda: torch.ops.fastspike.neuron_backward_surrogate(
            grad_spikes, None, membrane, negative_open, threshold, group_size, signed, 1e-3, "sigmoid", 4.0)
    return lambda: torch.ops.fastspike.neuron_backward_rate(grad_spikes, mean, threshold)


def profile_kernel(args: argparse.Namespace, device: torch.device) -> List[float]:
    """Runs the configuration --warmup + --iters times; returns the seconds of each timed call."""
    call = kernel_call(args, device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        call()
    sync()
    times = []
    label = f"fastspike/{args.op}/{args.direction}/T{args.T}/N{args.N}/{args.dtype}"
    with nvtx_range("fastspike", cuda):
        for i in range(args.iters):
            start = time.perf_counter()
            with nvtx_range(f"{label}/iter{i}", cuda):
                call()
            sync()
            times.append(time.perf_counter() - start)
    return times


def export_trace(args: argparse.Namespace, device: torch.device) -> str:
    """A torch.profiler Chrome trace of one forward of a converted model; returns the path."""
    from bench_models import build_quantized, convert  # noqa: E402 (shares the model setup)

    qnet, x = build_quantized(args.model, args.levels, args.batch, device)
    snn = convert(qnet, args.T, args.neuron, {})
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.no_grad():
        for _ in range(max(1, args.warmup)):
            snn(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
            with torch.profiler.record_function(f"fastspike/{args.model}/T{args.T}/forward"):
                snn(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    directory = os.path.dirname(os.path.abspath(args.trace))
    os.makedirs(directory, exist_ok=True)
    prof.export_chrome_trace(args.trace)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return args.trace


def build_parser() -> argparse.ArgumentParser:
    from bench_models import MODELS  # noqa: E402

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=NSIGHT_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=list(KINDS), default="signed", help="neuron kind (default signed)")
    parser.add_argument("--group-size", type=int, default=4, help="m for --op group (default 4)")
    parser.add_argument("--T", type=int, default=8, help="time steps (default 8)")
    parser.add_argument("--N", type=parse_n, default=2**20, help="neurons: k <= 40 or 2^k means 2^k (default 2^20)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--direction", choices=["forward", "backward"], default="forward")
    parser.add_argument("--grad", choices=["surrogate", "rate"], default="surrogate",
                        help="which backward operator --direction backward runs (default surrogate)")
    parser.add_argument("--iters", type=int, default=20, help="timed calls inside the NVTX range (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before them (default 3)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device())
    parser.add_argument("--trace", default=None, metavar="FILE",
                        help="instead: write a torch.profiler Chrome trace of a converted model's forward")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny_cnn", help="model for --trace")
    parser.add_argument("--batch", type=int, default=2, help="images for --trace (default 2)")
    parser.add_argument("--levels", type=int, default=8, help="quantization levels for --trace (default 8)")
    parser.add_argument("--neuron", choices=sorted(fastspike.convert.NEURON_KINDS), default="if",
                        help="neuron kind of the converted model for --trace (default if)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("profile_kernels.py: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    for name in ("T", "iters", "batch", "group_size", "levels"):
        if getattr(args, name) < 1:
            print(f"profile_kernels.py: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    device = torch.device(args.device)
    if args.trace:
        path = export_trace(args, device)
        print(f"wrote the Chrome trace of {args.model} (T={args.T}, batch {args.batch}) to {path}")
        return 0
    times = profile_kernel(args, device)
    print(f"{args.op} {args.direction} T={args.T} N={args.N} {args.dtype} on {device}: "
          f"median {statistics.median(times) * 1e3:.3f} ms, min {min(times) * 1e3:.3f} ms over {len(times)} calls "
          f"(NVTX ranges {'on' if device.type == 'cuda' else 'off: CPU'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
