"""The batch rules: in the merged [T·B, ...] layout a read of dim 0 gives T·B,
and dim 0 holds time steps as well as samples."""

from __future__ import annotations

import operator
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import (ConversionError, _descendants, _describe, _is_neuron, _negative_reach,
                    _placeholder_descendants, _reads_full_shape, _size_dims, _skips_batch_dim, _source_line)
from .time_rule import _reads_metadata, _time_varying

# ---------------------------------------------------------------------------
# What may read the batch size: in the converted network the T time steps are
# merged into the batch ([T·B, ...]), so x.shape[0] is T·B. That is right for
# shapes (x.view(x.size(0), -1) keeps each row's values) and wrong for values
# (torch.arange(x.shape[0]) counts T·B rows).
#
# A dim counted from the end (x.size(-1), shape[-2:], cumsum(-1), cat(dim=-1))
# is dim 0 only on a tensor of low enough rank, which fx does not know: such a
# use is accepted and the converted network checks the rank when it runs
# (torch._assert, a guard), so a rank-1 [T·B] tensor is refused, not mixed.

# (node to guard, the tensor whose rank decides, k): the dim is dim 0 iff rank <= k
_Guard = Tuple[fx.Node, fx.Node, int]

_SHAPE_USE_METHODS = {"view", "reshape", "expand", "new_zeros", "new_ones", "new_empty", "new_full", "unflatten",
                      "repeat"}
_SHAPE_USE_FUNCTIONS = {torch.reshape, torch.zeros, torch.ones, torch.empty, torch.full, F.interpolate, F.upsample}
_SIZE_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
                    operator.neg, operator.getitem, int}


def _reads_rows(node: fx.Node) -> bool:
    """The value read may include the size of dim 0 (the whole shape, size(0),
    len, numel; a dim counted from the end is guarded instead, see _Guard)."""
    if node.op == "call_method" and node.target == "size":
        dims = _size_dims(node)
        return not dims or not (_skips_batch_dim(dims[0]) or _negative_reach(dims[0]) is not None)
    if node.op == "call_method":
        return node.target in ("numel", "nelement")
    return node.op == "call_function" and (
        node.target in (len, torch.numel) or (node.target is getattr and node.args[1:] == ("shape",)))


