"""Accuracy at every T ≤ max(T) from one run.

The converted SNN is causal: step t of a T-step run is the t-step SNN (each
neuron's first t steps see the same inputs), so one run at max(T) with the
per-step outputs (``to_snn(..., readout="sequence")``) gives the readout of
every shorter run. This is how accuracy-against-T curves are drawn.

    snet = fastspike.to_snn(qnet, time_steps=8, readout="sequence")
    acc = fastspike.evaluate.accuracy_at_steps(snet, loader, steps=(1, 2, 4, 8))
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import torch
from torch import nn

__all__ = ["prefix_readouts", "accuracy_at_steps"]

READOUTS = ("mean", "sum", "running-sum", "sum-batch-major")


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
    from .nn import sum_in_order
    for t in steps:
        head = seq[:t]
        if readout == "mean":
            out[t] = head.mean(0)
        elif readout == "sum":
            out[t] = head.sum(0)
        else:
            out[t] = sum_in_order(head, readout)
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
