"""The ``fastspike`` command: demo, convert, eval, train, finetune, train-snn, bench, info.

Every subcommand has ``--help``. Mistakes a user can fix (a missing file, an
unknown model, T <= 0) end with one line on stderr and exit status 2, not a
traceback. ``fastspike eval`` runs data-parallel when started by ``torchrun``
(gloo on CPU, nccl on GPU) and reports the same metrics as one process.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import runpy
import sys
import tempfile
from typing import Any, Dict, Optional, Sequence

import torch

from .evaluate import evaluate_task
from .nn import NEURON_KINDS
from .models import TASKS
from .quant import PRESETS

__all__ = ["main"]

MAX_GROUP_SIZE = 2**20  # the neuron operator's limit on m
TUNE_SEED = 2  # the held-out tuning scenes of finetune (training uses seed 0, the demo's test scenes 1)


class UsageError(Exception):
    """A mistake in the command line or its files: printed as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (no usage block), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


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
    from .checkpoint import model_from_checkpoint, save_checkpoint

    ckpt = _load(args)
    ckpt["snn"] = {"time_steps": args.time_steps, "neuron": args.neuron, "group_size": args.group_size}
    # Rebuild before writing, so a checkpoint that does not convert leaves no file behind.
    snn = model_from_checkpoint(ckpt, args.checkpoint)
    save_checkpoint(ckpt, args.out)
    neurons = sum(1 for m in snn.modules() if type(m).__name__ == "SpikingNeuron")
    print(f"converted {ckpt['model']} ({neurons} spiking layers, T={args.time_steps}, {args.neuron}) -> {args.out}")
    return 0


# ---------------------------------------------------------------------------
# eval


def _dataset(data: str, task: str, image_size: int, num_images: int, num_classes: Optional[int] = None,
             classes: Optional[Sequence[str]] = None, image_set: str = "val"):
    """The evaluation set --data names: 'digits' or an ImageFolder path (classification);
    'scenes' or a PASCAL VOC folder (detection, segmentation), as (image, target) pairs."""
    if classes and not (task == "detection" and data != "scenes"):
        raise UsageError("--classes applies to detection models on a VOC folder only")
    if task == "classification":
        if data == "digits":
            from .data import digits

            return digits("test")
        from .data import image_folder

        return image_folder(data, image_size)
    if data == "scenes":
        from .data import SyntheticScenes

        return SyntheticScenes(num_images, image_size, seed=1)
    if not os.path.isdir(data):
        raise UsageError(f"--data for a {task} model must be 'scenes' (synthetic scenes) or a PASCAL VOC folder "
                         f"(VOCdevkit/VOC<year>/...), got {data!r}")
    from .data import VOC_CLASSES, DatasetError, VOCBoxes, VOCMasks, voc_detection, voc_segmentation

    if task == "segmentation":
        load, transforms = voc_segmentation, VOCMasks(image_size, num_classes)
    else:
        names = tuple(classes) if classes else VOC_CLASSES
        if num_classes is not None and len(names) != num_classes:
            given = "--classes names" if classes else "the default (the VOC classes) has"
            raise UsageError(f"the model detects {num_classes} classes but {given} {len(names)}; pass --classes "
                             f"with the model's {num_classes} class names in label order")
        if len(set(names)) != len(names):
            raise UsageError(f"--classes: expected distinct names, got {' '.join(names)}")
        load, transforms = voc_detection, VOCBoxes(image_size, names)
    try:
        return load(data, image_set=image_set, transforms=transforms)
    except ValueError as err:
        if isinstance(err, DatasetError):
            raise
        # torchvision's own check of image_set against the year (only VOC2007 has 'test')
        raise UsageError(f"--image-set {image_set!r}: {err}") from None