def check_batch_reads(gm: fx.GraphModule, constant_input_once: bool = True) -> None:
    """Raises :class:`ConversionError` where a value (not a shape) is built
    from the batch size, which the merged layout changes from B to T·B, or
    where an operation acts along dim 0 of a merged tensor (:func:`check_batch_dim`).

    Merged tensors: the time-varying ones, tensors built with a size read off
    a merged one, and (unless ``constant_input_once``) everything computed
    from the inputs, which then run on the T-fold repeated batch.

    Edits ``gm``: before each use of a dim counted from the end on a merged
    tensor it inserts the rank guard (see ``_Guard``); ``to_snn`` calls it once."""
    spiking = lambda n: _is_neuron(gm, n)  # noqa: E731
    varying = _time_varying(gm, spiking)
    inputs = _placeholder_descendants(gm)
    origin: Dict[fx.Node, fx.Node] = {}  # size value built from dim 0 -> the read it comes from
    sizes: set = set()  # nodes holding sizes (ints or torch.Size), from dim 0 or not
    guards: List[_Guard] = []
    placeholders = {n for n in gm.graph.nodes if n.op == "placeholder"}
    merged: set = set(varying) | (set() if constant_input_once else placeholders)
    for node in gm.graph.nodes:
        read_of = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if _reads_rows(node):
            sizes.add(node)
            if read_of in inputs or read_of in merged:  # a parameter's shape is no batch size
                origin[node] = node
            continue
        if node.op == "call_function" and node.target is operator.getitem and _node_in(node.args[0], sizes):
            sizes.add(node)  # shape[d] of a whole shape is batch-free for d >= 1
            whole = origin.get(node.args[0]) is node.args[0] and _reads_full_shape(node.args[0])
            reach = _negative_reach(node.args[1]) if whole else None
            if reach is not None:  # shape[-k], shape[-k:]: batch-free unless the rank is <= k
                guards.append((node, node.args[0].args[0], reach))
            elif node.args[0] in origin and not (whole and _skips_batch_dim(node.args[1])):
                origin[node] = origin[node.args[0]]
            continue
        if node.op == "call_method" and node.target == "size":
            sizes.add(node)  # x.size(d), d >= 1, or x.size(-k), guarded
            reach = _negative_reach(_size_dims(node)[0])
            if reach is not None and (read_of in inputs or read_of in merged):
                guards.append((node, read_of, reach))
            continue
        from_batch = [v for v in node.all_input_nodes if v in origin]
        if node.op.startswith("call") and (not _reads_metadata(node) or _name(node).endswith("_like")) and any(
                v in merged for v in node.all_input_nodes if v not in sizes):
            merged.add(node)
        if not from_batch:
            continue
        if node.op == "call_function" and node.target in _SIZE_ARITHMETIC and all(
                v in sizes for v in node.all_input_nodes):
            sizes.add(node)
            origin[node] = origin[from_batch[0]]
            continue
        if _shape_use(node, origin):
            merged.add(node)  # a tensor with the merged layout's T·B rows
            continue
        read = origin[from_batch[0]]
        raise ConversionError(
            f"node '{node.name}' ({_describe(gm, node)}){_source_line(node)} builds a value from the batch "
            f"size read by node '{read.name}' ({_describe(gm, read)}){_source_line(read)}: the converted "
            "network merges the T time steps into the batch ([T·B, ...]), so that read gives T·B and the "
            "value would differ from the quantized network's. Use the batch size only for shapes "
            "(view/reshape/expand/zeros/full/repeat), or build such values outside forward() and pass them in.")
    check_batch_dim(gm, merged, origin, guards)
    _insert_rank_guards(gm, guards)
    if constant_input_once:
        # The part before the first neurons runs once on [B, ...] and is repeated where it meets
        # spikes: an in-place write of spikes into it would land on the repeated copy.
        by_writes = varying - _time_varying(gm, spiking, writes=False)
        after_spikes = _descendants(gm, spiking)  # not the part that runs once
        for written in (n for n in gm.graph.nodes if n in by_writes):  # in graph order: name the first
            if written in inputs and written not in after_spikes:
                raise ConversionError(
                    f"node '{written.name}' ({_describe(gm, written)}){_source_line(written)} is computed "
                    "before the first spiking layer and later written in place with time-varying spikes; "
                    "with constant_input_once=True that part runs once on [B, ...], so the write cannot "
                    "reach it. Write that op out of place (y = x + s), or convert with "
                    "constant_input_once=False.")


def _shape_use(node: fx.Node, origin: Dict[fx.Node, fx.Node]) -> bool:
    """The batch-derived values ``node`` reads are only sizes (not a fill value)."""
    if node.op == "call_method" and node.target in _SHAPE_USE_METHODS:
        fill = node.kwargs.get("fill_value", node.args[2] if node.target == "new_full" and len(node.args) > 2 else None)
        return not _node_in(fill, origin)
    if node.op == "call_function" and node.target in _SHAPE_USE_FUNCTIONS:
        fill = node.kwargs.get("fill_value", node.args[1] if node.target is torch.full and len(node.args) > 1 else None)
        return not _node_in(fill, origin)
    return False


# ---------------------------------------------------------------------------
# What may act along the batch dim: in the merged layout dim 0 holds T·B rows,
# time-major. Per-row operations (convs, linears, elementwise ops, reductions
# over other dims) are unaffected; an operation that moves, selects, splits,
# joins or reduces rows of dim 0 mixes time steps with samples. Merging dim 0
# with the dims after it (flatten(0, 1), view(-1, C)) keeps T outermost and is
# fine; so is a view whose first size is -1 or the batch size read off a merged
# tensor. A dim counted from the end is guarded (see _Guard).

