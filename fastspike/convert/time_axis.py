"""Pass of to_snn: the time axis (inputs repeated over T in the merged
layout, or run once and read as a time broadcast; outputs read out over T)."""

from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch
from torch import fx

from ..nn import ReadoutOverTime, RepeatOverTime, ShapeOverTime
from .graph import (ConversionError, _aliases, _called_once, _describe, _is_neuron, _may_alias_input, _module,
                    _reads_full_shape, _size_dims, _skips_batch_dim, _source_line, _writes_in_place)

# ---------------------------------------------------------------------------
# Pass: the time axis

_SIZE_METHODS = {"size", "numel", "nelement"}
# Reads that give the same value on the [B, ...] and the [T·B, ...] tensor.
_BATCH_FREE_ATTRS = {"ndim", "dtype", "device", "is_cuda", "layout"}
_BATCH_FREE_METHODS = {"dim", "ndimension", "get_device", "is_floating_point", "is_complex"}


def _reads_batch_size(node: fx.Node) -> bool:
    """Nodes whose value depends on the number of rows of their input (B or T·B)."""
    if node.op == "call_method":
        return node.target in _SIZE_METHODS
    return node.op == "call_function" and (
        node.target in (len, torch.numel)
        or (node.target is getattr and len(node.args) > 1 and node.args[1] == "shape"))


