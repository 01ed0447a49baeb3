"""From a ReLU network to a spiking one, in a few small torch.fx passes.

    qnet = fastspike.quantize(net, levels=8)               # ReLU -> QuantReLU, move max-pools
    fastspike.calibrate(qnet, loader)                      # optional: λ from activation statistics
    ... train or fine-tune qnet ...
    snet = fastspike.to_snn(qnet, time_steps=8, neuron="signed")
    logits = snet(images)                                  # mean over T of the last layer

Each pass does one thing and they are composed in two visible pipelines
(:func:`quantize` and :func:`to_snn`):

* :func:`replace_activations`: every ReLU call site (nn.ReLU, also one module
  called at several sites, F.relu, torch.relu, x.relu(), in-place forms) gets
  its own quantizer; anything else that acts like an activation is refused
  with an error naming the node;
* :func:`move_max_pools`: a max-pool right after a quantizer moves before it
  (exact: max-pooling commutes with a monotone elementwise quantizer); other
  max-pools become average pools with a warning, or are refused in strict mode;
* :func:`fold_batch_norms`: eval-mode BatchNorm folds into the conv/linear
  before it;
* :func:`insert_neurons`: quantizers become spiking neurons (threshold λ);
* :func:`fuse_residual_adds` (``fuse_residual=True``): ``add -> neuron`` (a
  ResNet residual join) becomes one neuron call taking both operands;
* :func:`add_time_axis`: inputs are repeated over T in the merged [T·B, ...]
  layout and outputs read out over T; with ``constant_input_once=True`` the
  part before the first neurons runs once on [B, ...] and is repeated only
  where it meets a time-varying value or reaches the output (the first
  neurons read it as a time broadcast, never copied);
* :func:`fold_spike_scales` (``compact_spikes=True``): a neuron whose every
  consumer is a conv/linear (through average pools, dropout, flatten) emits
  its signed spike counts and the spike scale θ/m moves into those layers'
  input-channel weights.
"""

from __future__ import annotations

import copy
import operator
import os
import re
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval
from torch.utils import _pytree as pytree

from .nn import SpikingNeuron
from .quant import QuantReLU
from .reference import MAX_COMPACT_GROUP

__all__ = [
    "ConversionError",
    "quantize",
    "calibrate",
    "to_snn",
    "replace_activations",
    "move_max_pools",
    "fold_batch_norms",
    "insert_neurons",
    "add_time_axis",
    "time_linear",
    "check_time_rule",
    "check_batch_reads",
    "unknown_activations",
    "fuse_residual_adds",
    "fold_spike_scales",
    "RepeatOverTime",
    "ShapeOverTime",
    "ReadoutOverTime",
    "NEURON_KINDS",
]


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


# ---------------------------------------------------------------------------
# What may act on spikes: the time rule
#
# Between the first spiking layer and the readout, a value differs from one
# time step to the next. An operation there runs once per step, so the SNN
# computes the quantized network only if the operation commutes with the time
# average: f(mean_t s_t) = mean_t f(s_t), i.e. f is affine in its one
# time-varying operand. Those operations are listed here; everything else on
# a time-varying value is refused (accept by rule, not by exception).

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


def _plain_torch_forward(m: nn.Module) -> bool:
    """``m.forward`` is torch's own (not overridden by a user subclass)."""
    return getattr(type(m).forward, "__module__", "").startswith("torch.")


# Modules whose forward (torch's own) is affine in the input at every step.
_AFFINE_MODULES: Tuple[Type[nn.Module], ...] = (
    nn.modules.conv._ConvNd, nn.Linear, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.modules.dropout._DropoutNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
    nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd, nn.modules.padding._CircularPadNd,
)
_MAX_POOL_MODULE_TYPES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)

