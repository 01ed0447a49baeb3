"""``fastspike demo``: the whole story on data that needs no download.

1. Classification: a small CNN on the scikit-learn digits is trained, quantized
   (QCFS), calibrated and fine-tuned, then converted with IF, signed IF and
   group neurons and evaluated at several T.
2. Detection: a small Tiny-YOLOv2 on synthetic scenes, the same path, mAP@0.5.
3. Segmentation: a small DeepLab on the same scenes, mean IoU.

Every task then runs Fast-SNN's pipeline to its end, once for each T of the table: the
quantization-aware-trained network converted with signed IF neurons for T steps first has its
output layer's bias shifted by the mean output error to the quantized ANN (``readout_bias``; the
detector's weighted by the ANN's objectness), then is tuned layer by layer at that T
(:func:`fastspike.finetune.finetune_layerwise`, the bias re-fitted after each layer), each stage
kept only if the task's own metric on a held-out tuning split did not drop, and is evaluated on
the test split at that T ("SNN signed fine-tuned" rows; dashed curves in the plot). Fast-SNN
tunes at the T the SNN runs (T = L); an SNN tuned at T = L and run for fewer steps keeps
corrections made for L steps.

Each SNN of every neuron kind is converted and run once, at max(T),
with ``readout="sequence"``: the converted SNN is causal, so the mean of its first t steps is
the t-step SNN's output (:mod:`fastspike.evaluate`), and every T's row comes from that one run.
Each neuron kind's row at T = L (at max(T) if L is not among the Ts) also reports images per
second with the fused kernels and with the pure-PyTorch time loop they replace (the mean-readout
SNN at that T, :func:`fastspike.use_reference`). The table is printed and saved as JSON, with a
PNG plot of each metric against T.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .checkpoint import make_checkpoint, save_checkpoint
from .convert import calibrate, quantize, to_snn
from .ops import backend_info, use_reference
from .train import TrainConfig, train_model

__all__ = ["DemoConfig", "run_demo"]


@dataclass
class DemoConfig:
    """Sizes of the demo; :meth:`quick` is the reduced run of the test suite."""

    time_steps: Sequence[int] = (1, 2, 4, 8)
    levels: int = 8
    neurons: Sequence[str] = ("if", "signed", "group")
    group_size: int = 2
    digits_epochs: int = 30
    digits_finetune_epochs: int = 15
    scenes_train: int = 256
    scenes_test: int = 512
    scene_size: int = 64
    detect_epochs: int = 15
    segment_epochs: int = 10
    tasks: Sequence[str] = ("classification", "detection", "segmentation")
    batch_size: int = 64
    timing_batch: int = 64
    seed: int = 0
    # Fast-SNN's layer-wise fine-tuning of the converted SNNs (of these neuron kinds, at each T,
    # each evaluated at its T): the readout bias correction, then each layer's MSE to the quantized
    # ANN, on `finetune_batches` training batches of `finetune_batch_size`, each stage kept if the
    # task's metric on the held-out tuning split (digits: the last `digits_tune` training images,
    # left out of training; scenes: `scenes_tune` scenes of their own seed) did not drop.
    finetune_neurons: Sequence[str] = ("signed",)
    finetune_epochs: int = 1
    finetune_batches: int = 8  # scenes: all 256 training scenes (the readout bias is a mean; 128 left it noisy)
    finetune_batch_size: int = 32
    finetune_lr: float = 1e-3
    digits_tune: int = 300
    scenes_tune: int = 128

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(time_steps=(1, 4), levels=4, digits_epochs=3, digits_finetune_epochs=1,
                   scenes_train=32, scenes_test=16, scene_size=32, detect_epochs=1, segment_epochs=1,
                   timing_batch=16, finetune_batches=1, finetune_batch_size=16, digits_tune=64, scenes_tune=8)


# ---------------------------------------------------------------------------
# Training and timing


def _fit(model: nn.Module, task: "_Task", cfg: DemoConfig, epochs: int, lr: float, desc: str,
         device: torch.device) -> None:
    """Adam with a cosine schedule over all steps, in float32 as the demo always trained
    (fastspike.train.train_model, one progress bar)."""
    config = TrainConfig(epochs=epochs, batch_size=cfg.batch_size, optimizer="adam", lr=lr, weight_decay=0.0,
                         seed=cfg.seed, amp=False)
    train_model(model, task.train_set, config, loss_fn=task.loss, collate_fn=task.collate, device=device, desc=desc)


@torch.no_grad()
def _images_per_second(model: nn.Module, x: torch.Tensor, repeats: int = 3) -> float:
    model(x)  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        best = min(best, time.perf_counter() - start)
    return x.shape[0] / best


class _Meter:
    """A task's metric accumulated over batches: ``update(output, targets)``, ``value()``."""

    def update(self, output: Any, targets: Any) -> None:
        raise NotImplementedError

    def value(self) -> float:
        raise NotImplementedError