def _reads_batch_free(node: fx.Node, sizes: set) -> bool:
    """Metadata reads whose value is the same on [B, ...] and [T·B, ...]:
    rank, dtype, device, ``x.size(d)`` and ``shape[d]`` for d >= 1 (``sizes``:
    the nodes holding a whole shape)."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in _BATCH_FREE_ATTRS
    if node.op == "call_function" and node.target is operator.getitem:
        return isinstance(node.args[0], fx.Node) and node.args[0] in sizes and _skips_batch_dim(node.args[1])
    if node.op != "call_method":
        return False
    if node.target == "size":
        dims = _size_dims(node)
        return len(dims) == 1 and _skips_batch_dim(dims[0])
    return node.target in _BATCH_FREE_METHODS


def _read_size_over_time(gm: fx.GraphModule, node: fx.Node) -> Tuple[fx.Node, fx.Node]:
    """Replaces a size read off a [B, ...] value (``x.shape``, ``x.size(d)``,
    ``numel``, ``len``) by the same read off :class:`ShapeOverTime`, so the
    value is the unoptimised network's (T·B rows) and ``x`` is not repeated.
    Returns (the new shape node, the node now standing for ``node``)."""
    graph = gm.graph
    with graph.inserting_before(node):
        shape = graph.call_module("shape_over_time", (node.args[0],))
        if _reads_full_shape(node):
            read = shape
        elif node.op == "call_method" and node.target == "size":
            read = graph.call_function(operator.getitem, (shape, _size_dims(node)[0]))
        elif node.target is len:
            read = graph.call_function(operator.getitem, (shape, 0))
        else:  # numel, nelement, torch.numel
            read = graph.call_method("numel", (shape,))
    node.replace_all_uses_with(read)
    graph.erase_node(node)
    return shape, read


def _carries_the_batch(gm: fx.GraphModule) -> set:
    """The nodes whose value may have the inputs' batch dim: computed from the inputs (not only
    through batch-free reads such as ``x.shape[1]``), or a tensor such a value was written into
    (``out=``, in place) and what is computed from it after. The other outputs have no time
    axis to read out."""
    def storage(node: fx.Node) -> Optional[int]:
        # fx bakes a tensor made in forward() into attributes, one per use: alike by their memory
        value = getattr(gm, node.target, None) if node.op == "get_attr" and "." not in node.target else None
        return value.untyped_storage().data_ptr() if isinstance(value, torch.Tensor) else None

    sizes = {n for n in gm.graph.nodes if _reads_full_shape(n)}
    found: set = set()
    written_memory: set = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or (any(v in found for v in node.all_input_nodes)
                                        and not _reads_batch_free(node, sizes)) or (
                node.op == "get_attr" and storage(node) in written_memory):
            found.add(node)
            for written in _writes_in_place(node):
                found.update(_aliases(gm, written))
                if storage(written) is not None:
                    written_memory.add(storage(written))
    return found


def _may_write(gm: fx.GraphModule, node: fx.Node) -> bool:
    """The node may change a tensor it did not make (x.sub_(m), x += y, out=,
    an in-place module): a copy of that tensor made earlier is then stale."""
    if node.op == "call_module":
        return bool(getattr(_module(gm, node), "inplace", False))
    return bool(_writes_in_place(node)) or bool(node.kwargs.get("inplace"))


def add_time_axis(gm: fx.GraphModule, time_steps: int, readout: str = "mean",
                  constant_input_once: bool = False) -> fx.GraphModule:
    """Repeats every input over T (merged layout) and reads the outputs out over T.

    With ``constant_input_once``, the nodes computed from the inputs with no
    neuron among their ancestors (the constant part) run once on [B, ...]:
    a neuron reading such a value takes it as a time broadcast (never copied),
    and the value is repeated over T only where it meets a time-varying one
    or reaches the output (so the outputs are the same as repeating the
    inputs). Reading its size needs no repeat: rank, dtype and sizes past
    dim 0 are those of the [B, ...] value, and a read that may include dim 0
    (``x.shape``, ``x.size(0)``, ``shape[-2:]``, ``numel``, ``len``) is taken
    off the [T·B, ...] shape computed from it (:class:`ShapeOverTime`); such
    a read counts as time-varying, so a constant tensor that it meets is
    repeated (a view to ``x.size(0)`` rows needs the T·B rows)."""
    gm.add_submodule("repeat_over_time", RepeatOverTime(time_steps))
    gm.add_submodule("readout_over_time", ReadoutOverTime(time_steps, readout))
    if constant_input_once:
        gm.add_submodule("shape_over_time", ShapeOverTime(time_steps))
    # constant: computed from the inputs, no neuron upstream, [B, ...];
    # varying: [T·B, ...] (or a size that may count T·B rows); anything else
    # (parameters, literals, batch-free metadata reads) is used as it is.
    # sizes: nodes holding a whole shape, whose items past dim 0 are batch-free.
    constant, varying, repeated, sizes = set(), set(), {}, set()
    computed = _carries_the_batch(gm)  # the other outputs are returned as they are

    def repeat(value: fx.Node, before: fx.Node) -> fx.Node:
        # Copies made before an in-place op are dropped from `repeated` (below),
        # so every use reads the value as it is at that point of forward().
        if value not in repeated:
            with gm.graph.inserting_before(before):
                repeated[value] = gm.graph.call_module("repeat_over_time", (value,))
            varying.add(repeated[value])
            computed.add(repeated[value])
        return repeated[value]

    written = {w for n in gm.graph.nodes for w in _writes_in_place(n)}

    def repeat_constant_inputs(node: fx.Node) -> None:
        for value in node.all_input_nodes:
            if value not in constant:
                continue
            # A write into the copy (or into a view of it) would not reach the value itself.
            if value in _writes_in_place(node) or (_may_alias_input(gm, node) and _aliases(gm, node) & written):
                raise ConversionError(
                    f"node '{node.name}' ({_describe(gm, node)}){_source_line(node)} meets '{value.name}', "
                    "computed before the first spiking layer, with a value that has the T·B rows of the "
                    "converted network (spikes, or a size read off the batch) and writes into it in place "
                    "(or makes a view of it that is written later); with constant_input_once=True that part "
                    "runs once on [B, ...], so the write would land on a copy. Write that op out of place, or "
                    "convert with constant_input_once=False.")
            node.replace_input_with(value, repeat(value, node))

    for node in list(gm.graph.nodes):
        if constant_input_once and _may_write(gm, node):
            repeated.clear()
        if node.op == "placeholder":
            if constant_input_once:
                constant.add(node)
            else:
                with gm.graph.inserting_after(node):
                    rep = gm.graph.call_module("repeat_over_time", (node,))
                computed.add(rep)
                node.replace_all_uses_with(rep, delete_user_cb=lambda user: user is not rep)
        elif node.op == "output":
            if constant_input_once:
                node.args = fx.node.map_arg(node.args, lambda v: repeat(v, node) if v in constant else v)

            def read_out(value: fx.Node) -> fx.Node:
                if value not in computed:
                    return value  # a parameter or constant returned as it is: no time axis to read out
                with gm.graph.inserting_before(node):
                    return gm.graph.call_module("readout_over_time", (value,))
            node.args = (fx.node.map_arg(node.args[0], read_out),)
        elif not constant_input_once:
            continue
        elif _is_neuron(gm, node) and not node.kwargs and len(node.args) <= 2 and _called_once(gm, node):
            layer = _module(gm, node)
            layer.constant_input = node.args[0] in constant
            layer.constant_residual = len(node.args) > 1 and node.args[1] in constant
            varying.add(node)
        elif _reads_batch_free(node, sizes) and any(v in constant or v in varying for v in node.all_input_nodes):
            continue  # the same on [B, ...] and [T·B, ...]: used as it is, never repeated
        elif _reads_batch_size(node) and [v for v in node.all_input_nodes if v in constant] == list(node.args[:1]):
            shape, read = _read_size_over_time(gm, node)
            sizes.add(shape)
            varying.update((shape, read))
        elif (_is_neuron(gm, node) or any(v in varying for v in node.all_input_nodes)
              or (_reads_batch_size(node) and any(v in constant for v in node.all_input_nodes))):
            # Where a constant meets a time-varying value (or a size is read
            # off it in a way not handled above), it must have the T·B rows
            # the unoptimised network had.
            repeat_constant_inputs(node)
            varying.add(node)
            if _reads_full_shape(node):
                sizes.add(node)
        elif any(v in constant for v in node.all_input_nodes):
            constant.add(node)
    gm.graph.lint()
    gm.recompile()
    return gm