# Functions and methods that only move, select, copy or cast values.
_REARRANGING_FUNCTIONS = {
    operator.getitem, torch.cat, torch.concat, torch.stack, torch.flatten, torch.reshape, torch.permute,
    torch.transpose, torch.swapaxes, torch.movedim, torch.squeeze, torch.unsqueeze, torch.split,
    torch.chunk, torch.unbind, torch.narrow, torch.select, torch.index_select, torch.gather, torch.t,
    torch.flip, torch.roll, torch.tile, torch.repeat_interleave, torch.clone, F.pad, F.pixel_shuffle,
    F.pixel_unshuffle, F.channel_shuffle, torch.channel_shuffle,
}
_REARRANGING_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "t",
    "swapaxes", "movedim", "squeeze", "unsqueeze", "expand", "expand_as", "repeat", "tile", "chunk",
    "split", "unbind", "narrow", "select", "index_select", "gather", "contiguous", "clone", "detach",
    "flip", "roll", "repeat_interleave", "float", "double", "half", "bfloat16", "to", "type_as",
    "cpu", "cuda", "requires_grad_", "masked_fill",
}
# Sums, means, interpolation, pooling and the layers' functional forms: linear.
_LINEAR_FUNCTIONS = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.neg, operator.pos, torch.add,
    torch.sub, torch.subtract, torch.neg, torch.negative, torch.sum, torch.mean, torch.cumsum,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, torch.avg_pool1d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.adaptive_avg_pool1d, F.interpolate, F.upsample,
    F.upsample_nearest, F.upsample_bilinear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d,
    F.conv_transpose2d, F.conv_transpose3d, F.linear,
}
_LINEAR_METHODS = {"add", "add_", "sub", "sub_", "neg", "neg_", "sum", "mean", "cumsum"}
# Products: linear while at most one factor varies over time (a divisor never may).
_PRODUCT_FUNCTIONS = {operator.mul, operator.imul, torch.mul, torch.multiply, operator.matmul, torch.matmul,
                      torch.mm, torch.bmm, torch.einsum}
_PRODUCT_METHODS = {"mul", "mul_", "matmul", "mm", "bmm"}
_DIVISION_FUNCTIONS = {operator.truediv, operator.itruediv, torch.div, torch.divide, torch.true_divide}
_DIVISION_METHODS = {"div", "div_", "true_divide"}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                      F.feature_alpha_dropout}
# Reads of a tensor's metadata: the value is not the tensor's (see the batch-size rule).
_METADATA_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "get_device", "is_floating_point",
                     "is_complex", "is_contiguous", "new_zeros", "new_ones", "new_empty", "new_full"}
_METADATA_FUNCTIONS = {getattr, len, torch.numel, torch.zeros_like, torch.ones_like, torch.empty_like,
                       torch.full_like}


def _reads_metadata(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    return node.op == "call_function" and node.target in _METADATA_FUNCTIONS


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


def _why_not_time_linear(gm: fx.GraphModule, node: fx.Node, varying: set, spiking: Callable[[fx.Node], bool],
                         inference: bool) -> Optional[str]:
    """None if ``node`` (which reads a time-varying value) computes the same on
    the spikes of each step as on their rate; else the reason it does not."""
    inputs: List[fx.Node] = []  # every time-varying operand, repeats counted (y * y)
    fx.node.map_arg((node.args, node.kwargs), lambda v: inputs.append(v) if v in varying else None)
    if spiking(node) or node.op == "output" or _reads_metadata(node):
        return None
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if _declared_time_linear(m):
            return None
        if isinstance(m, _MAX_POOL_MODULE_TYPES) and node.users and all(spiking(u) for u in node.users):
            return None  # the documented max-pool rule: the neurons after it read the max of each step's current
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and _plain_torch_forward(m):
            if m.track_running_stats and m.running_mean is not None:
                return None  # eval mode: a per-channel affine map
            return "it normalises with the statistics of the batch, which differ between spikes and rates"
        if isinstance(m, _AFFINE_MODULES):
            if _plain_torch_forward(m):
                return None
            return (f"{type(m).__name__} overrides forward(), so fastspike cannot tell that it is still "
                    "affine in its input")
        return f"{type(m).__name__} is not known to be affine in its input"
    target = node.target
    name = getattr(target, "__name__", str(target))
    if node.op == "call_function":
        if target in _REARRANGING_FUNCTIONS or target in _LINEAR_FUNCTIONS:
            if target in (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                          F.conv_transpose3d, F.linear) and any(v in varying for v in node.args[1:3]):
                return "its weight varies over time"
            if target in (operator.getitem, torch.index_select, torch.gather) and any(
                    v in varying for v in node.all_input_nodes if v is not node.args[0]):
                return "its index varies over time"
            return None
        if target in _PRODUCT_FUNCTIONS:
            return None if len(inputs) <= 1 else "it multiplies two time-varying values"
        if target in _DIVISION_FUNCTIONS:
            if _arg_values(node, 2, "rounding_mode") is not None:
                return "it rounds"
            divisor = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
            return "it divides by a time-varying value" if divisor in varying else None
        if target in _DROPOUT_FUNCTIONS:
            if not inference or _arg_values(node, 2, "training") is False:
                return None
            return "it is called with training=True (traced in training mode), so it drops a new random mask at every step"
        if target is F.batch_norm:
            if _arg_values(node, 5, "training") in (None, False) and node.args[1] is not None:
                return None
            return "it normalises with the statistics of the batch"
        if target in _MAX_POOL_FUNCTIONS and node.users and all(spiking(u) for u in node.users):
            return None
        return f"{name} is not affine in its input"
    if target in _REARRANGING_METHODS or target in _LINEAR_METHODS:
        if target in ("index_select", "gather", "masked_fill") and any(
                v in varying for v in node.all_input_nodes if v is not node.args[0]):
            return "its index, mask or fill value varies over time"
        return None
    if target in _PRODUCT_METHODS:
        return None if len(inputs) <= 1 else "it multiplies two time-varying values"
    if target in _DIVISION_METHODS:
        if _arg_values(node, 2, "rounding_mode") is not None:
            return "it rounds"
        return "it divides by a time-varying value" if len(node.args) > 1 and node.args[1] in varying else None
    return f".{target}() is not affine in its input"


def _time_varying(gm: fx.GraphModule, spiking: Callable[[fx.Node], bool]) -> set:
    """The nodes whose value differs between time steps: what a spiking node
    computes and everything computed from it (metadata reads excepted)."""
    varying: set = set()
    for node in gm.graph.nodes:
        if spiking(node) or (not _reads_metadata(node) and any(v in varying for v in node.all_input_nodes)):
            varying.add(node)
    return varying


def check_time_rule(gm: fx.GraphModule, spiking: Callable[[fx.Node], bool], inference: bool) -> None:
    """Raises :class:`ConversionError` for the first operation on a
    time-varying value that does not commute with the time average."""
    varying = _time_varying(gm, spiking)
    for node in gm.graph.nodes:
        if node not in varying or spiking(node):
            continue
        why = _why_not_time_linear(gm, node, varying, spiking, inference)
        if why is None:
            continue
        raise ConversionError(
            f"node '{node.name}' ({_describe(gm, node)}){_source_line(node)} acts on time-varying spikes "
            f"(it comes after a spiking layer) and cannot run on them: {why}. In the SNN it would run on "
            "each time step's spikes, and that differs from running it on their rate, so the SNN would "
            "not compute the quantized network. Replace it with nn.ReLU (which becomes a spiking layer) "
            "or an affine operation, move it out of forward() to after the output, or, if it is a module "
            "that is affine in its input, declare its class with fastspike.time_linear(...).")


def _nonlinear_nodes(gm: fx.GraphModule, most: int = 5) -> str:
    """', whose nonlinear operations are node 'x' (...)' for an error message."""
    every = set(gm.graph.nodes)
    found = [n for n in gm.graph.nodes if n.op.startswith("call_")
             and _why_not_time_linear(gm, n, every, lambda _: False, True) is not None]
    if not found:
        return ""
    return "; its nonlinear operations are " + ", ".join(
        f"node '{n.name}' ({_describe(gm, n)})" for n in found[:most]) + (", ..." if len(found) > most else "")


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


# Operations whose result may share memory with their first argument: an
# in-place ReLU on any of them changes the others too.
_ALIASING_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute",
                     "transpose", "t", "swapaxes", "movedim", "squeeze", "unsqueeze", "expand", "expand_as",
                     "narrow", "select", "split", "chunk", "unbind", "contiguous", "detach", "as_strided"}
