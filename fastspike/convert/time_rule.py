"""The time rule: which operations may act on time-varying spikes."""

from __future__ import annotations

import operator
from typing import Any, Callable, Container, Dict, List, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import (_VALUE_ATTRS, ConversionError, _aliases, _arg_values, _declared_time_linear, _describe,
                    _has_forward_hooks, _plain_torch_compute, _plain_torch_forward, _source_line, _writes_in_place)
from .max_pools import _MAX_POOL_FUNCTIONS, _MAX_POOL_MODULES

# ---------------------------------------------------------------------------
# What may act on spikes: the time rule
#
# Between the first spiking layer and the readout, a value differs from one
# time step to the next. An operation there runs once per step, so the SNN
# computes the quantized network only if the operation commutes with the time
# average: f(mean_t s_t) = mean_t f(s_t), i.e. f is affine in its one
# time-varying operand. Those operations are listed here; everything else on
# a time-varying value is refused (accept by rule, not by exception).


# Modules whose forward (torch's own) is affine in the input at every step.
_AFFINE_MODULES: Tuple[Type[nn.Module], ...] = (
    nn.modules.conv._ConvNd, nn.Linear, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.modules.dropout._DropoutNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
    nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd, nn.modules.padding._CircularPadNd,
)

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
# input + mat1 @ mat2 (torch.addmm(input, mat1, mat2) or input.addmm(mat1, mat2): the factors at
# 1 and 2 either way): linear while at most one factor varies.
_ADD_PRODUCT = {"addmm": ("mat1", "mat2"), "baddbmm": ("batch1", "batch2"), "addmv": ("mat", "vec")}
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
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] not in _VALUE_ATTRS
    return node.op == "call_function" and node.target in _METADATA_FUNCTIONS


# Tensor type names of .type('torch.FloatTensor') (also torch.cuda.*) that are floating.
_FLOATING_TYPE_NAMES = {"FloatTensor", "DoubleTensor", "HalfTensor", "BFloat16Tensor"}


