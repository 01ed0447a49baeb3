"""The ``fastspike`` command: demo, convert, eval, bench, info.

Every subcommand has ``--help``. Mistakes a user can fix (a missing file, an
unknown model, T <= 0) end with one line on stderr and exit status 2, not a
traceback. ``fastspike eval`` runs data-parallel when started by ``torchrun``
(gloo on CPU, nccl on GPU) and reports the same metrics as one process.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

__all__ = ["main"]

_DETECTORS = ("tiny_yolov2", "yolov2_resnet34")
_SEGMENTERS = ("small_deeplab", "deeplabv3_resnet50")


class UsageError(Exception):
    """A mistake in the command line or its files: printed as one line."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# ---------------------------------------------------------------------------
# info


def cmd_info(args: argparse.Namespace) -> int:
    import fastspike

    info: Dict[str, Any] = {
        "fastspike": fastspike.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
        "backend": fastspike.backend_info(), "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "threads": torch.get_num_threads(),
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        info["torchvision"] = None
    print(json.dumps(info, indent=1))
    return 0


# ---------------------------------------------------------------------------
# demo


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    if args.tasks:
        cfg.tasks = tuple(args.tasks)
    run_demo(args.out, cfg, device=args.device)
    return 0


# ---------------------------------------------------------------------------
# convert


def _load(args: argparse.Namespace) -> Dict[str, Any]:
    """The checkpoint, with --model (when given) checked and put in place of its model name."""
    from .checkpoint import load_checkpoint
    from .models import available_models

    if args.model is not None and args.model not in available_models():
        raise UsageError(f"unknown model {args.model!r}; available: {', '.join(available_models())}")
    ckpt = load_checkpoint(args.checkpoint)
    if args.model is not None:
        ckpt["model"] = args.model
    return ckpt


def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import load_model, save_checkpoint

    ckpt = _load(args)
    ckpt["snn"] = {"time_steps": args.time_steps, "neuron": args.neuron, "group_size": args.group_size}
    save_checkpoint(ckpt, args.out)
    snn = load_model(args.out)  # rebuilding it proves the written file converts
    neurons = sum(1 for m in snn.modules() if type(m).__name__ == "SpikingNeuron")
    print(f"converted {ckpt['model']} ({neurons} spiking layers, T={args.time_steps}, {args.neuron}) -> {args.out}")
    return 0


# ---------------------------------------------------------------------------
# eval


def _dataset(data: str, task: str, image_size: int, num_images: int):
    if task == "classification":
        if data == "digits":
            from .data import digits

            return digits("test")
        from .data import image_folder

        return image_folder(data, image_size)
    if data != "scenes":
        raise UsageError(f"--data for a {task} model must be 'scenes' (synthetic scenes), got {data!r}")
    from .data import SyntheticScenes

    return SyntheticScenes(num_images, image_size, seed=1)


def _task_of(model_name: str) -> str:
    if model_name in _DETECTORS:
        return "detection"
    if model_name in _SEGMENTERS:
        return "segmentation"
    return "classification"


@torch.no_grad()
def _evaluate(model: torch.nn.Module, loader, task: str, num_classes: int, image_size: int,
              device: torch.device, distributed: bool) -> Dict[str, float]:
    import torch.distributed as dist

    model.eval()
    if task == "classification":
        counts = torch.zeros(2, dtype=torch.float64)
        for x, y in loader:
            counts[0] += (model(x.to(device)).argmax(1).cpu() == y).sum()
            counts[1] += y.numel()
        if distributed:
            counts = counts.to(device)
            dist.all_reduce(counts)
        return {"accuracy": (counts[0] / counts[1]).item()}
    if task == "segmentation":
        from .metrics import SegmentationMeter

        meter = SegmentationMeter(num_classes)
        for x, targets in loader:
            out = model(x.to(device))
            out = out["out"] if isinstance(out, dict) else out
            meter.update(out.argmax(1).cpu(), torch.stack([t["mask"] for t in targets]))
        if distributed:
            confusion = meter.confusion.to(device)
            dist.all_reduce(confusion)
            meter.confusion = confusion.cpu()
        return {"miou": meter.compute()["miou"]}
    from .metrics import mean_average_precision
    from .models.yolo import DEFAULT_ANCHORS, decode_yolo

    preds: List[Any] = []
    targets_all: List[Any] = []
    for x, targets in loader:
        preds += decode_yolo(model(x.to(device)).cpu(), DEFAULT_ANCHORS, num_classes, image_size)
        targets_all += targets
    if distributed:
        gathered: List[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (preds, targets_all))
        preds = [p for g in gathered for p in g[0]]
        targets_all = [t for g in gathered for t in g[1]]
    return {"mAP@0.5": mean_average_precision(preds, targets_all, num_classes)["map"]}


def cmd_eval(args: argparse.Namespace) -> int:
    import torch.distributed as dist
    from torch.utils.data import DataLoader, Subset

    from .checkpoint import build_quantized
    from .convert import to_snn

    ckpt = _load(args)
    task = _task_of(ckpt["model"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world > 1
    device = torch.device(args.device)
    if distributed:
        rank = int(os.environ["RANK"])
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    else:
        rank = 0
    try:
        dataset = _dataset(args.data, task, args.image_size, args.num_images)
        # Every rank takes every world-th sample: no padding, so no sample counts twice.
        shard = Subset(dataset, list(range(rank, len(dataset), world))) if distributed else dataset
        collate = None
        if task != "classification":
            from .data import collate_scenes

            collate = collate_scenes
        loader = DataLoader(shard, args.batch_size, num_workers=args.workers, collate_fn=collate)
        qnet = build_quantized(ckpt, args.checkpoint).to(device)
        rows = [{"model": f"quantized ANN (L={ckpt['levels']})", "T": None,
                 **_evaluate(qnet, loader, task, ckpt["num_classes"], args.image_size, device, distributed)}]
        for T in args.T:
            snn = to_snn(qnet, T, args.neuron, group_size=args.group_size).to(device)
            rows.append({"model": f"SNN {args.neuron}", "T": T,
                         **_evaluate(snn, loader, task, ckpt["num_classes"], args.image_size, device, distributed)})
    finally:
        if distributed:
            dist.destroy_process_group()
    if rank == 0:
        metric = [k for k in rows[0] if k not in ("model", "T")][0]
        print(f"{'model':28s} {'T':>3s} {metric:>10s}")
        for r in rows:
            print(f"{r['model']:28s} {'' if r['T'] is None else r['T']:>3} {r[metric]:10.4f}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"checkpoint": args.checkpoint, "world_size": world, "rows": rows}, f, indent=1)
    return 0


# ---------------------------------------------------------------------------
# bench


def cmd_bench(args: argparse.Namespace) -> int:
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                          "bench_neurons.py")
    if not os.path.isfile(script):
        raise UsageError(f"the benchmarks live in the source tree ({script} not found): run from a checkout")
    sys.argv = [script] + list(args.bench_args)
    runpy.run_path(script, run_name="__main__")
    return 0


# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastspike", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train, convert and evaluate on digits and synthetic scenes")
    p.add_argument("--out", default="demo-results", help="folder for demo.json, demo.png, checkpoints")
    p.add_argument("--quick", action="store_true", help="the reduced run (seconds), as in the tests")
    p.add_argument("--tasks", nargs="+", choices=["classification", "detection", "segmentation"])
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("convert", help="quantized-ANN checkpoint in, converted-SNN checkpoint out")
    p.add_argument("checkpoint", help="a fastspike checkpoint (e.g. demo-results/classification.pt)")
    p.add_argument("--out", required=True, help="where to write the converted checkpoint")
    p.add_argument("--model", help="model name to build instead of the checkpoint's (see fastspike.models)")
    p.add_argument("--time-steps", "-T", type=_positive_int, required=True)
    p.add_argument("--neuron", choices=["if", "signed", "group", "signed-group"], default="signed")
    p.add_argument("--group-size", type=_positive_int, default=None, help="m, for the group kinds")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("eval", help="metrics of a checkpoint's quantized ANN and its SNNs at several T")
    p.add_argument("checkpoint")
    p.add_argument("--data", default="digits",
                   help="'digits', an ImageFolder path (classification) or 'scenes' (detection/segmentation)")
    p.add_argument("--T", type=_positive_int, nargs="+", default=[1, 2, 4, 8], help="time steps to evaluate")
    p.add_argument("--neuron", choices=["if", "signed", "group", "signed-group"], default="signed")
    p.add_argument("--group-size", type=_positive_int, default=None)
    p.add_argument("--model", help="model name to build instead of the checkpoint's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--image-size", type=_positive_int, default=64, help="image side for folders and scenes")
    p.add_argument("--num-images", type=_positive_int, default=128, help="synthetic scenes to evaluate")
    p.add_argument("--out", help="also write the table as JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="run benchmarks/bench_neurons.py (arguments passed through)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("info", help="versions, backend, CUDA build and GPUs")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .checkpoint import CheckpointError
    from .convert import ConversionError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, FileNotFoundError, CheckpointError, ConversionError) as err:
        print(f"fastspike {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # e.g. an unknown model name in a checkpoint
        if "unknown model" in str(err) or "must be" in str(err):
            print(f"fastspike {args.command}: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
