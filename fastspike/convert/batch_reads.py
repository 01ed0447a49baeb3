"""The batch-size rule: in the merged [T·B, ...] layout a read of dim 0 gives T·B."""

from __future__ import annotations

import operator
from typing import Dict

import torch
import torch.nn.functional as F
from torch import fx

from .graph import ConversionError, _describe, _reads_full_shape, _size_dims, _skips_batch_dim, _source_line

# ---------------------------------------------------------------------------
# What may read the batch size: in the converted network the T time steps are
# merged into the batch ([T·B, ...]), so x.shape[0] is T·B. That is right for
# shapes (x.view(x.size(0), -1) keeps each row's values) and wrong for values
# (torch.arange(x.shape[0]) counts T·B rows).

_SHAPE_USE_METHODS = {"view", "reshape", "expand", "new_zeros", "new_ones", "new_empty", "unflatten"}
_SHAPE_USE_FUNCTIONS = {torch.reshape, torch.zeros, torch.ones, torch.empty, F.interpolate, F.upsample}
_SIZE_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
                    operator.neg, operator.getitem, int}


def _reads_rows(node: fx.Node) -> bool:
    """The value read may include the size of dim 0 (the whole shape, size(0),
    len, numel; a negative dim is taken to possibly be dim 0)."""
    if node.op == "call_method" and node.target == "size":
        dims = _size_dims(node)
        return not dims or not _skips_batch_dim(dims[0])
    if node.op == "call_method":
        return node.target in ("numel", "nelement")
    return node.op == "call_function" and (
        node.target in (len, torch.numel) or (node.target is getattr and node.args[1:] == ("shape",)))


def check_batch_reads(gm: fx.GraphModule) -> None:
    """Raises :class:`ConversionError` where a value (not a shape) is built
    from the batch size, which the merged layout changes from B to T·B."""
    origin: Dict[fx.Node, fx.Node] = {}  # size value built from dim 0 -> the read it comes from
    sizes: set = set()  # nodes holding sizes (ints or torch.Size), from dim 0 or not
    for node in gm.graph.nodes:
        if _reads_rows(node):
            sizes.add(node)
            origin[node] = node
            continue
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in sizes:
            sizes.add(node)  # shape[d] of a whole shape is batch-free for d >= 1
            whole = origin.get(node.args[0]) is node.args[0] and _reads_full_shape(node.args[0])
            if node.args[0] in origin and not (whole and _skips_batch_dim(node.args[1])):
                origin[node] = origin[node.args[0]]
            continue
        if node.op == "call_method" and node.target == "size":
            sizes.add(node)  # x.size(d), d >= 1
            continue
        from_batch = [v for v in node.all_input_nodes if v in origin]
        if not from_batch:
            continue
        if node.op == "call_function" and node.target in _SIZE_ARITHMETIC and all(
                v in sizes for v in node.all_input_nodes):
            sizes.add(node)
            origin[node] = origin[from_batch[0]]
            continue
        shape_use = ((node.op == "call_method" and node.target in _SHAPE_USE_METHODS)
                     or (node.op == "call_function" and node.target in _SHAPE_USE_FUNCTIONS))
        if shape_use:
            continue
        read = origin[from_batch[0]]
        raise ConversionError(
            f"node '{node.name}' ({_describe(gm, node)}){_source_line(node)} builds a value from the batch "
            f"size read by node '{read.name}' ({_describe(gm, read)}){_source_line(read)}: the converted "
            "network merges the T time steps into the batch ([T·B, ...]), so that read gives T·B and the "
            "value would differ from the quantized network's. Use the batch size only for shapes "
            "(view/reshape/expand/zeros), or build such values outside forward() and pass them in.")