_ALIASING_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.permute, torch.transpose,
                       torch.swapaxes, torch.movedim, torch.squeeze, torch.unsqueeze, torch.narrow,
                       torch.select, torch.split, torch.chunk, torch.unbind, torch.t, torch.detach,
                       torch.as_strided, operator.iadd, operator.isub, operator.imul, operator.itruediv}
_ALIASING_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)


def _may_alias_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _ALIASING_METHODS or str(node.target).endswith("_")
    if node.op == "call_function":
        return node.target in _ALIASING_FUNCTIONS or getattr(node.target, "__name__", "").endswith("_")
    if node.op == "call_module":
        m = _module(gm, node)
        return isinstance(m, _ALIASING_MODULES) or bool(getattr(m, "inplace", False))
    return False


def _aliases(gm: fx.GraphModule, value: fx.Node, skip: fx.Node) -> set:
    """The graph values that may share memory with ``value`` (views of it,
    what it is a view of, and so on), ``skip`` left out."""
    found, todo = {value}, [value]
    while todo:
        n = todo.pop()
        related = [u for u in n.users if u is not skip and _may_alias_input(gm, u) and u.args[:1] == (n,)]
        if _may_alias_input(gm, n) and n.args and isinstance(n.args[0], fx.Node):
            related.append(n.args[0])
        for r in related:
            if r not in found:
                found.add(r)
                todo.append(r)
    return found


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


def unknown_activations(model: nn.Module) -> List[Tuple[str, str]]:
    """(module path, class name) of every module that looks like an
    activation, quantizer or spiking neuron but is neither nn.ReLU nor one of
    fastspike's (see :func:`_looks_like_activation`)."""
    return [(name or "(the model itself)", type(m).__name__) for name, m in model.named_modules()
            if _looks_like_activation(m)]


