"""Pass of quantize: every ReLU call site gets its own quantizer; unknown
activation-like modules are refused."""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn import SpikingNeuron
from ..quant import QuantReLU
from .graph import (ConversionError, _aliases, _arg_values, _declared_time_linear, _describe, _finish,
                    _global_forward_hooks, _has_forward_hooks, _module, _placeholder_descendants,
                    _plain_torch_forward, _replace_with_module, _source_line, copy_model, trace)

# ---------------------------------------------------------------------------
# Pass: ReLU call sites -> quantizers

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU_METHODS = {"relu", "relu_"}


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        m = _module(gm, node)
        return isinstance(m, nn.ReLU) and _plain_torch_forward(m)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in _RELU_METHODS


def _relu_in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """The ReLU call overwrites its input (relu_, inplace=True)."""
    if node.op == "call_module":
        return bool(_module(gm, node).inplace)
    if node.target in (torch.relu_, F.relu_, "relu_"):
        return True
    return node.target is F.relu and bool(_arg_values(node, 1, "inplace"))


def _later_reads_of_overwritten(gm: fx.GraphModule, node: fx.Node, order: Dict[fx.Node, int]) -> List[fx.Node]:
    """For an in-place ReLU ``node`` on x: the nodes after it that read x
    itself (they must read the quantizer's output instead). Refuses when a
    view of x, or what x is a view of, is read after it: the in-place write
    reaches those through shared memory, which an out-of-place quantizer
    cannot reproduce."""
    x = node.args[0]
    if not isinstance(x, fx.Node):
        return []
    after = lambda u: order.get(u, -1) > order[node]
    for alias in _aliases(gm, x, node) - {x}:
        late = [u for u in alias.users if u is not node and after(u)]
        if late:
            raise ConversionError(
                f"node '{node.name}' ({_describe(gm, node)}){_source_line(node)} is an in-place ReLU on "
                f"'{x.name}', which shares memory with '{alias.name}', read afterwards by '{late[0].name}': "
                "the in-place write changes that view too, and a quantized ReLU cannot reproduce it. "
                "Write the ReLU out of place (y = F.relu(x)) and use its result.")
    return [u for u in x.users if u is not node and after(u)]


# Module classes that look like activations or spiking neurons by their name
# (the quantizers and neurons of the published code bases: MyFloor, TCL,
# ScaledNeuron, QCFS, GN, IFNode, ...): quantize refuses to guess what they do.
_ACTIVATION_NAME_PARTS = ("relu", "floor", "quant", "neuron", "spik", "qcfs", "clip", "activation")
_ACTIVATION_NAME_WORDS = {"if", "lif", "plif", "act", "gn", "tcl", "pact", "lsq", "round", "clamp", "threshold"}


def _looks_like_activation(m: nn.Module) -> bool:
    cls = type(m)
    if cls.__module__.startswith("torch.") or isinstance(m, (QuantReLU, SpikingNeuron)) or _declared_time_linear(m):
        return False  # torch's own modules are judged by the graph rules
    if isinstance(m, nn.ReLU):
        return not _plain_torch_forward(m)  # a ReLU subclass with a forward of its own
    name = cls.__name__
    words = {w.lower() for w in re.findall(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+", name)}
    named_like = any(part in name.lower() for part in _ACTIVATION_NAME_PARTS) or bool(words & _ACTIVATION_NAME_WORDS)
    # A block that holds layers (ConvBNReLU) is traced into; only parameter-free wrappers count.
    holds_layers = any(p is not None for child in m.children() for p in child.parameters())
    return named_like and not holds_layers


def called_modules(gm: fx.GraphModule) -> Optional[Set[str]]:
    """Paths of the modules a traced forward runs: the leaves it calls and every module
    whose forward it traced through (fx records them in each node's nn_module_stack);
    "" is the model itself. None when that cannot be known: the graph carries no such
    record (a GraphModule built elsewhere), or a leaf it calls has forward hooks (or
    global module hooks exist), which may run any module unseen by fx. Then every
    module counts as run."""
    if not any("nn_module_stack" in node.meta for node in gm.graph.nodes) or _global_forward_hooks():
        return None
    if any(node.op == "call_module" and _has_forward_hooks(gm.get_submodule(node.target)) for node in gm.graph.nodes):
        return None
    called = {""}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            called.add(node.target)
        for key, value in (node.meta.get("nn_module_stack") or {}).items():
            called.add(value[0] if isinstance(value, tuple) else key)
    return called


def unknown_activations(model: nn.Module, traced: Optional[fx.GraphModule] = None) -> List[Tuple[str, str]]:
    """(module path, class name) of every module that looks like an
    activation, quantizer or spiking neuron but is neither nn.ReLU nor one of
    fastspike's (see :func:`_looks_like_activation`). With ``traced`` (the
    model's traced forward), only those the forward runs: a module that is
    defined but never called computes nothing."""
    called = None if traced is None else called_modules(traced)
    return [(name or "(the model itself)", type(m).__name__) for name, m in model.named_modules()
            if _looks_like_activation(m) and (called is None or name in called)]


def _refuse_unknown_activations(model: nn.Module, traced: Optional[fx.GraphModule] = None) -> None:
    found = unknown_activations(model, traced)
    if found:
        listed = ", ".join(f"'{name}' ({cls})" for name, cls in found)
        raise ConversionError(
            f"the model has modules that look like activations, quantizers or spiking neurons that "
            f"fastspike does not know: {listed}. fastspike converts nn.ReLU (and F.relu, ...) and its own "
            "QuantReLU/SpikingNeuron; it will not guess what these compute. Replace them with nn.ReLU "
            "(or fastspike.quant.QuantReLU with their threshold and levels); if one is affine in its "
            "input, declare its class with fastspike.time_linear(...); for models of the QCFS, Fast-SNN "
            "or group-neuron code bases, rewrite their activations as QuantReLU.")


def replace_activations(gm: fx.GraphModule, make_quantizer: Callable[[], nn.Module]) -> fx.GraphModule:
    """Gives every ReLU call site its own quantizer from ``make_quantizer``.
    An in-place ReLU keeps its meaning: later reads of the tensor it
    overwrote read the quantizer's output (refused where a view shares it).
    A ReLU of values not computed from the inputs (parameters) stays a ReLU."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    inputs = _placeholder_descendants(gm)
    for node in list(gm.graph.nodes):
        if not _is_relu(gm, node) or node.args[0] not in inputs:
            continue  # a ReLU of parameters (F.relu(self.scale)) is weight arithmetic, not an activation
        overwritten = _later_reads_of_overwritten(gm, node, order) if _relu_in_place(gm, node) else []
        call = _replace_with_module(gm, node, "quant", make_quantizer())
        for reader in overwritten:
            reader.replace_input_with(call.args[0], call)
    return _finish(gm)


def trace_known(model: nn.Module, leaf_modules: Any = ()) -> fx.GraphModule:
    """Traces a copy of ``model`` (see :func:`trace`), refusing the unknown activation-like
    modules its forward runs; when it does not trace, every such module it has is named
    first (the likely cause)."""
    try:
        gm = trace(copy_model(model), leaf_modules)
    except ConversionError:
        _refuse_unknown_activations(model)
        raise
    _refuse_unknown_activations(model, gm)
    return gm
