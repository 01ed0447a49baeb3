"""Pass of to_snn: a residual join becomes one neuron call taking both operands."""

from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch
from torch import fx

from .graph import _aliases, _finish, _is_neuron, _placeholder_descendants

# ---------------------------------------------------------------------------
# Pass: residual join -> one neuron call with two operands

_ADD_FUNCTIONS = {operator.add, torch.add}
_INPLACE_ADD_FUNCTIONS = {operator.iadd}
_ADD_METHODS = {"add"}
_INPLACE_ADD_METHODS = {"add_"}


def _tensor_add_operands(gm: fx.GraphModule, node: fx.Node) -> Optional[Tuple[fx.Node, fx.Node]]:
    """(a, b) of a plain a + b (no alpha=, no out=) on two graph values; an
    in-place a += b only where a shares its memory with no other value."""
    is_add = ((node.op == "call_function" and node.target in _ADD_FUNCTIONS | _INPLACE_ADD_FUNCTIONS)
              or (node.op == "call_method" and node.target in _ADD_METHODS | _INPLACE_ADD_METHODS))
    if not is_add or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    in_place = node.target in _INPLACE_ADD_FUNCTIONS or node.target in _INPLACE_ADD_METHODS
    if in_place and (len(a.users) != 1 or _aliases(gm, a, skip=node) != {a}):
        # The add writes a: fused, the sum is never written, so a must be read by
        # nothing else, directly or through shared memory (a view of z, z[:, :2].add_(r),
        # changes z too).
        return None
    return a, b


def fuse_residual_adds(gm: fx.GraphModule) -> fx.GraphModule:
    """Turns each ``neuron(a + b)`` whose sum has no other use, with a and b
    both computed from the inputs, into ``neuron(a, b)``: the neuron op adds
    the residual while charging (same rounding as torch's add), so the sum is
    never written to memory. Operands that turn out at run time to broadcast
    or to differ in dtype are added as before by the layer."""
    dynamic = _placeholder_descendants(gm)
    for node in list(gm.graph.nodes):
        operands = _tensor_add_operands(gm, node)
        if operands is None or len(node.users) != 1 or not all(o in dynamic for o in operands):
            continue
        user = next(iter(node.users))
        if not _is_neuron(gm, user) or user.args != (node,) or user.kwargs:
            continue
        user.args = operands
        gm.graph.erase_node(node)
    return _finish(gm)
