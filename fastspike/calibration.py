"""Post-training calibration of the quantizers: λ from activation percentiles."""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

import torch
from torch import nn

from .convert.graph import ConversionError
from .quant import QuantReLU, quantizers

__all__ = ["calibrate"]


def _first_tensor(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"calibrate expects batches that are tensors or (input, target) pairs, got {type(batch).__name__}")


@torch.no_grad()
def calibrate(
    qmodel: nn.Module,
    loader: Iterable,
    percentile: float = 99.9,
    *,
    max_batches: Optional[int] = None,
    max_samples: int = 1_000_000,
    device: Optional[torch.device] = None,
) -> nn.Module:
    """Sets each quantizer's λ to the ``percentile`` of the ReLU activations it
    sees on ``loader`` (averaged over batches), for conversion without
    retraining. The model runs in eval mode with plain ReLUs while measuring;
    per-channel quantizers get a percentile per channel."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    found = quantizers(qmodel)
    if not found:
        raise ConversionError("calibrate found no QuantReLU in the model: call fastspike.quantize first")
    sums: Dict[str, torch.Tensor] = {}
    batches = 0
    generator = torch.Generator().manual_seed(0)

    def record(name: str, quant: QuantReLU):
        def hook(_module, inputs, _output):
            z = torch.relu(inputs[0].detach()).float()
            if quant.per_channel:
                rows = z.transpose(0, 1).reshape(z.shape[1], -1)
            else:
                rows = z.reshape(1, -1)
            per_row = max(1, max_samples // rows.shape[0])
            if rows.shape[1] > per_row:
                pick = torch.randint(rows.shape[1], (per_row,), generator=generator).to(rows.device)
                rows = rows[:, pick]
            value = torch.quantile(rows, percentile / 100, dim=1).cpu()
            sums[name] = sums.get(name, 0) + value
        return hook

    was_training = qmodel.training
    qmodel.eval()
    handles = []
    for name, quant in found:
        quant.calibrating = True
        handles.append(quant.register_forward_hook(record(name, quant)))
    try:
        for batch in loader:
            if max_batches is not None and batches >= max_batches:
                break
            x = _first_tensor(batch)
            qmodel(x.to(device) if device is not None else x)
            batches += 1
    finally:
        for handle in handles:
            handle.remove()
        for _, quant in found:
            quant.calibrating = False
        qmodel.train(was_training)
    if batches == 0:
        raise ValueError("calibrate got no batches from the loader")
    for name, quant in found:
        value = (sums[name] / batches).clamp(min=1e-3)  # a dead layer still needs λ > 0
        quant.set_threshold(value if quant.per_channel else value.reshape(()))
    return qmodel
