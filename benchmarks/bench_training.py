"""Training-step time of a converted CIFAR ResNet-18: the fused backward against the reference loop.

Run from the repository root (after building the extension):

    python benchmarks/bench_training.py --quick        # tiny, seconds on 2 CPU cores
    python benchmarks/bench_training.py                # CPU: width 16, batch 8, T 4; GPU: full ResNet-18, batch 64
    python benchmarks/bench_training.py --T 2 4 8 --batch 32 --width 64 --device cuda

What it measures. fastspike.models.get_model("cifar_resnet18", base_width=W) is quantized (QCFS,
L levels), calibrated on one random batch and converted (fastspike.to_snn, T steps, signed IF by
default). One training step is: zero the gradients, forward the batch through the SNN
(all T steps), cross-entropy, backward through time with the surrogate gradient, SGD step
(momentum 0.9); the device is synchronised before the clock stops. Contenders:

* ``fused``      the compiled operators (one forward and one backward call per layer for all T steps)
* ``reference``  the same model under ``fastspike.use_reference()``: the pure-PyTorch time loop,
                 its backward built by autograd

Each contender trains its own copy of the model. After one warm-up step each, the contenders are
timed interleaved round-robin for ``--rounds`` rounds (shared machines are noisy) and the median is
reported, with the ratio reference / fused. Output: a table and a JSON file (default
benchmarks/results/training-cpu.json on the CPU, training-<gpu>.json on a GPU) with the device
name, versions, configuration, every sample and the medians.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import fastspike
from fastspike.finetune import neuron_grad
from fastspike.nn import NEURON_KINDS
from fastspike.models import get_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_neurons import default_device, device_name, run_header, slug, write_json  # noqa: E402  (shared helpers)

CONTENDERS = ("fused", "reference")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--quick", action="store_true", help="tiny sizes (width 8, batch 4, 16 px, T 2, 3 rounds)")
    parser.add_argument("--T", type=int, nargs="+", default=None, help="time steps (default CPU 4, GPU 4 8)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default CPU 8, GPU 64)")
    parser.add_argument("--width", type=int, default=None, help="base_width (64 = ResNet-18; default CPU 16)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--levels", type=int, default=8)
    parser.add_argument("--neuron", choices=sorted(NEURON_KINDS), default="signed")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default CPU 5, GPU 20)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/training-<device>.json)")
    return parser


def resolve(args: argparse.Namespace, device: torch.device) -> None:
    gpu = device.type == "cuda"
    if args.quick:
        defaults = dict(T=[2], batch=4, width=8, rounds=3)
        args.image_size = min(args.image_size, 16)
    elif gpu:
        defaults = dict(T=[4, 8], batch=64, width=64, rounds=20)
    else:
        defaults = dict(T=[4], batch=8, width=16, rounds=5)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("batch", "width", "rounds", "image_size", "levels"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(t < 1 for t in args.T):
        raise SystemExit(f"--T values must be >= 1, got {args.T}")


def make_snn(args: argparse.Namespace, T: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    net = get_model("cifar_resnet18", 10, base_width=args.width)
    qnet = fastspike.quantize(net, levels=args.levels)
    fastspike.calibrate(qnet, [torch.rand(args.batch, 3, args.image_size, args.image_size)])
    group = 2 if args.neuron.endswith("group") else None
    snn = fastspike.to_snn(qnet, T, args.neuron, group_size=group).to(device).train()
    for p in snn.parameters():  # the biases that BN folding created come out frozen
        p.requires_grad_(True)
    return snn


class Contender:
    """One model copy with its optimizer; :meth:`step` times one training step."""

    def __init__(self, name: str, snn: torch.nn.Module, device: torch.device):
        self.name = name
        self.model = copy.deepcopy(snn)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.device = device
        self.samples: List[float] = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self._sync()
        start = time.perf_counter()
        with neuron_grad(self.model, "surrogate"):
            if self.name == "reference":
                with fastspike.use_reference():
                    loss = F.cross_entropy(self.model(x), y)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
            else:
                loss = F.cross_entropy(self.model(x), y)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
        self.optimizer.step()
        self._sync()
        return time.perf_counter() - start


def bench(args: argparse.Namespace, T: int, device: torch.device) -> Dict[str, Any]:
    snn = make_snn(args, T, device)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, 3, args.image_size, args.image_size, generator=g).to(device)
    y = torch.randint(10, (args.batch,), generator=g).to(device)
    contenders = [Contender(name, snn, device) for name in CONTENDERS]
    for c in contenders:
        c.step(x, y)  # warm-up: allocator, kernels, autograd graph caches
    for _ in range(args.rounds):
        for c in contenders:
            c.samples.append(c.step(x, y))
    result: Dict[str, Any] = {"T": T, "batch": args.batch, "width": args.width, "image_size": args.image_size,
                              "levels": args.levels, "neuron": args.neuron,
                              "spiking_layers": sum(isinstance(m, fastspike.SpikingNeuron) for m in snn.modules()),
                              "parameters": sum(p.numel() for p in snn.parameters())}
    for c in contenders:
        result[c.name] = {"median_s": statistics.median(c.samples), "min_s": min(c.samples), "samples": c.samples}
    result["speedup"] = result["reference"]["median_s"] / result["fused"]["median_s"]
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    resolve(args, device)
    name = device_name(device)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"training-{'cpu' if device.type == 'cpu' else slug(name)}.json")
    payload: Dict[str, Any] = {
        "benchmark": "training step of a converted CIFAR ResNet-18 (forward + BPTT backward + SGD step)",
        **run_header(device, argv), "fastspike": fastspike.__version__,
        "rounds": args.rounds, "quick": args.quick, "results": [],
    }
    print(f"{name}: cifar_resnet18 width {args.width}, batch {args.batch}, {args.image_size} px, "
          f"{args.neuron}, L={args.levels}, {args.rounds} rounds")
    print(f"{'T':>3s} {'fused ms':>10s} {'reference ms':>13s} {'speedup':>8s}")
    for T in args.T:
        row = bench(args, T, device)
        payload["results"].append(row)
        print(f"{T:3d} {row['fused']['median_s'] * 1e3:10.1f} {row['reference']['median_s'] * 1e3:13.1f} "
              f"{row['speedup']:7.2f}x")
        write_json(out, payload)  # after every T, so an interrupted run keeps what it measured
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