_TUPLE_RESULTS = {"split", "chunk", "unbind", "tensor_split", "hsplit", "vsplit", "dsplit", "max", "min",
                  "sort", "topk", "kthvalue", "median", "mode", "aminmax"}
# name -> (position of the dim argument (self/input at 0), keyword, default)
_DIM_ARGS = {
    "cat": (1, "dim", 0), "concat": (1, "dim", 0), "concatenate": (1, "dim", 0), "stack": (1, "dim", 0),
    "chunk": (2, "dim", 0), "split": (2, "dim", 0), "tensor_split": (2, "dim", 0), "unbind": (1, "dim", 0),
    "narrow": (1, "dim", None), "select": (1, "dim", None), "index_select": (1, "dim", None),
    "gather": (1, "dim", None), "cumsum": (1, "dim", None), "cumprod": (1, "dim", None),
    "flip": (1, "dims", None), "roll": (2, "dims", None), "sum": (1, "dim", None), "mean": (1, "dim", None),
    "nansum": (1, "dim", None), "prod": (1, "dim", None), "unsqueeze": (1, "dim", None),
    "squeeze": (1, "dim", -1), "repeat_interleave": (2, "dim", None),
    # Not affine, so never on spikes (the time rule), but on other merged tensors: the input part
    # with constant_input_once=False, and tensors shaped by the batch size. None: every dim.
    "softmax": (1, "dim", None), "log_softmax": (1, "dim", None), "softmin": (1, "dim", None),
    "normalize": (2, "dim", 1), "norm": (2, "dim", None), "renorm": (2, "dim", None),
    "std": (1, "dim", None), "var": (1, "dim", None), "std_mean": (1, "dim", None), "var_mean": (1, "dim", None),
    "nanmean": (1, "dim", None), "logsumexp": (1, "dim", None), "logcumsumexp": (1, "dim", None),
    "cummax": (1, "dim", None), "cummin": (1, "dim", None), "argmax": (1, "dim", None),
    "argmin": (1, "dim", None), "sort": (1, "dim", -1), "argsort": (1, "dim", -1), "topk": (2, "dim", -1),
    "kthvalue": (2, "dim", -1), "diff": (2, "dim", -1), "count_nonzero": (1, "dim", None),
    "special_softmax": (1, "dim", None), "special_log_softmax": (1, "dim", None),
    "special_logsumexp": (1, "dim", None), "quantile": (2, "dim", None), "nanquantile": (2, "dim", None),
    "linalg_norm": (2, "dim", None), "linalg_vector_norm": (2, "dim", None),
    "linalg_matrix_norm": (2, "dim", (-2, -1)), "linalg_vecdot": (2, "dim", -1),
    # dim is keyword-only in practice (their second positional is x or dx)
    "trapezoid": (99, "dim", -1), "trapz": (99, "dim", -1), "cumulative_trapezoid": (99, "dim", -1),
}
# Reductions that give the same value on T repeated copies of the rows (max, amax, min, median,
# mode, all, any, ...) need no entry. Ops along dim 0 of every merged operand, whatever the arguments:
_ALONG_DIM_0 = {"msort", "dot", "vdot", "dist", "cov", "corrcoef", "trace"}
# Joins of a list of tensors: (dim, the rank at or below which that dim is dim 0 or the rows move).
_JOINS = {"cat": None, "concat": None, "concatenate": None, "stack": None, "hstack": 1, "dstack": 2,
          "column_stack": 0, "vstack": None, "row_stack": None}
_TRANSPOSES = {"transpose", "swapaxes", "swapdims", "movedim", "moveaxis"}
_SIZED = {"view", "reshape", "expand", "unflatten"}


def _node_in(value: Any, nodes: Any) -> bool:
    """``value`` is a graph node in ``nodes`` (arguments may be lists, slices, numbers)."""
    return isinstance(value, fx.Node) and value in nodes


def _name(node: fx.Node) -> str:
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", "") if node.op == "call_function" else ""


