"""Sharp oracles for conversions (issue 15, issue 17 item 10).

Group neurons with m = L at T = 1 compute exactly the QCFS quantizer of each
layer's input (one step, m members, v0 = u/2: k = clamp(⌊z·m/θ + ½⌋, 0, m)), so
a correct conversion equals its quantized ANN up to rounding whatever the
weights. In float64 that rounding is ~1e-15, far below one level (a flipped
level shows as ~1e-3 or more). And a quantized ANN with a very large L and λ
above every activation equals the original ANN: no op was dropped.
"""

import copy
from typing import Iterable

import torch
from torch import nn

import fastspike

LEVELS = 4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def outputs(y) -> list:
    """The tensors of a model output (a tensor, or a dict such as DeepLab's)."""
    return list(y.values()) if isinstance(y, dict) else [y]


@torch.no_grad()
def assert_snn_equals_quantized_ann(qnet: nn.Module, x: torch.Tensor, levels: int,
                                    variants: Iterable[bool] = (True, False), **to_snn_kwargs) -> None:
    """The GN (m = levels, T = 1) SNN of ``qnet`` equals ``qnet`` in float64,
    for each ``constant_input_once`` in ``variants``. ``qnet``'s thresholds
    must be float32 numbers (the neurons keep float32 thresholds)."""
    q64 = copy.deepcopy(qnet).double().eval()
    x = x.double()
    y_q = outputs(q64(x))
    for once in variants:
        snet = fastspike.to_snn(q64, time_steps=1, neuron="group", group_size=levels,
                                constant_input_once=once, **to_snn_kwargs).double()
        for ys, yq in zip(outputs(snet(x)), y_q, strict=True):
            assert ys.shape == yq.shape
            assert rel(ys, yq) < 1e-9, f"SNN != quantized ANN (constant_input_once={once}): {rel(ys, yq)}"


@torch.no_grad()
def assert_converts_exactly(model: nn.Module, x: torch.Tensor, check_ann: bool = True,
                            variants: Iterable[bool] = (True, False), **to_snn_kwargs) -> None:
    """Quantizes ``model`` (L = LEVELS, λ calibrated on ``x``) and checks both
    oracles: the quantized ANN at huge L equals the ANN (``check_ann``), and
    the GN SNN equals the quantized ANN."""
    qnet = fastspike.quantize(model.float().eval(), levels=LEVELS, threshold=1.0)
    fastspike.calibrate(qnet, [x.float()], percentile=99.0)  # in float32: thresholds float32-exact
    if check_ann:
        model = model.double().eval()
        fine = fastspike.quantize(model, levels=10 ** 15, threshold=1e9).double().eval()
        for yf, ya in zip(outputs(fine(x.double())), outputs(model(x.double())), strict=True):
            assert rel(yf, ya) < 1e-4, "the quantized ANN dropped or changed an operation"
    assert_snn_equals_quantized_ann(qnet, x, LEVELS, variants, **to_snn_kwargs)
