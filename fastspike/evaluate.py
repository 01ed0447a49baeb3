"""Evaluation: the task's metric (accuracy, mIoU, mAP@0.5) of a model, across
processes when distributed, and at every T ≤ max(T) from one run.

The converted SNN is causal: step t of a T-step run is the t-step SNN (each
neuron's first t steps see the same inputs), so one run at max(T) with the
per-step outputs (``to_snn(..., readout="sequence")``) gives the readout of
every shorter run. This is how accuracy-against-T curves are drawn.

    snet = fastspike.to_snn(qnet, time_steps=8, readout="sequence")
    acc = fastspike.evaluate.accuracy_at_steps(snet, loader, steps=(1, 2, 4, 8))
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from .nn import READOUTS as NN_READOUTS
from .nn import reduce_over_time

__all__ = ["prefix_readouts", "prefix_views", "accuracy_at_steps", "evaluate_task"]

# The readouts that reduce over T (fastspike.nn.READOUTS but the sequence itself).
READOUTS = tuple(mode for mode in NN_READOUTS if mode != "sequence")


def prefix_readouts(seq: torch.Tensor, steps: Sequence[int], readout: str = "mean") -> Dict[int, torch.Tensor]:
    """{t: readout of seq[:t]} for each t in ``steps`` from one [T, B, ...]
    sequence: ``"mean"``/``"sum"`` as ``to_snn``'s readouts (``seq[:t].mean(0)``,
    the same reduction a t-step run makes), ``"running-sum"`` and
    ``"sum-batch-major"`` as :func:`fastspike.nn.sum_in_order`."""
    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
    if seq.dim() < 2:
        raise ValueError(f"expected a [T, B, ...] sequence, got shape {list(seq.shape)}")
    total = seq.shape[0]
    for t in steps:
        if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= total:
            raise ValueError(f"every step count must be an integer in [1, {total}] (the run's T), got {t!r}")
    out: Dict[int, torch.Tensor] = {}
    if readout == "running-sum":  # one pass: the source's own running sum
        running = seq[0].clone()
        for t in range(1, total + 1):
            if t > 1:
                running += seq[t - 1]
            if t in steps:
                out[t] = running.clone()
        return out
    for t in steps:
        out[t] = reduce_over_time(seq[:t], readout)
    return out


@torch.no_grad()
def accuracy_at_steps(model: nn.Module, loader: Iterable, steps: Sequence[int], readout: str = "mean",
                      device: Optional[torch.device] = None) -> Dict[int, float]:
    """Top-1 accuracy {t: fraction correct} of the t-step SNN for every t in
    ``steps``, from one run per batch of ``model``, an SNN converted with
    ``readout="sequence"`` at T ≥ max(steps) (its output [T, B, classes]).
    ``loader`` yields (inputs, labels)."""
    steps = sorted(set(steps))
    if not steps:
        raise ValueError("steps must name at least one step count")
    was_training = model.training
    model.eval()
    correct = {t: 0 for t in steps}
    seen = 0
    try:
        for inputs, labels in loader:
            if device is not None:
                inputs, labels = inputs.to(device), labels.to(device)
            seq = model(inputs)
            if not isinstance(seq, torch.Tensor) or seq.dim() != 3 or seq.shape[1] != labels.shape[0]:
                raise ValueError("accuracy_at_steps needs the per-step logits [T, B, classes]: convert with "
                                 f"to_snn(..., readout='sequence'); got {getattr(seq, 'shape', type(seq))}")
            for t, logits in prefix_readouts(seq, steps, readout).items():
                correct[t] += int((logits.argmax(1) == labels).sum())
            seen += labels.shape[0]
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("the loader gave no batches")
    return {t: correct[t] / seen for t in steps}


def prefix_views(out: Any, steps: Sequence[int]) -> Dict[int, Any]:
    """{t: the t-step SNN's output} from one output of an SNN converted with
    readout="sequence" (every tensor [T, B, ...]): the mean of its first t steps
    (:func:`prefix_readouts`), the readout a t-step run makes."""
    from torch.utils import _pytree as pytree

    leaves, spec = pytree.tree_flatten(out)
    per_leaf = [prefix_readouts(leaf, steps) if isinstance(leaf, torch.Tensor) and leaf.dim() >= 2 else None
                for leaf in leaves]
    return {t: pytree.tree_unflatten([p[t] if p is not None else leaf for p, leaf in zip(per_leaf, leaves)], spec)
            for t in steps}


@torch.no_grad()
def evaluate_task(model: torch.nn.Module, loader: Iterable, task: str, num_classes: int, image_size: int,
                  device: torch.device, distributed: bool = False,
                  anchors: Optional[Sequence[Sequence[float]]] = None,
                  steps: Optional[Sequence[int]] = None) -> Dict[Any, Any]:
    """The metric of ``model`` on ``loader``; with ``steps``, ``model`` is an SNN converted with
    readout="sequence" at T = max(steps) and the result is {t: metric of the t-step SNN} for
    every t, all from one run (the SNN is causal: its first t steps are the t-step SNN)."""
    import torch.distributed as dist

    model.eval()
    keys: List[Any] = sorted(set(steps)) if steps else [None]

    def views(x: torch.Tensor) -> Dict[Any, Any]:
        out = model(x.to(device))
        return prefix_views(out, keys) if steps else {None: out}

    results: Dict[Any, Dict[str, float]] = {}
    if task == "classification":
        counts = {k: torch.zeros(2, dtype=torch.float64) for k in keys}
        for x, y in loader:
            for k, out in views(x).items():
                counts[k][0] += (out.argmax(1).cpu() == y).sum()
                counts[k][1] += y.numel()
        for k, c in counts.items():
            if distributed:
                c = c.to(device)
                dist.all_reduce(c)
            results[k] = {"accuracy": (c[0] / c[1]).item()}
    elif task == "segmentation":
        from .metrics import SegmentationMeter

        meters = {k: SegmentationMeter(num_classes) for k in keys}
        for x, targets in loader:
            masks = torch.stack([t["mask"] for t in targets])
            for k, out in views(x).items():
                out = out["out"] if isinstance(out, dict) else out
                meters[k].update(out.argmax(1).cpu(), masks)
        for k, meter in meters.items():
            if distributed:
                confusion = meter.confusion.to(device)
                dist.all_reduce(confusion)
                meter.confusion = confusion.cpu()
            results[k] = {"miou": meter.compute()["miou"]}
    else:
        from .metrics import mean_average_precision
        from .models.yolo import DEFAULT_ANCHORS, decode_yolo

        preds: Dict[Any, List[Any]] = {k: [] for k in keys}
        targets_all: List[Any] = []
        for x, targets in loader:
            for k, out in views(x).items():
                preds[k] += decode_yolo(out.cpu(), anchors or DEFAULT_ANCHORS, num_classes, image_size)
            targets_all += targets
        for k in keys:
            mine, targets_k = preds[k], targets_all
            if distributed:
                gathered: List[Any] = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, (mine, targets_k))
                mine = [p for g in gathered for p in g[0]]
                targets_k = [t for g in gathered for t in g[1]]
            results[k] = {"mAP@0.5": mean_average_precision(mine, targets_k, num_classes)["map"]}
    return results if steps else results[None]