def _has_zero(value: Any) -> bool:
    """A dim argument that is (or contains) dim 0; None and () (all dims) count."""
    if value is None:
        return True
    if isinstance(value, (list, tuple)):
        return not value or any(_has_zero(v) for v in value)
    return not isinstance(value, int) or value == 0


def _flat(values: Any) -> List[Any]:
    if isinstance(values, (list, tuple)):
        return [v for item in values for v in _flat(item)]
    return [values]


def _guard_dims(guards: List[_Guard], node: fx.Node, tensor: Any, dims: Any, new_dim: bool = False) -> None:
    """Guards the dims of ``dims`` (an int or nested lists) counted from the end; ``new_dim``:
    they index the result, one dim more than ``tensor`` (stack, unsqueeze)."""
    reach = max([r for d in _flat(dims) if (r := _negative_reach(d)) is not None], default=0) - new_dim
    _guard(guards, node, tensor, reach)


def _guard(guards: List[_Guard], node: fx.Node, tensor: Any, k: int) -> None:
    """``node`` is exact iff ``tensor`` has more than k dims."""
    if k >= 1 and isinstance(tensor, fx.Node):
        guards.append((node, tensor, k))


def _positional(node: fx.Node) -> Tuple[List[Any], Dict[str, Any]]:
    """The node's arguments with the tensor operand first: torch functions also take it as
    input= (tensors= for cat/stack), and then every argument is a keyword."""
    args, kwargs = list(node.args), dict(node.kwargs)
    for key in ("input", "tensors", "self"):
        if not args and key in kwargs:
            args.append(kwargs.pop(key))
    return args, kwargs


def _factors(args: List[Any], kwargs: Dict[str, Any], key: str) -> List[Any]:
    """repeat(2, 1) / repeat((2, 1)) / repeat(repeats=...) alike."""
    factors = list(args[1:]) if len(args) > 1 else [kwargs.get(key)] if key in kwargs else []
    return list(factors[0]) if len(factors) == 1 and isinstance(factors[0], (list, tuple)) else factors


def _why_einsum(args: List[Any], merged: set, guards: List[_Guard], node: fx.Node) -> Optional[str]:
    spec = args[0] if args and isinstance(args[0], str) else ""
    ins, _, out = spec.replace(" ", "").partition("->")
    operands = args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    for term, operand in zip(ins.split(","), operands):
        if not (isinstance(operand, fx.Node) and operand in merged):
            continue
        if not (term and out and term[0] == out[0]):
            return "its equation does not keep the first index of the time-varying operand first"
        if term.startswith("..."):  # dim 0 is in '...' unless the rank is the explicit indices' count
            _guard(guards, node, operand, len(term) - 3)
    return None