def _task_of(model_name: str) -> str:
    """The model registry's task of a checkpoint's model (fastspike.models.model_task)."""
    from .models import model_task

    try:
        return model_task(model_name)
    except ValueError as err:
        raise UsageError(str(err)) from None


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
        dataset = _dataset(args.data, task, args.image_size, args.num_images, ckpt["num_classes"], args.classes,
                           args.image_set)
        # Every rank takes every world-th sample: no padding, so no sample counts twice.
        shard = Subset(dataset, list(range(rank, len(dataset), world))) if distributed else dataset
        collate = None
        if task != "classification":
            from .data import collate_scenes

            collate = collate_scenes
        loader = DataLoader(shard, args.batch_size, num_workers=args.workers, collate_fn=collate)
        qnet = build_quantized(ckpt, args.checkpoint).to(device)
        # The detector's own anchors (a model_kwargs entry when it was built with others) decode its map.
        anchors = (ckpt.get("model_kwargs") or {}).get("anchors")
        rows = [{"model": f"quantized ANN (L={ckpt['levels']})", "T": None,
                 **evaluate_task(qnet, loader, task, ckpt["num_classes"], args.image_size, device, distributed,
                             anchors)}]
        # One run at max(T) gives every shorter T (the SNN is causal; fastspike.evaluate).
        snn = to_snn(qnet, max(args.T), args.neuron, group_size=args.group_size, readout="sequence").to(device)
        at_steps = evaluate_task(snn, loader, task, ckpt["num_classes"], args.image_size, device, distributed,
                             anchors, steps=args.T)
        for T in args.T:
            rows.append({"model": f"SNN {args.neuron}", "T": T, **at_steps[T]})
    finally:
        if distributed:
            dist.destroy_process_group()
    if rank == 0:
        metric = [k for k in rows[0] if k not in ("model", "T")][0]
        print(f"{'model':28s} {'T':>3s} {metric:>10s}")
        for r in rows:
            print(f"{r['model']:28s} {'' if r['T'] is None else r['T']:>3} {r[metric]:10.4f}")
        if args.out:
            _write_text(args.out, json.dumps({"checkpoint": args.checkpoint, "world_size": world, "rows": rows},
                                             indent=1), "--out")
    return 0


# ---------------------------------------------------------------------------
# train / finetune / train-snn


def _training_set(data: str, task: str, image_size: int, num_images: int):
    """(dataset, num_classes or None, model kwargs, collate_fn) of the training split of --data."""
    if task == "classification":
        if data == "digits":
            from .data import digits

            return digits("train"), 10, {"in_channels": 1}, None
        if data == "scenes":
            raise UsageError("--data for a classifier must be 'digits' or an ImageFolder path; 'scenes' is for "
                             "the detection and segmentation models")
        from .data import image_folder

        dataset = image_folder(data, image_size)
        return dataset, len(dataset.classes), {}, None
    if data != "scenes":
        raise UsageError(f"--data for a {task} model must be 'scenes' (synthetic scenes), got {data!r}")
    from .data import SyntheticScenes, collate_scenes

    return SyntheticScenes(num_images, image_size, seed=0), None, {}, collate_scenes


def _train_config(args: argparse.Namespace):
    from .train import TrainConfig

    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                         momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay,
                         schedule=args.schedule, label_smoothing=getattr(args, "label_smoothing", 0.0),
                         seed=args.seed, workers=args.workers)
    try:
        config.validate()
    except ValueError as err:
        raise UsageError(f"--{str(err).replace('_', '-')}") from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if config.batch_size % world:
        raise UsageError(f"--batch-size {config.batch_size} is the global batch: it must be divisible by the "
                         f"{world} processes")
    return config


_RESUME_OPTIONS = {"levels": "--levels", "preset": "--preset", "model": "MODEL", "data": "--data",
                   "image_size": "--image-size", "num_classes": "the classes of --data",
                   "model_kwargs": "the model arguments (from --data)", "world_size": "the number of processes"}


