"""What every pass shares: tracing, graph editing helpers, the error type,
the registry of user modules declared affine per time step, and reads of a
node's arguments and of tensor sizes."""

from __future__ import annotations

import copy
import operator
import os
from typing import Any, Callable, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from ..nn import SpikingNeuron
from ..quant import QuantReLU

class ConversionError(ValueError):
    """The model cannot be converted as it is; the message says what to change."""


# ---------------------------------------------------------------------------
# Tracing

_LEAVES: Tuple[Type[nn.Module], ...] = (QuantReLU, SpikingNeuron)


class _Tracer(fx.Tracer):
    """Keeps fastspike's own modules (and any the user names) as leaves."""

    def __init__(self, leaf_modules: Sequence[Type[nn.Module]] = ()):
        super().__init__()
        self.extra_leaves = tuple(leaf_modules)
        self.record_stack_traces = True  # refusals name the user's source line

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, _LEAVES + self.extra_leaves) or _declared_time_linear(m):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module, leaf_modules: Sequence[Type[nn.Module]] = ()) -> fx.GraphModule:
    """torch.fx trace with an error that says what to do when it fails."""
    if isinstance(model, fx.GraphModule):
        return model
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises many kinds; all mean the same to the user
        # Buffers are baked in as constants (so `if self.flag:` and range(self.anchors.shape[0])
        # trace); code that uses a buffer with traced sizes (self.anchors.expand(x.size(0), -1))
        # needs them as graph values: the second try.
        tracer = _Tracer(leaf_modules)
        tracer.proxy_buffer_attributes = True
        try:
            graph = tracer.trace(model)
        except Exception:
            graph = None
        if graph is not None:
            return fx.GraphModule(tracer.root, graph, type(model).__name__)
        raise ConversionError(
            f"torch.fx cannot trace {type(model).__name__}: {type(err).__name__}: {err}. "
            "fastspike converts through torch.fx, so forward() must not branch on tensor values "
            "or sizes. Move such code into a submodule and pass its class in leaf_modules= (it "
            "is then kept as one opaque call), or decorate the offending function with "
            "torch.fx.wrap."
        ) from err
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _module(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _fresh_name(gm: fx.GraphModule, stem: str) -> str:
    existing = dict(gm.named_modules())
    i = 0
    while f"{stem}_{i}" in existing:
        i += 1
    return f"{stem}_{i}"


def _replace_with_module(gm: fx.GraphModule, node: fx.Node, stem: str, module: nn.Module) -> fx.Node:
    """Replaces ``node`` by a call of ``module`` (registered under a fresh name) on its first input."""
    name = _fresh_name(gm, stem)
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        call = gm.graph.call_module(name, (node.args[0],))
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
    return call


def _finish(gm: fx.GraphModule) -> fx.GraphModule:
    """Checks the edited graph, drops modules no node calls any more, regenerates forward."""
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)}"
    return f"method .{node.target}()"


# The classes declared with time_linear(); the tracer keeps them whole.
_TIME_LINEAR_CLASSES: set = set()