@dataclass
class _Task:
    name: str
    metric: str
    train_set: Dataset
    test_set: Dataset
    tune_set: Dataset  # held out from training and testing: judges the layer-wise fine-tuning
    collate: Optional[Callable]
    model_name: str  # a fastspike.models.get_model name, so the checkpoint reloads
    num_classes: int
    model_kwargs: Dict[str, Any]
    loss: Callable[[Any, Any], torch.Tensor]
    meter: Callable[[], _Meter]
    epochs: int
    finetune_epochs: int
    lr: float
    # weights of the outputs for the readout bias correction (None: all alike)
    readout_weight: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, steps: Optional[Sequence[int]] = None) -> Any:
        """The metric of ``model`` on ``loader``; with ``steps``, ``model`` is an SNN converted with
        ``readout="sequence"`` at T = max(steps) and the result is {t: metric of the t-step SNN},
        all from one run (:func:`fastspike.evaluate.prefix_views`)."""
        from .evaluate import prefix_views

        device = next(model.parameters()).device
        keys: List[Any] = sorted(set(steps)) if steps else [None]
        meters = {k: self.meter() for k in keys}
        was_training = model.training
        model.eval()
        try:
            for x, targets in loader:
                out = model(x.to(device))
                for k, view in (prefix_views(out, keys) if steps else {None: out}).items():
                    meters[k].update(view, targets)
        finally:
            model.train(was_training)
        values = {k: m.value() for k, m in meters.items()}
        return values if steps else values[None]


def _cached(dataset: Dataset) -> List[Any]:
    """The dataset's items, generated once: the synthetic scenes are drawn on every access,
    which cost the demo more than half a minute when every epoch and evaluation redrew them."""
    return [dataset[i] for i in range(len(dataset))]


def _speed_steps(cfg: DemoConfig) -> int:
    """The T at which the demo times the SNNs: T = L (Fast-SNN's setting), or max(T) if L is
    not among the Ts."""
    return cfg.levels if cfg.levels in cfg.time_steps else max(cfg.time_steps)


def fast_snn_finetune(task: _Task, cfg: DemoConfig, qnet: nn.Module, kind: str, T: int, device: torch.device,
                      snn: Optional[nn.Module] = None, **options: Any) -> Any:
    """The demo's Fast-SNN fine-tuning of ``qnet``'s ``kind`` SNN at ``T`` steps (or of ``snn``, an
    SNN converted from ``qnet``): the readout bias first, then each layer (re-fitting the bias),
    every stage judged by the task's metric on the tuning split. ``options`` override
    :func:`fastspike.finetune.finetune_layerwise`'s arguments (benchmarks/finetune_variants.py
    compares variants). Returns (snn, report)."""
    from .finetune import finetune_layerwise

    tune = DataLoader(task.tune_set, cfg.batch_size, collate_fn=task.collate)
    recipe = TrainConfig(epochs=cfg.finetune_epochs, batch_size=cfg.finetune_batch_size, optimizer="adam",
                         lr=cfg.finetune_lr, weight_decay=0.0, seed=cfg.seed)
    settings = dict(metric=lambda m: task.evaluate(m, tune), collate_fn=task.collate, max_batches=cfg.finetune_batches,
                    device=device, progress=False, readout_bias=True, readout_weight=task.readout_weight)
    settings.update(options)
    snn = to_snn(qnet, T, kind) if snn is None else snn
    return snn, finetune_layerwise(snn, qnet, task.train_set, recipe, **settings)