def _resume_error(err: Exception, path: str) -> "UsageError":
    """A ResumeError as one line naming the command-line options that differ."""
    changes = getattr(err, "changes", None)
    if not changes:
        return UsageError(str(err))
    what = ", ".join(f"{_RESUME_OPTIONS.get(k, '--' + k.replace('_', '-'))} {old!r} -> {new!r}"
                     for k, old, new in changes)
    return UsageError(f"--resume: resume needs the run's settings; {path!r} differs in {what} (resume with the "
                      "interrupted run's settings, or start a new run without --resume)")


def _print_history(history: Sequence[Dict[str, Any]]) -> None:
    for record in history:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


def cmd_train(args: argparse.Namespace) -> int:
    from .convert import quantize
    from .models import available_models, get_model
    from .train import ResumeError, train_model

    if args.model not in available_models():
        raise UsageError(f"unknown model {args.model!r}; available: {', '.join(available_models())}")
    if _task_of(args.model) != "classification":
        raise UsageError(f"fastspike train trains classifiers; for {args.model!r} call "
                         "fastspike.train.train_model with its loss_fn (e.g. models.yolo_loss)")
    dataset, num_classes, kwargs, _ = _training_set(args.data, "classification", args.image_size, 0)
    val = None
    if args.data == "digits":
        from .data import digits

        val = digits("test")
    config = _train_config(args)
    torch.manual_seed(args.seed)  # the same initial weights in every run (and on every rank)
    try:
        net = get_model(args.model, num_classes, **kwargs)
    except TypeError as err:  # e.g. torchvision models take no in_channels
        raise UsageError(f"model {args.model!r} cannot be built for --data {args.data!r}: {err}") from None
    qnet = quantize(net, levels=args.levels, preset=args.preset, threshold=args.threshold,
                    example_input=dataset[0][0].unsqueeze(0))
    try:
        history = train_model(qnet, dataset, config, val_set=val, device=torch.device(args.device),
                              checkpoint=args.out, resume=args.resume, progress=not args.no_progress,
                              checkpoint_meta={"model": args.model, "num_classes": num_classes,
                                               "model_kwargs": kwargs, "data": args.data,
                                               # (digits have their own size)
                                               "image_size": None if args.data == "digits" else args.image_size}, desc=f"train {args.model}")
    except ResumeError as err:
        raise _resume_error(err, args.out) from None
    if int(os.environ.get("RANK", "0")) == 0:
        _print_history(history)
        print(f"trained {args.model} ({args.preset}, L={args.levels}) -> {args.out}")
    return 0


def _snn_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """The conversion settings (-T, --neuron, --group-size) as a checkpoint stores them."""
    return {"time_steps": args.time_steps, "neuron": args.neuron, "group_size": args.group_size}


def _converted(args: argparse.Namespace, ckpt: Dict[str, Any]):
    """(quantized ANN, its SNN with -T/--neuron/--group-size, device) of the checkpoint, on --device."""
    from .checkpoint import build_quantized
    from .convert import to_snn

    device = torch.device(args.device)
    qnet = build_quantized(ckpt, args.checkpoint).to(device)
    snn = to_snn(qnet, args.time_steps, args.neuron, group_size=args.group_size).to(device)
    return qnet, snn, device


def _save_tuned(args: argparse.Namespace, ckpt: Dict[str, Any], qnet: torch.nn.Module,
                snn: torch.nn.Module) -> None:
    """Writes the tuned SNN to --out as its quantized ANN plus the conversion settings (the
    format of every fastspike checkpoint), so that load_model and fastspike eval rebuild it."""
    from .checkpoint import make_checkpoint, save_checkpoint
    from .finetune import write_back

    write_back(snn, qnet)
    save_checkpoint(make_checkpoint(ckpt["model"], ckpt["num_classes"], ckpt["levels"], ckpt["preset"], qnet,
                                    ckpt.get("model_kwargs"), snn=_snn_settings(args)), args.out)


def cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import finetune_layerwise

    ckpt = _load(args)
    task = _task_of(ckpt["model"])
    dataset, _, _, collate = _training_set(args.data, task, args.image_size, args.num_images)
    qnet, snn, device = _converted(args, ckpt)
    # Each layer's update is kept only if the task's metric did not drop (Fast-SNN's pipeline):
    # classifiers by their accuracy on the tuning data; detectors (mAP@0.5) and segmenters (mIoU)
    # on --tune-images held-out scenes of their own seed, neither trained nor tested on.
    metric_fn, metric = None, "train accuracy"  # classifiers: finetune_layerwise scores val_set
    weight = None
    if task == "detection" and args.readout_bias:
        from .models.yolo import DEFAULT_ANCHORS, detection_readout_weight

        num_anchors = len((ckpt.get("model_kwargs") or {}).get("anchors") or DEFAULT_ANCHORS)
        weight = detection_readout_weight(num_anchors, ckpt["num_classes"])
    if task != "classification":
        from torch.utils.data import DataLoader

        from .data import SyntheticScenes

        tune = DataLoader(SyntheticScenes(args.tune_images, args.image_size, seed=TUNE_SEED), args.batch_size,
                          collate_fn=collate)
        anchors = (ckpt.get("model_kwargs") or {}).get("anchors")
        metric = "held-out mAP@0.5" if task == "detection" else "held-out mIoU"

        def held_out_metric(model: torch.nn.Module) -> float:
            scores = evaluate_task(model, tune, task, ckpt["num_classes"], args.image_size, device, False, anchors)
            return next(iter(scores.values()))

        metric_fn = held_out_metric

    report = finetune_layerwise(snn, qnet, dataset, _train_config(args), force=args.force, collate_fn=collate,
                                val_set=dataset if task == "classification" else None, metric=metric_fn,
                                max_batches=args.max_batches, device=device, progress=not args.no_progress,
                                readout_bias=args.readout_bias, readout_weight=weight)
    _save_tuned(args, ckpt, qnet, snn)
    print(f"{'layer':16s} {'params':>8s} {'MSE first':>10s} {'MSE last':>10s} {metric + ' before':>22s} "
          f"{'after':>8s}  kept")
    for r in report:
        print(f"{r['layer']:16s} {r['parameters']:8d} {r['loss_first_epoch']:10.4g} {r['loss_last_epoch']:10.4g} "
              f"{r['metric_before']:22.4f} {r['metric_after']:8.4f}  {'yes' if r['kept'] else 'no'}")
    print(f"fine-tuned {ckpt['model']} (T={args.time_steps}, {args.neuron}) -> {args.out}")
    return 0


def _state_path(out: str) -> str:
    """Where train-snn keeps the run's state (the SNN's weights, optimizer, schedule, RNG, history)
    while it trains: next to --out, removed once --out is written."""
    return out + ".state"