def time_linear(cls: Type[nn.Module]) -> Type[nn.Module]:
    """Declares a module class affine in its input at every time step
    (``f(a·x + b·y) = a·f(x) + b·f(y)`` up to a constant), so the converter
    keeps it as one call and accepts it on time-varying spikes. Use as a
    class decorator or call it on a class you do not own::

        @fastspike.time_linear
        class MyConv(nn.Module): ...

        fastspike.time_linear(ThirdPartyUpsample)

    The declaration is the user's promise: a nonlinear module declared this
    way makes the SNN compute something other than the quantized network.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"time_linear expects an nn.Module subclass, got {cls!r}")
    _TIME_LINEAR_CLASSES.add(cls)
    return cls


def _declared_time_linear(m: Optional[nn.Module]) -> bool:
    return m is not None and isinstance(m, tuple(_TIME_LINEAR_CLASSES))


def _has_forward_hooks(m: nn.Module) -> bool:
    """``m`` runs forward hooks or pre-hooks of its own when called: code fx does not see
    for a leaf (a non-leaf's hooks are traced inline with its forward)."""
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _global_forward_hooks() -> bool:
    """Hooks registered for every module (torch.nn.modules.module.register_module_forward_hook)."""
    from torch.nn.modules import module as module_mod

    return bool(module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks)


def _plain_torch_forward(m: nn.Module) -> bool:
    """``m.forward`` is torch's own (not overridden by a user subclass)."""
    return getattr(type(m).forward, "__module__", "").startswith("torch.")


# What a module's call runs besides forward: torch's convs compute in _conv_forward, which a
# subclass may override (weight standardisation) while keeping torch's forward.
_COMPUTING_METHODS = ("forward", "_conv_forward", "__call__", "_call_impl")


def _plain_torch_compute(m: nn.Module) -> bool:
    """Calling ``m`` runs only torch's own code: neither ``forward`` nor what it
    delegates to (``_conv_forward``) nor ``__call__`` is overridden by a user subclass."""
    cls = type(m)
    return all(getattr(getattr(cls, name), "__module__", "").startswith("torch.")
               for name in _COMPUTING_METHODS if hasattr(cls, name))


def _owns_its_parameters(gm: fx.GraphModule, target: str, layer: nn.Module) -> bool:
    """Editing ``layer``'s parameters (folding a BN or a spike scale into them)
    changes what this call of the layer computes, and nothing else: it runs
    torch's own code (:func:`_plain_torch_compute`) on its own parameters (no
    parametrization or weight-norm hook recomputing them), and no other module
    or graph node reads them (weight tying, ``F.conv_transpose2d(z,
    self.enc.weight)``)."""
    if not _plain_torch_compute(layer) or parametrize.is_parametrized(layer) or _has_forward_hooks(layer):
        return False
    own = {id(p) for p in layer.parameters()}
    for name, p in gm.named_parameters(remove_duplicate=False):
        if id(p) in own and not name.startswith(target + "."):
            return False
    return not any(n.op == "get_attr" and str(n.target).startswith(target + ".") for n in gm.graph.nodes)


# ---------------------------------------------------------------------------
# Aliasing: which graph values may share memory (an in-place write to one changes the others)

# Attributes that are the tensor's values (views of it), not its metadata.
_VALUE_ATTRS = {"T", "mT", "H", "mH", "data", "real", "imag"}

# Operations whose result may share memory with their first operand.
_ALIASING_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute",
                     "transpose", "t", "swapaxes", "swapdims", "movedim", "moveaxis", "squeeze", "unsqueeze",
                     "expand", "expand_as", "narrow", "select", "split", "tensor_split", "hsplit", "vsplit",
                     "dsplit", "chunk", "unbind", "contiguous", "detach", "as_strided", "diagonal",
                     # casts and moves return the tensor itself when nothing changes
                     "to", "type", "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda",
                     "ravel", "unfold", "positive", "resolve_conj", "resolve_neg", "broadcast_to", "adjoint",
                     "conj"}
_ALIASING_FUNCTIONS = {operator.getitem, getattr, torch.flatten, torch.unflatten, torch.reshape, torch.permute,
                       torch.transpose, torch.swapaxes, torch.swapdims, torch.movedim, torch.moveaxis,
                       torch.squeeze, torch.unsqueeze, torch.narrow, torch.select, torch.split,
                       torch.tensor_split, torch.hsplit, torch.vsplit, torch.dsplit, torch.chunk, torch.unbind,
                       torch.t, torch.detach, torch.diagonal, torch.as_strided, operator.iadd, operator.isub,
                       operator.imul, operator.itruediv, torch.ravel, torch.positive, torch.resolve_conj,
                       torch.resolve_neg, torch.broadcast_to, torch.atleast_1d, torch.atleast_2d, torch.atleast_3d,
                       torch.view_as_real, torch.adjoint, torch.conj, torch.real, torch.imag,
                       # eval-mode dropout returns its input itself
                       F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}
_ALIASING_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)
# Python's augmented assignments: in place on tensors.
_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                       operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior,
                       operator.ixor, operator.ilshift, operator.irshift}


def _first_operand(node: fx.Node) -> Any:
    """The tensor a method or function acts on: args[0], or input= (self=)."""
    if node.args:
        return node.args[0]
    return node.kwargs.get("input", node.kwargs.get("self"))