def _run_task(task: _Task, cfg: DemoConfig, device: torch.device, out_dir: str) -> List[Dict[str, Any]]:
    from .finetune import write_back
    from .models import get_model

    torch.manual_seed(cfg.seed)
    train = DataLoader(task.train_set, cfg.batch_size, shuffle=True, collate_fn=task.collate,
                       generator=torch.Generator().manual_seed(cfg.seed))
    test = DataLoader(task.test_set, cfg.batch_size, collate_fn=task.collate)
    timing_x = next(iter(DataLoader(task.test_set, cfg.timing_batch, collate_fn=task.collate)))[0].to(device)
    steps = sorted(set(cfg.time_steps))
    t_speed = _speed_steps(cfg)
    rows: List[Dict[str, Any]] = []

    def row(model_name: str, T: Optional[int], value: float, **extra: Any) -> Dict[str, Any]:
        r = {"task": task.name, "metric": task.metric, "model": model_name, "T": T, "value": value, **extra}
        rows.append(r)
        return r

    def timed(model: nn.Module, reference: bool = False) -> Dict[str, float]:
        speed = {"images_per_s": _images_per_second(model, timing_x)}
        if reference:
            with use_reference():
                speed["images_per_s_reference"] = _images_per_second(model, timing_x, repeats=1)
            speed["speedup"] = speed["images_per_s"] / speed["images_per_s_reference"]
        return speed

    def snn_rows(model_name: str, kind: str, group: Optional[int]) -> None:
        # One conversion and one run at max(T); the t-step SNN is the mean of the first t steps.
        seq = to_snn(qnet, steps[-1], kind, group_size=group, readout="sequence")
        values = task.evaluate(seq, test, steps)
        timing = timed(to_snn(qnet, t_speed, kind, group_size=group), reference=True)
        for T in cfg.time_steps:
            row(model_name, T, values[T], **(timing if T == t_speed else {}))

    ann = get_model(task.model_name, task.num_classes, **task.model_kwargs).to(device)
    _fit(ann, task, cfg, task.epochs, task.lr, f"{task.name}: ANN", device)
    row("ANN", None, task.evaluate(ann, test), **timed(ann))

    qnet = quantize(ann, levels=cfg.levels)
    calibrate(qnet, train, percentile=99.9, max_batches=8, device=device)
    _fit(qnet, task, cfg, task.finetune_epochs, task.lr / 10, f"{task.name}: quantized ANN", device)
    row(f"quantized ANN (L={cfg.levels})", None, task.evaluate(qnet, test), **timed(qnet))
    ckpt = make_checkpoint(task.model_name, task.num_classes, cfg.levels, "qcfs", qnet, task.model_kwargs)
    save_checkpoint(ckpt, os.path.join(out_dir, f"{task.name}.pt"))

    for kind in tqdm(cfg.neurons, desc=f"{task.name}: SNNs", leave=False):
        group = cfg.group_size if kind == "group" else None
        label = f"{kind} (m={group})" if group else kind
        snn_rows(f"SNN {label}", kind, group)

    # Fast-SNN: layer-wise fine-tuning at the T the SNN will run (Fast-SNN tunes at T = L; the
    # table's other Ts get their own tuning, not the T = L network run shorter), judged by the
    # task's metric on the held-out tuning split; the tuned weights are written back into a copy
    # of the quantized ANN (saved as <task>-<kind>-finetuned-T<T>.pt), which converts to the tuned SNN.
    for kind in cfg.finetune_neurons:
        for T in tqdm(steps, desc=f"{task.name}: fine-tuning {kind} at each T", leave=False):
            snn, report = fast_snn_finetune(task, cfg, qnet, kind, T, device)
            tuned = write_back(snn, copy.deepcopy(qnet))
            save_checkpoint(make_checkpoint(task.model_name, task.num_classes, cfg.levels, "qcfs", tuned,
                                            task.model_kwargs),
                            os.path.join(out_dir, f"{task.name}-{kind}-finetuned-T{T}.pt"))
            tune_metric = [report[0]["metric_before"], max(
                [report[0]["metric_before"]] + [r["metric_after"] for r in report if r["kept"]])]
            row(f"SNN {kind} fine-tuned", T, task.evaluate(to_snn(tuned, T, kind), test), tuned_at_T=T,
                layers_kept=[r["layer"] for r in report if r["kept"]], tune_metric=tune_metric)
    return rows