def _sha256(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _classification_sets(args: argparse.Namespace, num_classes: int):
    """(training set, validation set, name of the validation set) for --data/--val-data, each
    checked to have the checkpoint's number of classes."""
    dataset, found, _, _ = _training_set(args.data, "classification", args.image_size, 0)
    if found != num_classes:
        raise UsageError(f"--data {args.data!r} has {found} classes, the checkpoint's classifier {num_classes}")
    if args.val_data is not None:
        if args.val_data == "digits":
            raise UsageError("--val-data is an ImageFolder path (with --data digits the test split is used)")
        val, found, _, _ = _training_set(args.val_data, "classification", args.image_size, 0)
        if found != num_classes:
            raise UsageError(f"--val-data {args.val_data!r} has {found} classes, the checkpoint's classifier "
                             f"{num_classes}")
        return dataset, val, args.val_data
    if args.data == "digits":
        from .data import digits

        return dataset, digits("test"), "digits test split"
    return dataset, dataset, f"{args.data} (the training images: no --val-data)"


def _check_resumable(state_path: str, run: Dict[str, Any]) -> None:
    """Refuses --resume when there is no interrupted run or it was started with another
    checkpoint, conversion or surrogate (the optimizer recipe is checked by train_model)."""
    from .checkpoint import load_checkpoint

    if not os.path.isfile(state_path):
        raise UsageError(f"--resume: no interrupted run to continue, {state_path!r} does not exist "
                         "(a finished run removes it)")
    saved = load_checkpoint(state_path).get("bptt") or {}
    names = {"model": "--model", "time_steps": "--time-steps", "neuron": "--neuron", "group_size": "--group-size",
             "surrogate": "--surrogate", "alpha": "--alpha"}
    changed = [f"{names[k]} {saved.get(k)!r} -> {v!r}" for k, v in run.items()
               if k in names and saved.get(k) != v]
    if saved.get("source_sha256") != run["source_sha256"]:
        changed.append("CHECKPOINT (another file: its sha256 differs)")
    if changed:
        raise UsageError(f"--resume needs the run's settings; {state_path!r} differs in {', '.join(changed)}")


def cmd_train_snn(args: argparse.Namespace) -> int:
    from .finetune import train_snn
    from .train import ResumeError, classification_accuracy

    ckpt = _load(args)
    task = _task_of(ckpt["model"])
    if task != "classification":
        raise UsageError(f"CHECKPOINT {args.checkpoint!r} holds the {task} model {ckpt['model']!r}: fastspike "
                         "train-snn trains classifiers (cross-entropy); for other models call "
                         "fastspike.finetune.train_snn with their loss_fn (e.g. fastspike.models.yolo_loss)")
    dataset, val, val_name = _classification_sets(args, ckpt["num_classes"])
    config = _train_config(args)
    state_path = _state_path(args.out)
    # What the saved state must share with this run, beyond the optimizer recipe.
    run = {"source_sha256": _sha256(args.checkpoint), "model": ckpt["model"], **_snn_settings(args),
           "surrogate": args.surrogate, "alpha": args.alpha}
    if args.resume:
        _check_resumable(state_path, run)
    qnet, snn, device = _converted(args, ckpt)
    before = classification_accuracy(snn, val, device=device)
    meta = {"model": ckpt["model"], "num_classes": ckpt["num_classes"], "model_kwargs": ckpt.get("model_kwargs"),
            "levels": ckpt["levels"], "preset": ckpt["preset"], "snn": _snn_settings(args), "bptt": run}
    try:
        history = train_snn(snn, dataset, config, surrogate=args.surrogate, alpha=args.alpha, val_set=val,
                            device=device, checkpoint=state_path, resume=args.resume, checkpoint_meta=meta,
                            progress=not args.no_progress, desc=f"train-snn {ckpt['model']} T={args.time_steps}")
    except ResumeError as err:
        raise _resume_error(err, state_path) from None
    if int(os.environ.get("RANK", "0")) == 0:
        _save_tuned(args, ckpt, qnet, snn)
        os.remove(state_path)  # --out now holds the result; the state only served an interrupted run
        _print_history(history)
        print(f"accuracy on {val_name}: before {before:.4f}, after {history[-1]['val_accuracy']:.4f}")
        print(f"trained SNN {ckpt['model']} (T={args.time_steps}, {args.neuron}, {args.surrogate} surrogate) "
              f"-> {args.out}")
    return 0


# ---------------------------------------------------------------------------
# bench


def cmd_bench(args: argparse.Namespace) -> int:
    from . import _build  # the checkout's benchmarks/, or the copy an installed wheel carries

    script = os.path.join(_build.BENCHMARKS, f"bench_{args.suite}.py")
    if not os.path.isfile(script):
        raise UsageError(f"benchmark script {script} not found (a checkout's benchmarks/ or the wheel's copy)")
    passed = list(args.bench_args)
    sys.argv = [script] + (passed[1:] if passed[:1] == ["--"] else passed)
    runpy.run_path(script, run_name="__main__")
    return 0


# ---------------------------------------------------------------------------


def _add_recipe_arguments(p: argparse.ArgumentParser, **defaults: Any) -> None:
    """The optimizer knobs shared by train, finetune and train-snn (fastspike.train.TrainConfig)."""
    p.add_argument("--epochs", type=_positive_int, default=defaults["epochs"])
    p.add_argument("--batch-size", type=_positive_int, default=defaults["batch_size"],
                   help="global batch (divided among torchrun processes)")
    p.add_argument("--optimizer", choices=["sgd", "adamw", "adam"], default=defaults["optimizer"])
    p.add_argument("--lr", type=float, default=defaults["lr"])
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--nesterov", action="store_true", help="SGD Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=defaults["weight_decay"])
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=_nonnegative_int, default=0, help="data-loading processes (0: in this one)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_tuning_arguments(p: argparse.ArgumentParser, done: str, data_help: str) -> None:
    """The checkpoint, conversion and data arguments shared by finetune and train-snn."""
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a quantized-ANN checkpoint (fastspike train, fastspike demo)")
    p.add_argument("--out", required=True, help=f"where to write the {done} checkpoint (with -T/--neuron)")
    p.add_argument("--time-steps", "-T", type=_positive_int, required=True)
    p.add_argument("--neuron", choices=sorted(NEURON_KINDS), default="signed")
    p.add_argument("--group-size", type=_positive_int, default=None, help="m, for the group kinds")
    p.add_argument("--data", default="digits", help=data_help)
    p.add_argument("--model", help="model name to build instead of the checkpoint's")
    p.add_argument("--image-size", type=_positive_int, default=64, help="image side for folders and scenes")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastspike", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train, convert and evaluate on digits and synthetic scenes")
    p.add_argument("--out", default="demo-results", help="folder for demo.json, demo.png, checkpoints")
    p.add_argument("--quick", action="store_true", help="the reduced run (seconds), as in the tests")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS))
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("convert", help="quantized-ANN checkpoint in, converted-SNN checkpoint out")
    p.add_argument("checkpoint", help="a fastspike checkpoint (e.g. demo-results/classification.pt)")
    p.add_argument("--out", required=True, help="where to write the converted checkpoint")
    p.add_argument("--model", help="model name to build instead of the checkpoint's (see fastspike.models)")
    p.add_argument("--time-steps", "-T", type=_positive_int, required=True)
    p.add_argument("--neuron", choices=sorted(NEURON_KINDS), default="signed")
    p.add_argument("--group-size", type=_positive_int, default=None, help="m, for the group kinds")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("eval", help="metrics of a checkpoint's quantized ANN and its SNNs at several T")
    p.add_argument("checkpoint")
    p.add_argument("--data", default="digits",
                   help="'digits' or an ImageFolder path (classification); 'scenes' or a PASCAL VOC folder "
                        "(VOCdevkit/VOC<year>, or the folder above it) for detection/segmentation")
    p.add_argument("--image-set", default="val", choices=["train", "trainval", "val", "test"],
                   help="VOC split (a list under ImageSets/Main or ImageSets/Segmentation)")
    p.add_argument("--classes", nargs="+", metavar="NAME",
                   help="VOC detection: object names in the model's label order (default: the 20 VOC classes)")
    p.add_argument("--T", type=_positive_int, nargs="+", default=[1, 2, 4, 8], help="time steps to evaluate (one SNN run at the largest gives them all)")
    p.add_argument("--neuron", choices=sorted(NEURON_KINDS), default="signed")
    p.add_argument("--group-size", type=_positive_int, default=None)
    p.add_argument("--model", help="model name to build instead of the checkpoint's")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--workers", type=_nonnegative_int, default=0, help="data-loading processes (0: in this one)")
    p.add_argument("--image-size", type=_positive_int, default=64, help="image side for folders and scenes")
    p.add_argument("--num-images", type=_positive_int, default=128, help="synthetic scenes to evaluate")
    p.add_argument("--out", help="also write the table as JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="quantization-aware training of a model on digits or an ImageFolder")
    p.add_argument("model", help="a fastspike.models name (classifiers), e.g. digits_cnn or cifar_resnet18")
    p.add_argument("--data", default="digits", help="'digits' or an ImageFolder path (one folder per class)")
    p.add_argument("--out", required=True, help="checkpoint, rewritten after every epoch")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run saved in --out")
    p.add_argument("--preset", choices=list(PRESETS), default="qcfs")
    p.add_argument("--levels", type=_positive_int, default=8, help="L, quantization levels")
    p.add_argument("--threshold", type=float, default=8.0, help="initial clip value λ of every quantizer")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--image-size", type=_positive_int, default=32, help="image side for ImageFolder data")
    _add_recipe_arguments(p, epochs=30, batch_size=64, optimizer="sgd", lr=0.05, weight_decay=5e-4)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="Fast-SNN layer-wise fine-tuning of a checkpoint's SNN")
    _add_tuning_arguments(p, "fine-tuned", "tuning data: 'digits', an ImageFolder path, or 'scenes' "
                          "(detection/segmentation)")
    p.add_argument("--force", action="store_true", help="keep every layer's update even if the metric drops")
    p.add_argument("--max-batches", type=_positive_int, default=None, help="batches per layer and epoch")
    # The defaults are the demo's splits: its 256 training scenes and 128 tuning scenes.
    p.add_argument("--num-images", type=_positive_int, default=256, help="synthetic scenes to tune on")
    p.add_argument("--tune-images", type=_positive_int, default=128,
                   help="held-out synthetic scenes (their own seed) that judge a detector's or segmenter's "
                        "layer updates by mAP@0.5 / mIoU")
    p.add_argument("--readout-bias", action="store_true",
                   help="first stage: shift the output layer's bias by the mean output error to the quantized "
                        "ANN (a detector's weighted by the ANN's objectness), judged like the layers and, "
                        "if kept, re-fitted after each layer before it is judged")
    _add_recipe_arguments(p, epochs=1, batch_size=64, optimizer="adam", lr=1e-3, weight_decay=0.0)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("train-snn", help="surrogate-gradient (BPTT) training of a classifier checkpoint's SNN, "
                       "end to end")
    _add_tuning_arguments(p, "trained", "training data: 'digits' or an ImageFolder path (one folder per class)")
    p.add_argument("--val-data", help="ImageFolder scored before and after (default: the digits test split for "
                   "--data digits, else the --data folder itself)")
    p.add_argument("--surrogate", choices=["sigmoid", "atan"], default="sigmoid", help="surrogate gradient shape")
    p.add_argument("--alpha", type=float, default=None,
                   help="surrogate sharpness (default 4 for sigmoid, 2 for atan)")
    p.add_argument("--resume", action="store_true",
                   help=f"continue the interrupted run saved in {_state_path('OUT')}")
    _add_recipe_arguments(p, epochs=1, batch_size=64, optimizer="adam", lr=1e-4, weight_decay=0.0)
    p.set_defaults(func=cmd_train_snn)

    p = sub.add_parser("bench", help="run benchmarks/bench_neurons.py, or bench_models.py with --suite models "
                       "(other arguments passed through)")
    p.add_argument("--suite", choices=["neurons", "models"], default="neurons",
                   help="neurons: the fused neuron operator (default); models: whole converted networks")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("info", help="versions, backend, CUDA build and GPUs")
    p.set_defaults(func=cmd_info)
    return parser