def _known_dtype(gm: fx.GraphModule, value: Any, varying: Container[fx.Node]) -> Optional[torch.dtype]:
    """The dtype ``value`` (a dtype, or a tensor whose dtype a cast takes) stands for,
    where the graph tells it: a literal, a parameter, buffer or constant (get_attr),
    ``t.dtype`` of a known ``t``, a cast to a literal dtype, fx's shape metadata; a
    time-varying value is floating (every cast of spikes to another dtype is refused).
    None when unknown."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, torch.Tensor):
        return value.dtype
    if not isinstance(value, fx.Node):
        return None
    for key in ("val", "tensor_meta"):
        dtype = getattr(value.meta.get(key), "dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
    if value.op == "get_attr":
        try:
            attr = fx.graph_module._get_attr(gm, value.target)
        except AttributeError:
            return None
        return attr.dtype if isinstance(attr, torch.Tensor) else None
    if value.op == "call_function" and value.target is getattr and value.args[1:] == ("dtype",):
        return _known_dtype(gm, value.args[0], varying)
    if value.op == "call_method" and value.target in _CAST_METHODS:
        return _CAST_METHODS[value.target]
    if value.op == "call_method" and value.target == "to":
        literal = [a for a in list(value.args[1:]) + list(value.kwargs.values()) if isinstance(a, torch.dtype)]
        if literal:
            return literal[0]
    if value in varying:
        return torch.get_default_dtype()  # floating: which one does not matter here
    return None


_CAST_METHODS = {"float": torch.float32, "double": torch.float64, "half": torch.float16,
                 "bfloat16": torch.bfloat16}


def _why_not_cast(gm: fx.GraphModule, node: fx.Node, varying: Container[fx.Node],
                  unknown: Optional[List[Tuple[fx.Node, fx.Node]]] = None) -> Optional[str]:
    """A cast of spikes to a non-floating dtype rounds each step's value, so it
    is refused however it is spelled: a dtype anywhere in the call (``.to(torch.long)``,
    ``sum(dtype=torch.int64)``), the dtype of another tensor (``.to(t)``,
    ``.type_as(t)``, ``.to(t.dtype)``: accepted only where that dtype is known to be
    floating), a type name (``.type('torch.LongTensor')``). A view as another
    dtype reinterprets the bits."""
    literals: List[torch.dtype] = []
    fx.node.map_aggregate((node.args, node.kwargs),
                          lambda a: literals.append(a) if isinstance(a, torch.dtype) else None)
    if node.op == "call_method" and node.target == "view" and literals:
        return "it views the tensor as another dtype, which reinterprets its bits"
    for dtype in literals:
        if not dtype.is_floating_point:
            return f"it casts to {dtype}, not a floating dtype, which rounds"
    others: List[Any] = []
    if node.op == "call_method" and node.target in ("to", "type_as", "type"):
        others = [a for a in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(a, fx.Node)
                  and not (a.op == "call_function" and a.target is getattr and a.args[1:] == ("device",))]
    if isinstance(node.kwargs.get("dtype"), fx.Node) and node.kwargs["dtype"] not in others:
        others.append(node.kwargs["dtype"])
    for other in others:
        dtype = _known_dtype(gm, other, varying)
        if other.op == "call_function" and other.target is getattr and isinstance(other.args[0], fx.Node):
            other = other.args[0]  # .to(t.dtype): name t
        if dtype is None and unknown is not None:
            unknown.append((node, other))  # checked when the network runs (check_time_rule)
            continue
        if dtype is None:
            return (f"it casts to the dtype of '{other.name}', which fastspike cannot tell is floating (a cast to "
                    "an integer or bool dtype would round); cast to an explicit floating dtype instead "
                    "(.float(), .to(torch.float32))")
        if not dtype.is_floating_point:
            return f"it casts to the dtype of '{other.name}', {dtype}, not a floating dtype, which rounds"
    if node.op == "call_method" and node.target == "type":
        names = [a for a in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(a, str)]
        if not names and not literals and not others:
            return ".type() without a dtype returns the type's name, not a tensor"
        for name in names:
            if name.rsplit(".", 1)[-1] not in _FLOATING_TYPE_NAMES:
                return f"it casts to {name}, not a floating type, which rounds"
    return None


def _why_not_division(node: fx.Node, varying: Container[fx.Node]) -> Optional[str]:
    """x / y, torch.div(x, y), x.div(y) (or other=y): exact only without rounding and with a constant divisor."""
    if _arg_values(node, 2, "rounding_mode") is not None:
        return "it rounds"
    divisor = _arg_values(node, 1, "other")
    return "it divides by a time-varying value" if isinstance(divisor, fx.Node) and divisor in varying else None


def _why_not_time_linear(gm: fx.GraphModule, node: fx.Node, varying: Container[fx.Node],
                         spiking: Callable[[fx.Node], bool], inference: bool,
                         unknown_dtypes: Optional[List[Tuple[fx.Node, fx.Node]]] = None) -> Optional[str]:
    """None if ``node`` (which reads a time-varying value) computes the same on
    the spikes of each step as on their rate; else the reason it does not."""
    inputs = [v for v in _reads(node) if v in varying]  # every time-varying operand, repeats counted (y * y)
    if spiking(node) or node.op == "output" or _reads_metadata(node):
        return None
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if _has_forward_hooks(m):
            return (f"{type(m).__name__} has forward hooks, which would run on each time step's spikes, and "
                    "fastspike cannot tell what they compute; remove them before converting "
                    "(fastspike.nn.record_spike_trains records spikes without hooks)")
        if _declared_time_linear(m):
            return None
        if isinstance(m, _MAX_POOL_MODULES) and node.users and all(spiking(u) for u in node.users):
            return None  # the documented max-pool rule: the neurons after it read the max of each step's current
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and _plain_torch_forward(m):
            if m.track_running_stats and m.running_mean is not None:
                return None  # eval mode: a per-channel affine map
            return "it normalises with the statistics of the batch, which differ between spikes and rates"
        if isinstance(m, _AFFINE_MODULES):
            if _plain_torch_compute(m):
                return None
            return (f"{type(m).__name__} overrides forward() (or _conv_forward()), so fastspike cannot tell "
                    "that it is still affine in its input")
        return f"{type(m).__name__} is not known to be affine in its input"
    why = _why_not_cast(gm, node, varying, unknown_dtypes)
    if why is not None:
        return why
    target = node.target
    name = getattr(target, "__name__", str(target))
    if name == "where" and node.op in ("call_function", "call_method"):
        # a per-element choice between values: linear in them while the condition is fixed
        if node.op == "call_function" and len(node.args) + len(node.kwargs) < 3:
            return "torch.where(condition) returns the indices of the time-varying values"
        cond = _arg_values(node, 0 if node.op == "call_function" else 1, "condition")
        return "its condition varies over time" if isinstance(cond, fx.Node) and cond in varying else None
    if name in _ADD_PRODUCT and node.op in ("call_function", "call_method"):
        factors = [_arg_values(node, 1 + i, key) for i, key in enumerate(_ADD_PRODUCT[name])]
        if sum(isinstance(f, fx.Node) and f in varying for f in factors) > 1:
            return "it multiplies two time-varying values"
        return None
    if node.op == "call_function":
        if target is getattr and node.args[1] in ("T", "mT", "H", "mH", "data"):
            return None  # a transposed view or the tensor itself (the batch rule looks at dim 0)
        if target in _REARRANGING_FUNCTIONS or target in _LINEAR_FUNCTIONS:
            if target in (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                          F.conv_transpose3d, F.linear) and any(v in varying for v in node.args[1:3]):
                return "its weight varies over time"
            if target in (operator.getitem, torch.index_select, torch.gather) and any(
                    v in varying for v in node.all_input_nodes if v is not _arg_values(node, 0, "input")):
                return "its index varies over time"
            return None
        if target in _PRODUCT_FUNCTIONS:
            return None if len(inputs) <= 1 else "it multiplies two time-varying values"
        if target in _DIVISION_FUNCTIONS:
            return _why_not_division(node, varying)
        if target in _DROPOUT_FUNCTIONS:
            if not inference or _arg_values(node, 2, "training") is False:
                return None
            return "it is called with training=True (traced in training mode), so it drops a new random mask at every step"
        if target is F.batch_norm:
            if _arg_values(node, 5, "training") in (None, False) and _arg_values(node, 1, "running_mean") is not None:
                return None
            return "it normalises with the statistics of the batch"
        if target in _MAX_POOL_FUNCTIONS and node.users and all(spiking(u) for u in node.users):
            return None
        return f"{name} is not affine in its input"
    if target == "type":
        return None  # a cast to a floating type (_why_not_cast)
    if target in _REARRANGING_METHODS or target in _LINEAR_METHODS:
        if target in ("index_select", "gather", "masked_fill") and any(
                v in varying for v in node.all_input_nodes if v is not node.args[0]):
            return "its index, mask or fill value varies over time"
        return None
    if target in _PRODUCT_METHODS:
        return None if len(inputs) <= 1 else "it multiplies two time-varying values"
    if target in _DIVISION_METHODS:
        return _why_not_division(node, varying)
    return f".{target}() is not affine in its input"


def _reads(node: fx.Node) -> List[fx.Node]:
    """The graph values ``node`` reads: its operands, not the out= tensors it only writes
    (nor the tensor of ``t.new_tensor(data)``, whose dtype and device only are read)."""
    found: List[fx.Node] = []
    args = node.args[1:] if node.op == "call_method" and node.target == "new_tensor" else node.args
    fx.node.map_arg((args, {k: v for k, v in node.kwargs.items() if k != "out"}), found.append)
    return found


def _time_varying_since(gm: fx.GraphModule, spiking: Callable[[fx.Node], bool],
                        writes: bool = True) -> Dict[fx.Node, int]:
    """The nodes whose value differs between time steps, each with the position
    (in graph order) from which it does: what a spiking node computes and
    everything computed from it (metadata reads excepted), and, with
    ``writes``, a tensor that a time-varying value is written into (in place,
    ``x.add_(s)``, or by ``out=``) together with everything that shares its
    memory: its views, taken before the write or after, and what it is a view
    of. A node reading one of those after the write reads spikes; one reading
    it before does not."""
    since: Dict[fx.Node, int] = {}
    for position, node in enumerate(gm.graph.nodes):
        if spiking(node) or (not _reads_metadata(node) and any(v in since for v in _reads(node))):
            since.setdefault(node, position)
            if writes:
                for written in _writes_in_place(node):
                    for alias in _aliases(gm, written, skip=node):
                        since.setdefault(alias, position)
    return since


def _time_varying(gm: fx.GraphModule, spiking: Callable[[fx.Node], bool], writes: bool = True) -> set:
    """The nodes whose value differs between time steps (see :func:`_time_varying_since`)."""
    return set(_time_varying_since(gm, spiking, writes))


class _VaryingBefore:
    """The values that vary over time where the node at ``position`` runs (``v in ...``):
    a tensor written with spikes varies only from that write on."""

    def __init__(self, since: Dict[fx.Node, int], position: int):
        self.since, self.position = since, position

    def __contains__(self, value: Any) -> bool:
        return isinstance(value, fx.Node) and self.since.get(value, self.position) < self.position


def check_time_rule(gm: fx.GraphModule, spiking: Callable[[fx.Node], bool], inference: bool) -> None:
    """Raises :class:`ConversionError` for the first operation on a
    time-varying value that does not commute with the time average."""
    since = _time_varying_since(gm, spiking)
    # Casts of spikes to the dtype of a tensor the graph does not type (the input: y.to(x.dtype)):
    # the network checks that dtype is floating when it runs (torch._assert), as for the rank guards.
    unknown: List[Tuple[fx.Node, fx.Node]] = []
    for position, node in enumerate(gm.graph.nodes):
        varying = _VaryingBefore(since, position)
        if spiking(node) or not any(v in varying for v in _reads(node)):
            continue
        why = _why_not_time_linear(gm, node, varying, spiking, inference, unknown)
        if why is None:
            continue
        raise ConversionError(
            f"node '{node.name}' ({_describe(gm, node)}){_source_line(node)} acts on time-varying spikes "
            f"(it comes after a spiking layer) and cannot run on them: {why}. In the SNN it would run on "
            "each time step's spikes, and that differs from running it on their rate, so the SNN would "
            "not compute the quantized network. Replace it with nn.ReLU (which becomes a spiking layer) "
            "or an affine operation, move it out of forward() to after the output, or, if it is a module "
            "that is affine in its input, declare its class with fastspike.time_linear(...).")
    for node, tensor in unknown:
        why = (f"fastspike: node '{node.name}' ({_describe(gm, node)}){_source_line(node)} casts time-varying "
               f"spikes to the dtype of '{tensor.name}', which is not a floating dtype here; such a cast rounds "
               "each step's value, so the SNN would not compute the quantized network. Cast to an explicit "
               "floating dtype (.float()).")
        with gm.graph.inserting_before(node):
            floating = gm.graph.call_function(torch.is_floating_point, (tensor,))
            gm.graph.call_function(torch._assert, (floating, why))
    if unknown:
        gm.recompile()


def _nonlinear_nodes(gm: fx.GraphModule, most: int = 5) -> str:
    """', whose nonlinear operations are node 'x' (...)' for an error message."""
    every = set(gm.graph.nodes)
    found = [n for n in gm.graph.nodes if n.op.startswith("call_")
             and _why_not_time_linear(gm, n, every, lambda _: False, True) is not None]
    if not found:
        return ""
    return "; its nonlinear operations are " + ", ".join(
        f"node '{n.name}' ({_describe(gm, n)})" for n in found[:most]) + (", ..." if len(found) > most else "")