# ---------------------------------------------------------------------------
# The three tasks


class _Accuracy(_Meter):
    def __init__(self) -> None:
        self.correct = self.seen = 0

    def update(self, output: torch.Tensor, labels: torch.Tensor) -> None:
        self.correct += int((output.argmax(1).cpu() == labels).sum())
        self.seen += labels.numel()

    def value(self) -> float:
        return self.correct / max(1, self.seen)


def _classification(cfg: DemoConfig) -> _Task:
    from torch.utils.data import Subset

    from .data import digits

    train = digits("train", seed=cfg.seed)
    fit = len(train) - cfg.digits_tune
    return _Task("classification", "accuracy", Subset(train, range(fit)), digits("test", seed=cfg.seed),
                 Subset(train, range(fit, len(train))), None, "digits_cnn", 10, {}, lambda out, y: F.cross_entropy(out, y.to(out.device)),
                 _Accuracy, cfg.digits_epochs, cfg.digits_finetune_epochs, 1e-2)


def _detection(cfg: DemoConfig) -> _Task:
    from .data import SyntheticScenes, collate_scenes
    from .metrics import DetectionMeter
    from .models.yolo import DEFAULT_ANCHORS, decode_yolo, detection_readout_weight, yolo_loss

    size = cfg.scene_size
    downsamples = 3  # a 64 px scene gives an 8x8 grid

    class Meter(_Meter):
        def __init__(self) -> None:
            self.meter = DetectionMeter(num_classes=3)

        def update(self, output: torch.Tensor, targets: List[Dict[str, torch.Tensor]]) -> None:
            self.meter.update(decode_yolo(output.cpu(), DEFAULT_ANCHORS, 3, size), targets)

        def value(self) -> float:
            return self.meter.compute()["map"]

    return _Task("detection", "mAP@0.5",
                 _cached(SyntheticScenes(cfg.scenes_train, size, seed=cfg.seed)),
                 _cached(SyntheticScenes(cfg.scenes_test, size, seed=cfg.seed + 1)),
                 _cached(SyntheticScenes(cfg.scenes_tune, size, seed=cfg.seed + 2)), collate_scenes,
                 "tiny_yolov2", 3, dict(width=0.25, num_downsamples=downsamples),
                 lambda out, targets: yolo_loss(out, targets, DEFAULT_ANCHORS, 3, size),
                 Meter, cfg.detect_epochs, max(1, cfg.detect_epochs // 3), 3e-3,
                 detection_readout_weight(len(DEFAULT_ANCHORS), 3))


def _segmentation(cfg: DemoConfig) -> _Task:
    from .data import SyntheticScenes, collate_scenes
    from .metrics import SegmentationMeter

    size = cfg.scene_size

    def masks(targets: List[Dict[str, torch.Tensor]]) -> torch.Tensor:
        return torch.stack([t["mask"] for t in targets])

    class Meter(_Meter):
        def __init__(self) -> None:
            self.meter = SegmentationMeter(num_classes=4)

        def update(self, output: torch.Tensor, targets: List[Dict[str, torch.Tensor]]) -> None:
            self.meter.update(output.argmax(1).cpu(), masks(targets))

        def value(self) -> float:
            return self.meter.compute()["miou"]

    return _Task("segmentation", "mIoU",
                 _cached(SyntheticScenes(cfg.scenes_train, size, seed=cfg.seed)),
                 _cached(SyntheticScenes(cfg.scenes_test, size, seed=cfg.seed + 1)),
                 _cached(SyntheticScenes(cfg.scenes_tune, size, seed=cfg.seed + 2)), collate_scenes,
                 "small_deeplab", 4, dict(width=8),
                 lambda out, targets: F.cross_entropy(out, masks(targets).to(out.device)),
                 Meter, cfg.segment_epochs, max(1, cfg.segment_epochs // 3), 3e-3)


_TASKS = {"classification": _classification, "detection": _detection, "segmentation": _segmentation}


def make_task(name: str, cfg: DemoConfig) -> _Task:
    """The demo's task ``name`` (its data splits, model, metric) at the sizes of ``cfg``."""
    if name not in _TASKS:
        raise ValueError(f"task must be one of {sorted(_TASKS)}, got {name!r}")
    return _TASKS[name](cfg)


# ---------------------------------------------------------------------------
# Report


def format_table(rows: List[Dict[str, Any]]) -> str:
    header = f"{'task':15s} {'model':28s} {'T':>3s} {'metric':>16s} {'img/s':>9s} {'img/s loop':>10s} {'speedup':>8s}"
    lines = [header, "-" * len(header)]
    for r in rows:
        T = "" if r["T"] is None else str(r["T"])
        fused = f"{r['images_per_s']:9.0f}" if "images_per_s" in r else " " * 9
        ref = f"{r['images_per_s_reference']:10.0f}" if "images_per_s_reference" in r else " " * 10
        speed = f"{r['speedup']:7.1f}x" if "speedup" in r else ""
        lines.append(f"{r['task']:15s} {r['model']:28s} {T:>3s} {r['metric']:>8s} {r['value']:7.3f} "
                     f"{fused} {ref} {speed:>8s}".rstrip())
    lines.append("SNN speeds are measured at one T per neuron kind (T = L); each fine-tuned row is an SNN "
                 "tuned at its own T")
    return "\n".join(lines)


def plot(rows: List[Dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        task_rows = [r for r in rows if r["task"] == task]
        for r in task_rows:
            if r["T"] is None:
                ax.axhline(r["value"], linestyle="--" if r["model"] == "ANN" else ":", color="grey",
                           label=r["model"])
        colours: Dict[str, Any] = {}
        for model in dict.fromkeys(r["model"] for r in task_rows if r["T"] is not None):
            points = sorted((r["T"], r["value"]) for r in task_rows if r["model"] == model)
            kind = model.replace(" fine-tuned", "")  # a curve per neuron kind, its fine-tuned one dashed
            tuned = any("tuned_at_T" in r for r in task_rows if r["model"] == model)
            label = f"{model} (at each T)" if tuned else model
            line, = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label,
                            linestyle="--" if model.endswith("fine-tuned") else "-", color=colours.get(kind))
            colours.setdefault(kind, line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_xlabel("time steps T")
        ax.set_ylabel(task_rows[0]["metric"])
        ax.set_title(task)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_demo(out_dir: str = "demo-results", config: Optional[DemoConfig] = None,
             device: str = "cpu") -> Dict[str, Any]:
    """Runs the demo, prints the table, and writes ``demo.json``, ``demo.png``
    and one checkpoint per task (the quantized ANN) under ``out_dir``."""
    cfg = config or DemoConfig()
    unknown = [t for t in cfg.tasks if t not in _TASKS]
    if unknown:
        raise ValueError(f"tasks must be among {sorted(_TASKS)}, got {unknown}")
    os.makedirs(out_dir, exist_ok=True)
    dev = torch.device(device)
    rows: List[Dict[str, Any]] = []
    start = time.perf_counter()
    for name in cfg.tasks:
        rows += _run_task(make_task(name, cfg), cfg, dev, out_dir)
    result = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items()},
              "device": str(dev), "backend": backend_info(), "threads": torch.get_num_threads(),
              "seconds": time.perf_counter() - start, "rows": rows}
    print(format_table(rows))
    tmp = os.path.join(out_dir, ".demo.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "demo.json"))
    plot(rows, os.path.join(out_dir, "demo.png"))
    print(f"wrote {os.path.join(out_dir, 'demo.json')} and demo.png ({result['seconds']:.0f} s)")
    return result
