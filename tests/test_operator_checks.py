"""The compiled operators' own checks raise the same exception types as the
Python checks (issue 17 item 1): TypeError for a wrong dtype, ValueError for a
wrong value, shape or device. Calling torch.ops.fastspike.* directly skips
fastspike.neuron's Python checks, so these reach the C++ (TORCH_CHECK_TYPE /
TORCH_CHECK_VALUE)."""

import pytest
import torch

import fastspike

pytestmark = pytest.mark.skipif(fastspike.backend_info()["backend"] != "extension",
                                reason="needs the compiled operators")


def forward(x, threshold=None, group_size=1, init_fraction=0.5, neg_margin=1e-3, grad_mode="none", **kwargs):
    threshold = torch.tensor(1.0) if threshold is None else threshold
    return torch.ops.fastspike.neuron_forward(x, threshold, None, None, group_size, True, init_fraction,
                                              neg_margin, grad_mode, **kwargs)


def differentiable(x, grad="surrogate", surrogate="sigmoid", alpha=4.0):
    """fastspike::neuron, the operator that takes the backward's surrogate and alpha."""
    return torch.ops.fastspike.neuron(x, torch.tensor(1.0), None, None, 1, True, 0.5, 1e-3, grad, surrogate, alpha)


X = torch.randn(3, 2, 4)

CASES = [
    (TypeError, "x_seq", lambda: forward(X.int())),
    (TypeError, "threshold", lambda: forward(X, torch.tensor(1))),
    (TypeError, "residual", lambda: forward(X, residual=X.double())),
    (ValueError, "residual", lambda: forward(X, residual=X[:2])),
    (ValueError, "group_size", lambda: forward(X, group_size=0)),
    (ValueError, "neg_margin", lambda: forward(X, neg_margin=-1.0)),
    (ValueError, "init_fraction", lambda: forward(X, init_fraction=float("nan"))),
    (ValueError, "grad_mode", lambda: forward(X, grad_mode="bogus")),
    (ValueError, "surrogate", lambda: differentiable(X, surrogate="bogus")),
    (ValueError, "alpha", lambda: differentiable(X, alpha=-1.0)),
    (ValueError, "grad", lambda: differentiable(X, grad="bogus")),
    (ValueError, "threshold", lambda: forward(X, torch.tensor(-1.0))),
    (ValueError, "threshold", lambda: forward(X, torch.ones(5))),
    (ValueError, "x_seq", lambda: forward(torch.tensor(1.0))),
]


@pytest.mark.parametrize("kind, names, call", CASES, ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(CASES)])
def test_operator_raises_the_python_exception_type(kind, names, call):
    with pytest.raises(kind) as info:
        call()
    assert names in str(info.value)