def _why_batch_dim(node: fx.Node, merged: set, origin: Dict[fx.Node, fx.Node], guards: List[_Guard]) -> Optional[str]:
    """None if ``node`` keeps the rows of dim 0 of its merged operands as they
    are (perhaps after a rank guard, appended to ``guards``); else why not."""
    name = _name(node)
    args, kwargs = _positional(node)
    first = args[0] if args else None
    if name in _JOINS and isinstance(first, (list, tuple)):
        joined = [v for v in first if isinstance(v, fx.Node) and v in merged]
        if not joined:
            return None
        first = joined[0]  # the tensor to guard
        if name not in _DIM_ARGS:
            for tensor in joined:
                _guard(guards, node, tensor, _JOINS[name] or 0)
            return "it joins along dim 0" if _JOINS[name] is None else None
    elif name in ("matmul", "mm", "bmm", "inner") or node.target is operator.matmul:
        other = args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))
        if _node_in(other, merged):
            if name in ("mm", "inner"):
                return "the time-varying operand is on the right of a matrix product, which contracts its rows"
            # A batched product keeps dim 0 of both operands (rank >= 3); a matrix on
            # the right contracts its rows.
            _guard(guards, node, other, 2)
            if _node_in(first, merged):
                _guard(guards, node, first, 2)
        if _node_in(first, merged):
            _guard(guards, node, first, 1)  # a 1-dim left operand is contracted along dim 0
        return None
    elif name == "einsum":
        return _why_einsum(args, merged, guards, node)
    elif name in ("addmm", "addmv", "addmm_", "addmv_"):  # input + mat1 @ mat2: a matrix on the right
        right = args[2] if len(args) > 2 else kwargs.get("mat2", kwargs.get("vec"))
        if _node_in(right, merged):
            return "the time-varying operand is on the right of a matrix product, which contracts its rows"
        return None
    elif name == "cdist":  # batched on rank >= 3; on matrices, between rows
        for tensor in args[:2]:
            if _node_in(tensor, merged):
                _guard(guards, node, tensor, 2)
        return None
    elif not (isinstance(first, fx.Node) and first in merged):
        return None
    if name in _ALONG_DIM_0:
        return "it acts along dim 0"
    if node.target is operator.getitem:
        if isinstance(first, fx.Node) and _name(first) in _TUPLE_RESULTS:
            return None  # an item of a tuple result (split, chunk, ...)
        index = args[1]
        lead = index[0] if isinstance(index, tuple) and index else index
        if lead is Ellipsis:  # x[..., i, j] indexes dims from the end: dim 0 iff the rank is 2
            after = [i for i in index[1:] if i is not None] if isinstance(index, tuple) else []
            if after and not (isinstance(after[0], slice) and after[0] == slice(None)):
                _guard(guards, node, first, len(after))
            return None
        if isinstance(lead, slice) and lead == slice(None):
            return None
        return "it indexes dim 0"
    if name == "diagonal":
        dims = [kwargs.get("dim1", args[2] if len(args) > 2 else 0), kwargs.get("dim2", args[3] if len(args) > 3 else 1)]
        if _has_zero(dims):
            return f"it acts along dim 0 (dims {dims})"
        _guard_dims(guards, node, first, dims)
        return None
    if name in _DIM_ARGS:
        position, keyword, default = _DIM_ARGS[name]
        # torch takes axis= for dim= (numpy's spelling) in the same place
        dim = kwargs.get(keyword, kwargs.get("axis", args[position] if len(args) > position else default))
        if name == "squeeze" and dim == -1 and not {keyword, "axis"} & set(kwargs) and len(args) <= position:
            return None  # squeeze() of every size-1 dim
        if _has_zero(dim):
            return f"it acts along dim 0 ({keyword}={dim!r})"
        _guard_dims(guards, node, first, dim, new_dim=name in ("stack", "unsqueeze"))
        return None
    if name in _TRANSPOSES:
        dims = list(args[1:]) + list(kwargs.values())
        if _has_zero(dims):
            return "it moves dim 0"
        _guard_dims(guards, node, first, dims)
        return None
    if name == "permute":
        dims = kwargs["dims"] if "dims" in kwargs else (
            args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:])
        return None if dims and dims[0] == 0 else "it moves dim 0"
    if name == "t" or (node.target is getattr and args[1] in ("T", "H")):
        return "it transposes dim 0"
    if node.target is getattr and args[1] in ("mT", "mH"):
        _guard(guards, node, first, 2)  # transposes the last two dims
        return None
    if name == "unflatten":
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if _has_zero(dim):
            return "it splits dim 0"
        _guard_dims(guards, node, first, dim)
        return None
    if name in _SIZED:
        sizes = list(args[1:]) or [kwargs.get("shape", kwargs.get("size"))]
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = list(sizes[0])
        if sizes and (sizes[0] == -1 or _node_in(sizes[0], origin)):
            rest = [s for s in sizes[1:] if _node_in(s, origin)]
            return None if not rest else "it puts the batch size in a dim other than 0"
        return "its first size is neither -1 nor the batch size read off a tensor, so it regroups the rows of dim 0"
    if name == "repeat":  # one factor per dim, extra ones add leading dims
        factors = _factors(args, kwargs, "repeats")
        if not (factors and factors[0] == 1):
            return "it repeats the rows of dim 0"
        _guard(guards, node, first, len(factors) - 1)
        return None
    if name == "tile":  # factors align with the last dims; extra ones add leading dims
        factors = _factors(args, kwargs, "dims")
        _guard(guards, node, first, len(factors) - (1 if factors and factors[0] == 1 else 0))
        return None
    if name == "layer_norm":  # normalises the last len(normalized_shape) dims
        shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape", ())
        _guard(guards, node, first, len(shape) if isinstance(shape, (list, tuple)) else 1)
        return None
    if name == "pad":  # pairs from the last dim backwards; the ones that pad nothing do not count
        pad = list(args[1] if len(args) > 1 else kwargs.get("pad", ()))
        pairs = [pad[i:i + 2] for i in range(0, len(pad), 2)]
        _guard(guards, node, first, max([j + 1 for j, p in enumerate(pairs) if p != [0, 0]], default=0))
        return None
    return None