def _refuse_unknown_activations(model: nn.Module) -> None:
    found = unknown_activations(model)
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
    overwrote read the quantizer's output (refused where a view shares it)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if not _is_relu(gm, node):
            continue
        overwritten = _later_reads_of_overwritten(gm, node, order) if _relu_in_place(gm, node) else []
        call = _replace_with_module(gm, node, "quant", make_quantizer())
        for reader in overwritten:
            reader.replace_input_with(call.args[0], call)
    return _finish(gm)


# ---------------------------------------------------------------------------
# Pass: max-pools

_MAX_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_MAX_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool1d, torch.max_pool2d,
                       torch.max_pool3d}
_AVG_POOL_FOR = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def _max_pool_settings(gm: fx.GraphModule, node: fx.Node) -> Optional[Dict[str, Any]]:
    """kernel_size, stride, padding, dilation, ceil_mode, dims of a max-pool node."""
    if node.op == "call_module" and isinstance(_module(gm, node), _MAX_POOL_MODULES):
        m = _module(gm, node)
        dims = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}[type(m)]
        return dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                    dilation=m.dilation, ceil_mode=m.ceil_mode, dims=dims,
                    return_indices=m.return_indices)
    if node.op == "call_function" and node.target in _MAX_POOL_FUNCTIONS:
        names = ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
        values = dict(zip(names, node.args))
        values.update(node.kwargs)
        dims = int(getattr(node.target, "__name__", "max_pool2d")[-2])
        return dict(kernel_size=values["kernel_size"], stride=values.get("stride") or values["kernel_size"],
                    padding=values.get("padding", 0), dilation=values.get("dilation", 1),
                    ceil_mode=values.get("ceil_mode", False), dims=dims,
                    return_indices=values.get("return_indices", False))
    return None


def move_max_pools(gm: fx.GraphModule, strict: bool = False) -> fx.GraphModule:
    """Moves each max-pool that directly follows a quantizer before it;
    replaces the others by average pools (warning) or refuses them (strict)."""
    for node in list(gm.graph.nodes):
        settings = _max_pool_settings(gm, node)
        if settings is None:
            continue
        if settings["return_indices"]:
            raise ConversionError(f"node '{node.name}' is a max-pool returning indices, which has no "
                                  "spiking equivalent; remove return_indices or the unpooling that uses them")
        source = node.args[0]
        if (isinstance(source, fx.Node) and isinstance(_module(gm, source), QuantReLU)
                and len(source.users) == 1):
            # max_pool(q(x)) == q(max_pool(x)): q is monotone and elementwise.
            node.replace_input_with(source, source.args[0])
            node.replace_all_uses_with(source)
            source.args = (node,)
            source.prepend(node)  # keep topological order: the pool now runs first
            continue
        if strict:
            raise ConversionError(
                f"node '{node.name}' is a max-pool that does not directly follow a ReLU, so it cannot "
                "be moved before the activation and has no exact spiking equivalent; replace it with "
                "average pooling and fine-tune, or call quantize(..., strict=False) to have it replaced")
        if settings["dilation"] not in (1, (1,) * settings["dims"]):
            raise ConversionError(f"node '{node.name}' is a dilated max-pool, which has no average-pool "
                                  "equivalent; replace it by hand before converting")
        warnings.warn(f"fastspike: max-pool node '{node.name}' does not follow a ReLU; it is replaced by "
                      "an average pool with the same window (pass strict=True to refuse instead)",
                      stacklevel=3)
        _replace_with_module(gm, node, "avgpool", _AVG_POOL_FOR[settings["dims"]](
            settings["kernel_size"], settings["stride"], settings["padding"], settings["ceil_mode"]))
    return _finish(gm)


def quantize(
    model: nn.Module,
    levels: int = 8,
    preset: str = "qcfs",
    *,
    threshold: float = 8.0,
    strict: bool = False,
    leaf_modules: Sequence[Type[nn.Module]] = (),
    example_input: Optional[torch.Tensor] = None,
) -> fx.GraphModule:
    """Returns a copy of ``model`` with every ReLU call site replaced by its own
    :class:`~fastspike.quant.QuantReLU` (``levels``, ``preset``, initial clip
    value ``threshold``) and max-pools handled as described in the module doc.

    ``example_input`` runs one forward so that per-channel quantizers
    ("cs-qcfs") create their parameters now rather than on the first batch.
    """
    _refuse_unknown_activations(model)
    gm = trace(copy.deepcopy(model), leaf_modules)
    gm = replace_activations(gm, lambda: QuantReLU(levels, preset, threshold))
    if not quantizers(gm):
        raise ConversionError(f"quantize found no ReLU in {type(model).__name__}: fastspike converts ReLU "
                              f"networks (nn.ReLU, F.relu, torch.relu, x.relu() and their in-place forms)"
                              f"{_nonlinear_nodes(gm)}. Replace it with nn.ReLU and retrain or fine-tune the "
                              "network before converting.")
    gm = move_max_pools(gm, strict)
    check_time_rule(gm, lambda n: isinstance(_module(gm, n), QuantReLU), inference=False)
    if example_input is not None:
        with torch.no_grad():
            was_training = gm.training
            gm.eval()
            gm(example_input)
            gm.train(was_training)
    return gm