def _check_device(text: str) -> None:
    """--device: cpu, or cuda[:N] where such a GPU is present."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {text!r}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {text!r}: fastspike runs on cpu or cuda (cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text!r}: no CUDA GPU is available here (torch.cuda.is_available() is "
                             "False); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {text!r}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")


def _check_output_file(path: str, option: str) -> None:
    """An output file path that can be written, checked before any work."""
    if os.path.isdir(path):
        raise UsageError(f"{option} {path!r} is a directory; give the path of a file to write")
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):  # the folders that do not exist yet are made on writing
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{option} {path!r}: {existing!r} is a file, not a folder")
    try:  # a real probe: os.access says yes to root even where writing fails
        fd, probe = tempfile.mkstemp(prefix=".fastspike-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f"{option} {path!r}: cannot write in {existing!r}: {_os_reason(err)}") from None


def _write_text(path: str, text: str, option: str) -> None:
    """Writes a text file atomically (temporary file, then rename); a failure is one line naming ``option``."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise UsageError(f"{option} {path!r}: cannot write: {_os_reason(err)}") from None


def _os_reason(err: OSError) -> str:
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)) and "disk is full" not in reason:
        reason = f"{reason} (the disk is full)"
    return reason


_ALLOCATION_FAILURES = ("could not allocate", "can't allocate memory", "out of memory", "not enough memory")
_SIZE_OPTIONS = {"eval": "--T or --batch-size", "convert": "-T", "train": "--batch-size or --image-size",
                 "finetune": "-T or --batch-size", "train-snn": "-T or --batch-size", "demo": "the sizes"}