def _module_dims(module: nn.Module) -> Optional[Tuple[str, Any]]:
    """(what it does, the dims it acts along) for modules with dims of their own."""
    if isinstance(module, nn.Unflatten):
        return "it splits", module.dim
    if isinstance(module, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
        return "it normalises along", module.dim
    if isinstance(module, nn.LayerNorm):
        return "it normalises along", -len(module.normalized_shape)
    if isinstance(module, _PAD_MODULES):  # pairs from the last dim backwards, as F.pad
        pairs = [module.padding[i:i + 2] for i in range(0, len(module.padding), 2)]
        reach = max([j + 1 for j, p in enumerate(pairs) if tuple(p) != (0, 0)], default=0)
        return ("it pads", -reach) if reach else None
    return None


_PAD_MODULES = tuple(getattr(nn.modules.padding, c) for c in
                     ("_ConstantPadNd", "_ReflectionPadNd", "_ReplicationPadNd", "_CircularPadNd")
                     if hasattr(nn.modules.padding, c))


def check_batch_dim(gm: fx.GraphModule, merged: set, origin: Dict[fx.Node, fx.Node], guards: List[_Guard]) -> None:
    """Raises :class:`ConversionError` for an operation along dim 0 of a
    tensor in the merged [T·B, ...] layout (``merged``); appends to ``guards``
    the operations whose dims counted from the end reach dim 0 on a low rank."""
    for node in gm.graph.nodes:
        why = _why_batch_dim(node, merged, origin, guards) if node.op in ("call_function", "call_method") else None
        if node.op == "call_module" and _node_in(node.args[0] if node.args else None, merged):
            acts = _module_dims(gm.get_submodule(node.target))
            if acts is not None and _has_zero(acts[1]):
                why = f"{acts[0]} dim 0"
            elif acts is not None:
                _guard_dims(guards, node, node.args[0], acts[1])
        if why is not None:
            raise ConversionError(
                f"node '{node.name}' ({_describe(gm, node)}){_source_line(node)} cannot run on the converted "
                f"network's merged [T·B, ...] layout: {why}. There dim 0 holds the T time steps of every "
                "sample (time-major), so that would mix time steps with samples. Keep dim 0 the batch (use "
                "dims >= 1, view(x.size(0), ...), F.linear), or move this out of forward().")


def _insert_rank_guards(gm: fx.GraphModule, guards: List[_Guard]) -> None:
    """Before each guarded node: torch._assert(tensor.dim() > k, why), which the converted
    network runs (and TorchScript, torch.compile and torch.export keep)."""
    for node, tensor, k in guards:
        why = (f"fastspike: node '{node.name}' ({_describe(gm, node)}){_source_line(node)} counts a dim from "
               f"the end that is dim 0 when the tensor has {k} dims or fewer, as this one has; in the converted "
               "network dim 0 holds the T time "
               "steps of every sample ([T·B, ...]), so it would mix time steps with samples. Count that dim "
               "from the front (>= 1), or keep the tensor's rank above it.")
        with gm.graph.inserting_before(node):
            rank = gm.graph.call_method("dim", (tensor,))
            gm.graph.call_function(torch._assert, (gm.graph.call_function(operator.gt, (rank, k)), why))