def quantizers(model: nn.Module) -> List[Tuple[str, QuantReLU]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantReLU)]


# ---------------------------------------------------------------------------
# Calibration


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


# ---------------------------------------------------------------------------
# Passes of to_snn


def fold_batch_norms(gm: fx.GraphModule) -> fx.GraphModule:
    """Folds each eval-mode BatchNorm whose input is a conv/linear used only by
    it into that layer's weights and bias. Only into a layer that runs torch's
    own forward (a subclass that transforms its weight would transform the
    folded one: such a BN stays, as the per-channel affine map it is); a
    layer called at several sites gets a copy for this site, so the others
    keep the unfolded weights."""
    for node in list(gm.graph.nodes):
        bn = _module(gm, node)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats:
            continue
        source = node.args[0]
        layer = _module(gm, source) if isinstance(source, fx.Node) else None
        if layer is None or len(source.users) != 1 or not _plain_torch_forward(layer):
            continue
        if isinstance(layer, nn.modules.conv._ConvNd) and not isinstance(layer, nn.modules.conv._ConvTransposeNd):
            fuse = fuse_conv_bn_eval
        elif isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
            fuse = fuse_linear_bn_eval
        else:
            continue
        fused = fuse(layer.eval(), bn.eval())  # a new module: the layer itself is untouched
        if _called_once(gm, source):
            parent, _, attr = source.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, attr, fused)
        else:
            name = _fresh_name(gm, source.target.replace(".", "_") + "_bn")
            gm.add_submodule(name, fused)
            source.target = name
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
    return _finish(gm)


NEURON_KINDS = {"if": (1, False), "signed": (1, True), "group": (None, False), "signed-group": (None, True)}


def insert_neurons(gm: fx.GraphModule, time_steps: int, neuron: str = "if",
                   group_size: Optional[int] = None, **neuron_kwargs) -> fx.GraphModule:
    """Replaces every quantizer by a spiking neuron layer with threshold λ
    (per channel where the quantizer is) in the merged layout."""
    if neuron not in NEURON_KINDS:
        raise ValueError(f"neuron must be one of {sorted(NEURON_KINDS)}, got {neuron!r}")
    members, signed = NEURON_KINDS[neuron]
    if members is None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
            raise ValueError(f"neuron={neuron!r} needs group_size >= 2, got {group_size!r}")
        members = group_size
    elif group_size not in (None, 1):
        raise ValueError(f"group_size={group_size} only applies to neuron='group' or 'signed-group'")
    replaced = 0
    for node in list(gm.graph.nodes):
        quant = _module(gm, node)
        if not isinstance(quant, QuantReLU):
            continue
        if quant.per_channel and quant.raw_threshold.numel() == 0:
            raise ConversionError(f"quantizer '{node.target}' never saw an input, so its per-channel "
                                  "thresholds do not exist yet: run the quantized model once (or pass "
                                  "example_input= to quantize) before converting")
        layer = SpikingNeuron(quant.threshold().detach().float(), time_steps, group_size=members,
                              signed=signed, **neuron_kwargs)
        parent, _, attr = node.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, layer)
        replaced += 1
    if replaced == 0:
        relus = [n for n in gm.graph.nodes if _is_relu(gm, n)]
        if relus:
            raise ConversionError(f"node '{relus[0].name}' ({_describe(gm, relus[0])}) is an activation that "
                                  "was not quantized; call fastspike.quantize on the model first")
        raise ConversionError("the model has no QuantReLU to turn into neurons and no ReLU to quantize"
                              f"{_nonlinear_nodes(gm)}: fastspike converts ReLU networks; call "
                              "fastspike.quantize on a ReLU network first")
    gm.recompile()
    return gm


# Defaults of to_snn's optimisations: on only where measured to save time or
# peak memory with unchanged outputs (README, "From a network to an SNN").
FUSE_RESIDUAL_DEFAULT = True
CONSTANT_INPUT_ONCE_DEFAULT = True
COMPACT_SPIKES_DEFAULT = False


class RepeatOverTime(nn.Module):
    """[B, ...] -> [T·B, ...]: the same analog input at every step (time-major)."""

    def __init__(self, time_steps: int):
        super().__init__()
        self.time_steps = time_steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(0).expand((self.time_steps,) + tuple(x.shape)).reshape(
            (self.time_steps * x.shape[0],) + tuple(x.shape[1:]))