def _check_arguments(args: argparse.Namespace) -> None:
    """Checks that span several options, before any work: a group neuron needs
    --group-size >= 2 and the other kinds none; a quantizer's --threshold is > 0."""
    neuron = getattr(args, "neuron", None)
    if neuron is not None:
        group_size = getattr(args, "group_size", None)
        grouped = NEURON_KINDS[neuron].grouped
        if grouped and (group_size is None or group_size < 2):
            raise UsageError(f"--neuron {neuron} needs --group-size >= 2, got {group_size}")
        if not grouped and group_size not in (None, 1):
            kinds = " or ".join(k.name for k in NEURON_KINDS.values() if k.grouped)
            raise UsageError(f"--group-size applies to --neuron {kinds}, not {neuron}")
        if group_size is not None and group_size > MAX_GROUP_SIZE:
            raise UsageError(f"--group-size {group_size}: expected at most 2^20 = {MAX_GROUP_SIZE} members")
    device = getattr(args, "device", None)
    if device is not None:
        _check_device(device)
    out = getattr(args, "out", None)
    if out and args.command != "demo":
        _check_output_file(out, "--out")
        if args.command == "train-snn":
            _check_output_file(_state_path(out), "--out (its .state file)")
    alpha = getattr(args, "alpha", None)
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise UsageError(f"--alpha: expected a finite surrogate sharpness > 0, got {alpha}")
    threshold = getattr(args, "threshold", None)
    if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
        raise UsageError(f"--threshold: expected a finite value > 0, got {threshold}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .checkpoint import CheckpointError
    from .convert import ConversionError
    from .data import DatasetError

    parser = build_parser()
    # parse_known_args: `fastspike bench --quick` passes --quick through (a REMAINDER
    # positional alone does not take arguments that start with a dash)
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if unknown:
        args.bench_args = unknown + list(args.bench_args)
    try:
        _check_arguments(args)
        return args.func(args)
    # Mistakes a user can fix, each with its own type; anything else is a bug and keeps its traceback.
    except (UsageError, FileNotFoundError, CheckpointError, ConversionError, DatasetError) as err:
        message = " ".join(str(err).split())  # one line, even where a library's message has several
    except OSError as err:  # a file that cannot be written (a checkpoint save names its path)
        where = f"{err.filename!r}: " if err.filename and str(err.filename) not in (err.strerror or "") else ""
        message = f"{where}{' '.join(_os_reason(err).split())}"
    except (MemoryError, RuntimeError) as err:
        text = " ".join(str(err).split())
        if not isinstance(err, MemoryError) and not any(k in text.lower() for k in _ALLOCATION_FAILURES):
            raise  # anything else is a bug: keep its traceback
        message = (f"out of memory ({text or 'MemoryError'}); use a smaller "
                   f"{_SIZE_OPTIONS.get(args.command, 'size')}")
    print(f"fastspike {args.command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