def _may_alias_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node``'s result may share memory with its first operand (a view, a
    cast that changes nothing, an in-place op returning its target)."""
    if node.op == "call_method":
        return node.target in _ALIASING_METHODS or str(node.target).endswith("_")
    if node.op == "call_function":
        if node.target is getattr:  # y.T is a view of y; y.shape or y.dtype is no tensor
            return len(node.args) > 1 and node.args[1] in _VALUE_ATTRS
        return node.target in _ALIASING_FUNCTIONS or getattr(node.target, "__name__", "").endswith("_")
    if node.op == "call_module":
        m = _module(gm, node)
        return isinstance(m, _ALIASING_MODULES) or bool(getattr(m, "inplace", False))
    return False


def _aliases(gm: fx.GraphModule, value: fx.Node, skip: Optional[fx.Node] = None) -> set:
    """The graph values that may share memory with ``value`` (views of it,
    what it is a view of, and so on), ``skip`` left out."""
    found, todo = {value}, [value]
    while todo:
        n = todo.pop()
        related = [u for u in n.users if u is not skip and _may_alias_input(gm, u) and _first_operand(u) is n]
        base = _first_operand(n)
        if _may_alias_input(gm, n) and isinstance(base, fx.Node):
            related.append(base)
        for r in related:
            if r not in found:
                found.add(r)
                todo.append(r)
    return found


def _writes_in_place(node: fx.Node) -> List[fx.Node]:
    """The tensors ``node`` writes into: the target of an in-place op
    (``x.add_(y)``, ``x += y``, ``torch.relu_(x)``) and its ``out=`` tensors."""
    if node.op not in ("call_method", "call_function"):
        return []
    written: List[fx.Node] = []
    fx.node.map_arg(node.kwargs.get("out"), written.append)
    name = str(node.target if node.op == "call_method" else getattr(node.target, "__name__", ""))
    in_place = (name.endswith("_") and not name.startswith("_")) or (
        node.op == "call_function" and node.target in _IN_PLACE_OPERATORS)
    target = _first_operand(node)
    if in_place and isinstance(target, fx.Node) and target not in written:
        written.append(target)
    return written


_TORCH_DIR = os.path.dirname(torch.__file__)


def _source_line(node: fx.Node) -> str:
    """' (at file, line N, in f: code)' of the user's source that made ``node``:
    the innermost frame of fx's stack trace that is not torch's own."""
    lines = [line.strip() for line in (node.stack_trace or "").strip().splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File ") and _TORCH_DIR not in lines[i]:
            where = lines[i].replace("File ", "", 1)
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            return f" (at {where}: {code})" if code else f" (at {where})"
    return ""


def _arg_values(node: fx.Node, position: int, name: str) -> Any:
    return node.kwargs[name] if name in node.kwargs else (
        node.args[position] if len(node.args) > position else None)


def _is_neuron(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(_module(gm, node), SpikingNeuron)


def _called_once(gm: fx.GraphModule, node: fx.Node) -> bool:
    """The module ``node`` calls is called from no other node (so per-site settings are safe)."""
    return sum(n.op == "call_module" and n.target == node.target for n in gm.graph.nodes) == 1


def _descendants(gm: fx.GraphModule, source: Callable[[fx.Node], bool]) -> set:
    """The nodes for which ``source`` holds and every node computed from one of them."""
    found = set()
    for node in gm.graph.nodes:
        if source(node) or any(i in found for i in node.all_input_nodes):
            found.add(node)
    return found


def _placeholder_descendants(gm: fx.GraphModule) -> set:
    """Nodes computed from the network's inputs (not parameters or constants)."""
    return _descendants(gm, lambda node: node.op == "placeholder")


def _size_dims(node: fx.Node) -> List[Any]:
    """The dim arguments of an ``x.size(...)`` call (none for the whole shape)."""
    return list(node.args[1:]) + list(node.kwargs.values())


def _reads_full_shape(node: fx.Node) -> bool:
    """``x.shape`` or ``x.size()``: the whole torch.Size."""
    return ((node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",))
            or (node.op == "call_method" and node.target == "size" and not _size_dims(node)))


def _negative_reach(index: Any) -> Optional[int]:
    """For a dim counted from the end (``-k``, or a forward slice starting at ``-k``): k, as
    it reaches dim 0 exactly on tensors of rank <= k; else None."""
    if isinstance(index, slice):
        step_ok = index.step is None or (isinstance(index.step, int) and index.step >= 1)
        index = index.start if step_ok else None
    if isinstance(index, int) and not isinstance(index, bool) and index < 0:
        return -index
    return None


def _skips_batch_dim(index: Any) -> bool:
    """``shape[index]`` never selects dim 0, whatever the rank: an int >= 1 or
    a forward slice starting at >= 1 (a negative index may reach dim 0)."""
    def positive(i: Any) -> bool:
        return isinstance(i, int) and not isinstance(i, bool) and i >= 1
    if isinstance(index, slice):
        return positive(index.start) and (index.step is None or positive(index.step))
    return positive(index)


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy to convert (the user's model stays as it is), or a
    ConversionError saying why there is none."""
    try:
        return copy.deepcopy(model)
    except Exception as err:  # e.g. torch.nn.utils.weight_norm's hook form is not deep-copyable
        raise ConversionError(
            f"{type(model).__name__} cannot be deep-copied ({type(err).__name__}: {err}); fastspike converts a "
            "copy so that your model stays as it is. Remove what blocks the copy (e.g. replace "
            "torch.nn.utils.weight_norm by torch.nn.utils.parametrizations.weight_norm, or call "
            "remove_weight_norm before converting).") from err