class ShapeOverTime(nn.Module):
    """[B, ...] -> the torch.Size of the [T·B, ...] tensor RepeatOverTime would
    make, without making it (a module, so a saved network reloads: fx re-traces
    with every module kept as one call)."""

    def __init__(self, time_steps: int):
        super().__init__()
        self.time_steps = time_steps

    def forward(self, x: torch.Tensor) -> torch.Size:
        return torch.Size((self.time_steps * x.shape[0],) + tuple(x.shape[1:]))


class ReadoutOverTime(nn.Module):
    """[T·B, ...] -> the mean or sum over T ([B, ...]) or the sequence [T, B, ...],
    applied to every tensor of a (possibly nested) output."""

    def __init__(self, time_steps: int, mode: str = "mean"):
        super().__init__()
        if mode not in ("mean", "sum", "sequence"):
            raise ValueError(f"readout must be 'mean', 'sum' or 'sequence', got {mode!r}")
        self.time_steps = time_steps
        self.mode = mode

    def _one(self, y: Any) -> Any:
        if not isinstance(y, torch.Tensor) or y.dim() == 0:
            return y
        seq = y.view((self.time_steps, y.shape[0] // self.time_steps) + tuple(y.shape[1:]))
        if self.mode == "sequence":
            return seq
        return seq.mean(0) if self.mode == "mean" else seq.sum(0)

    def forward(self, y: Any) -> Any:
        return pytree.tree_map(self._one, y)


def _is_neuron(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(_module(gm, node), SpikingNeuron)


def _called_once(gm: fx.GraphModule, node: fx.Node) -> bool:
    """The module ``node`` calls is called from no other node (so per-site settings are safe)."""
    return sum(n.op == "call_module" and n.target == node.target for n in gm.graph.nodes) == 1


def _placeholder_descendants(gm: fx.GraphModule) -> set:
    """Nodes computed from the network's inputs (not parameters or constants)."""
    found = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(i in found for i in node.all_input_nodes):
            found.add(node)
    return found


# ---------------------------------------------------------------------------
# Pass: residual join -> one neuron call with two operands

_ADD_FUNCTIONS = {operator.add, torch.add}
_INPLACE_ADD_FUNCTIONS = {operator.iadd}
_ADD_METHODS = {"add"}
_INPLACE_ADD_METHODS = {"add_"}


def _tensor_add_operands(node: fx.Node) -> Optional[Tuple[fx.Node, fx.Node]]:
    """(a, b) of a plain a + b (no alpha=, no out=) on two graph values."""
    is_add = ((node.op == "call_function" and node.target in _ADD_FUNCTIONS | _INPLACE_ADD_FUNCTIONS)
              or (node.op == "call_method" and node.target in _ADD_METHODS | _INPLACE_ADD_METHODS))
    if not is_add or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    in_place = node.target in _INPLACE_ADD_FUNCTIONS or node.target in _INPLACE_ADD_METHODS
    if in_place and len(a.users) != 1:
        return None  # someone else reads the tensor the in-place add overwrites
    return a, b


def fuse_residual_adds(gm: fx.GraphModule) -> fx.GraphModule:
    """Turns each ``neuron(a + b)`` whose sum has no other use, with a and b
    both computed from the inputs, into ``neuron(a, b)``: the neuron op adds
    the residual while charging (same rounding as torch's add), so the sum is
    never written to memory. Operands that turn out at run time to broadcast
    or to differ in dtype are added as before by the layer."""
    dynamic = _placeholder_descendants(gm)
    for node in list(gm.graph.nodes):
        operands = _tensor_add_operands(node)
        if operands is None or len(node.users) != 1 or not all(o in dynamic for o in operands):
            continue
        user = next(iter(node.users))
        if not _is_neuron(gm, user) or user.args != (node,) or user.kwargs:
            continue
        user.args = operands
        gm.graph.erase_node(node)
    return _finish(gm)


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


def _size_dims(node: fx.Node) -> List[Any]:
    """The dim arguments of an ``x.size(...)`` call (none for the whole shape)."""
    return list(node.args[1:]) + list(node.kwargs.values())


def _reads_full_shape(node: fx.Node) -> bool:
    """``x.shape`` or ``x.size()``: the whole torch.Size."""
    return ((node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",))
            or (node.op == "call_method" and node.target == "size" and not _size_dims(node)))


def _skips_batch_dim(index: Any) -> bool:
    """``shape[index]`` never selects dim 0, whatever the rank: an int >= 1 or
    a forward slice starting at >= 1 (a negative index may reach dim 0)."""
    def positive(i: Any) -> bool:
        return isinstance(i, int) and not isinstance(i, bool) and i >= 1
    if isinstance(index, slice):
        return positive(index.start) and (index.step is None or positive(index.step))
    return positive(index)


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

    def repeat(value: fx.Node) -> fx.Node:
        if value not in repeated:
            with gm.graph.inserting_after(value):
                repeated[value] = gm.graph.call_module("repeat_over_time", (value,))
            varying.add(repeated[value])
        return repeated[value]

    def repeat_constant_inputs(node: fx.Node) -> None:
        for value in node.all_input_nodes:
            if value in constant:
                node.replace_input_with(value, repeat(value))

    for node in list(gm.graph.nodes):
        if node.op == "placeholder":
            if constant_input_once:
                constant.add(node)
            else:
                rep = repeat(node)
                node.replace_all_uses_with(rep, delete_user_cb=lambda user: user is not rep)
        elif node.op == "output":
            if constant_input_once:
                node.args = fx.node.map_arg(node.args, lambda v: repeat(v) if v in constant else v)
            with gm.graph.inserting_before(node):
                read = gm.graph.call_module("readout_over_time", (node.args[0],))
            node.args = (read,)
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


# ---------------------------------------------------------------------------
# Pass: compact spikes, the spike scale folded into the consumers

_SCALE_PASSTHROUGH_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                              nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Dropout, nn.Identity)


def _flattens_channels(gm: fx.GraphModule, node: fx.Node) -> bool:
    """flatten(x, 1) in any spelling: [N, C, ...] -> [N, C·...], channel-major."""
    m = _module(gm, node)
    if isinstance(m, nn.Flatten):
        return m.start_dim == 1 and m.end_dim == -1
    if (node.op == "call_function" and node.target is torch.flatten) or (
            node.op == "call_method" and node.target == "flatten"):
        rest = list(node.args[1:]) + [node.kwargs.get(k) for k in ("start_dim", "end_dim") if k in node.kwargs]
        return rest[:1] == [1] and rest[1:] in ([], [-1])
    return False


def _scale_consumers(gm: fx.GraphModule, node: fx.Node, flattened: bool = False) -> Optional[List[Tuple[nn.Module, bool]]]:
    """The conv/linear layers that every use of ``node`` reaches through
    linear, channel-preserving nodes (average pools, dropout, identity, one
    flatten before a linear), as (layer, flattened); None if some use is
    anything else."""
    found: List[Tuple[nn.Module, bool]] = []
    for user in node.users:
        m = _module(gm, user)
        if user.args[:1] != (node,) or (len(user.args) > 1 and not _flattens_channels(gm, user)):
            return None
        if isinstance(m, nn.Linear) or (isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not flattened
                                        and m.groups == 1 and m.padding_mode == "zeros"):
            if not _called_once(gm, user):
                return None  # a layer called at several sites cannot take one site's scale
            found.append((m, flattened))
            continue
        if isinstance(m, _SCALE_PASSTHROUGH_MODULES) and not user.kwargs and not flattened:
            further = _scale_consumers(gm, user, flattened)
        elif _flattens_channels(gm, user) and not flattened:
            further = _scale_consumers(gm, user, True)
        else:
            return None
        if further is None:
            return None
        found += further
    return found or None


def _per_input_scale(layer: nn.Module, scale: torch.Tensor, flattened: bool) -> Optional[torch.Tensor]:
    """The scale of each input of ``layer`` (weight.shape[1] of them), or None
    if the spike scale's shape does not map onto them."""
    inputs = layer.weight.shape[1]
    if scale.dim() == 0:
        return scale.expand(inputs)
    if scale.dim() == 1 and flattened and inputs % scale.numel() == 0:
        return scale.repeat_interleave(inputs // scale.numel())  # flatten(1) is channel-major
    if scale.dim() == 1 and scale.numel() == inputs:
        return scale
    return None


def fold_spike_scales(gm: fx.GraphModule) -> fx.GraphModule:
    """For each neuron whose every consumer is a conv/linear (see
    :func:`_scale_consumers`), multiplies those layers' input-channel weights
    by the spike scale u = θ/m and makes the neuron emit its signed counts
    k⁺ − k⁻ (from the op's compact int8 output) instead of (k⁺ − k⁻)·u. Exact up
    to float rounding (W·u·k instead of W·(k·u)); inference only."""
    for node in gm.graph.nodes:
        if not _is_neuron(gm, node) or not _called_once(gm, node):
            continue
        layer = _module(gm, node)
        consumers = _scale_consumers(gm, node)
        if not consumers or layer.group_size > MAX_COMPACT_GROUP:
            continue
        scales = [_per_input_scale(m, layer.spike_scale(), flat) for m, flat in consumers]
        if any(scale is None for scale in scales):
            continue
        with torch.no_grad():
            for (m, _), scale in zip(consumers, scales):
                weight = m.weight
                weight.mul_(scale.to(weight.dtype).view((1, -1) + (1,) * (weight.dim() - 2)))
        layer.compact = True
    gm.recompile()
    return gm


def _auto_group_size(qmodel: nn.Module, time_steps: int, neuron: str) -> Tuple[str, int]:
    """(neuron kind, m) for ``group_size="auto"``: m = L / T (Lv et al.)."""
    levels = sorted({q.levels for _, q in quantizers(qmodel)})
    if not levels:
        raise ConversionError("group_size='auto' needs quantizers (QuantReLU) to read L from; "
                              "call fastspike.quantize first")
    if len(levels) > 1:
        raise ConversionError(f"group_size='auto' needs one L in every layer, the quantizers have "
                              f"levels {levels}; pass group_size=m")
    if levels[0] % time_steps != 0:
        raise ValueError(f"group_size='auto' sets m = L / T, but T={time_steps} does not divide "
                         f"L={levels[0]}; pick T among the divisors of L or pass group_size=m")
    members = levels[0] // time_steps
    signed = neuron in ("signed", "signed-group")
    if members == 1:
        return ("signed" if signed else "if"), 1
    return ("signed-group" if signed else "group"), members


def to_snn(
    qmodel: nn.Module,
    time_steps: int,
    neuron: str = "if",
    *,
    group_size: Optional[Union[int, str]] = None,
    readout: str = "mean",
    leaf_modules: Sequence[Type[nn.Module]] = (),
    fuse_residual: bool = FUSE_RESIDUAL_DEFAULT,
    constant_input_once: bool = CONSTANT_INPUT_ONCE_DEFAULT,
    compact_spikes: bool = COMPACT_SPIKES_DEFAULT,
    fold_bn: bool = True,
    **neuron_kwargs,
) -> fx.GraphModule:
    """Converts a quantized network into a spiking one that runs all
    ``time_steps`` steps through the fused neuron kernels in one call.

    Args:
        qmodel: the output of :func:`quantize` (trained or calibrated).
        time_steps: T. IF neurons reproduce the quantized ANN exactly on
            constant input when T = levels; group neurons when m·T = levels.
        neuron: "if", "signed" (Fast-SNN), "group" or "signed-group".
        group_size: m for the group kinds; ``"auto"``: m = L / T (the
            group-neuron paper's rule, L the quantizers' levels, which must
            be the same in every layer and a multiple of T); m = 1 gives
            plain (or signed) IF neurons.
        readout: "mean" (default), "sum" or "sequence" ([T, B, ...]).
        fuse_residual: emit one neuron call for each ``add -> activation``
            (ResNet residual joins), so the sum is never stored
            (:func:`fuse_residual_adds`). Same outputs, bit for bit.
        constant_input_once: run everything before the first neurons once
            on [B, ...] instead of on the T-fold repeated batch; the first
            neurons read that current as a time broadcast. Same outputs, bit
            for bit; gradients equal up to float rounding (sums over T are
            taken in another order).
        compact_spikes: neurons whose consumers are all conv/linear layers
            emit int8 spike counts, with θ/m folded into those layers'
            weights (:func:`fold_spike_scales`). Outputs equal up to float
            rounding; inference only.
        fold_bn: fold eval-mode BatchNorm into the conv/linear before it
            (default). ``False`` keeps each BatchNorm as its own per-channel
            op, which rounds as the unconverted network does (the exact
            reproduction mode of :mod:`fastspike.interop`).
        neuron_kwargs: passed to each :class:`~fastspike.nn.SpikingNeuron`
            (e.g. grad="rate", init_fraction=...).

    The defaults of the three options are what measured faster or smaller
    here (see README, "From a network to an SNN").

    The input is the usual [B, ...] analog batch; the result is in eval mode.
    """
    if isinstance(time_steps, bool) or not isinstance(time_steps, int) or time_steps < 1:
        raise ValueError(f"time_steps must be an integer >= 1, got {time_steps!r}")
    _refuse_unknown_activations(qmodel)
    gm = trace(copy.deepcopy(qmodel), leaf_modules).eval()
    if group_size == "auto":
        neuron, group_size = _auto_group_size(qmodel, time_steps, neuron)
    if fold_bn:
        gm = fold_batch_norms(gm)
    gm = insert_neurons(gm, time_steps, neuron, group_size, **neuron_kwargs)
    check_time_rule(gm, lambda n: _is_neuron(gm, n), inference=True)
    check_batch_reads(gm)
    if fuse_residual:
        gm = fuse_residual_adds(gm)
    gm = add_time_axis(gm, time_steps, readout, constant_input_once)
    if compact_spikes:
        gm = fold_spike_scales(gm)
    gm.time_steps = time_steps
    return gm
