"""Shared fixtures and helpers of the fastspike test suite.

Every test that takes a `device` runs on the CPU and, where a GPU is present,
on CUDA; the CUDA case skips itself elsewhere (as torchvision's tests do).
"""

from typing import List

import pytest
import torch

import fastspike

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (group_size, signed) of the three neuron kinds plus a signed group neuron.
NEURON_KINDS = [(1, False), (1, True), (4, False), (3, True)]


def cpu_and_cuda() -> List:
    """The `device` parameters; the CUDA case carries the `cuda` marker, so
    that `pytest -m cuda` selects exactly the cases that run on a GPU."""
    return [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.cuda,
                   pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
        ),
    ]


def needs_extension():
    return pytest.mark.skipif(
        fastspike.backend_info()["backend"] != "extension",
        reason="the compiled operators are not loaded",
    )


def assert_same_result(expected, actual) -> None:
    """Bit-for-bit equality of two NeuronResults (spikes, v, count)."""
    for name, e, a in zip(("spikes", "v", "count"), expected, actual):
        assert e.dtype == a.dtype, f"{name}: dtype {a.dtype} != {e.dtype}"
        assert e.shape == a.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        if not torch.equal(e, a):
            diff = (e.double() - a.double()).abs()
            raise AssertionError(
                f"{name}: {int((diff > 0).sum())} of {e.numel()} elements differ, max {diff.max().item()}"
            )
