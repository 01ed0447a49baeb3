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
* :func:`add_time_axis`: inputs are repeated over T in the merged [T·B, ...]
  layout and outputs read out over T.
"""

from __future__ import annotations

import copy
import operator
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval
from torch.utils import _pytree as pytree

from .nn import SpikingNeuron
from .quant import QuantReLU

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
    "RepeatOverTime",
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

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, _LEAVES + self.extra_leaves):
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


def _replace_with_module(gm: fx.GraphModule, node: fx.Node, stem: str, module: nn.Module) -> None:
    """Replaces ``node`` by a call of ``module`` (registered under a fresh name) on its first input."""
    name = _fresh_name(gm, stem)
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        call = gm.graph.call_module(name, (node.args[0],))
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)


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
# Pass: ReLU call sites -> quantizers

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU_METHODS = {"relu", "relu_"}

_UNSUPPORTED_MODULES = (
    nn.GELU, nn.SiLU, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ReLU6, nn.ELU, nn.SELU, nn.CELU,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus,
    nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.GLU,
)
_UNSUPPORTED_FUNCTIONS = {
    F.gelu, F.silu, F.leaky_relu, F.leaky_relu_, F.prelu, F.rrelu, F.relu6, F.elu, F.selu,
    F.celu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.mish, F.softplus, F.softsign, F.logsigmoid, F.glu,
}
_UNSUPPORTED_METHODS = {"sigmoid", "tanh", "sigmoid_", "tanh_"}


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(_module(gm, node)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in _RELU_METHODS


def _is_unsupported_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(_module(gm, node), _UNSUPPORTED_MODULES)
    if node.op == "call_function":
        return node.target in _UNSUPPORTED_FUNCTIONS
    return node.op == "call_method" and node.target in _UNSUPPORTED_METHODS


def replace_activations(gm: fx.GraphModule, make_quantizer: Callable[[], nn.Module]) -> fx.GraphModule:
    """Gives every ReLU call site its own quantizer from ``make_quantizer``."""
    for node in list(gm.graph.nodes):
        if _is_unsupported_activation(gm, node):
            raise ConversionError(
                f"node '{node.name}' is {_describe(gm, node)}, which has no spiking equivalent: "
                "fastspike converts ReLU activations (as quantized ReLUs) only. Replace it with "
                "nn.ReLU and retrain or fine-tune the network before converting."
            )
        if not _is_relu(gm, node):
            continue
        _replace_with_module(gm, node, "quant", make_quantizer())
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
    gm = trace(copy.deepcopy(model), leaf_modules)
    gm = replace_activations(gm, lambda: QuantReLU(levels, preset, threshold))
    gm = move_max_pools(gm, strict)
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
    it into that layer's weights and bias."""
    for node in list(gm.graph.nodes):
        bn = _module(gm, node)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats:
            continue
        source = node.args[0]
        layer = _module(gm, source) if isinstance(source, fx.Node) else None
        if layer is None or len(source.users) != 1:
            continue
        if isinstance(layer, nn.modules.conv._ConvNd) and not isinstance(layer, nn.modules.conv._ConvTransposeNd):
            fused = fuse_conv_bn_eval(layer.eval(), bn.eval())
        elif isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
            fused = fuse_linear_bn_eval(layer.eval(), bn.eval())
        else:
            continue
        parent, _, attr = source.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, fused)
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
    for node in gm.graph.nodes:
        if _is_relu(gm, node) or _is_unsupported_activation(gm, node):
            raise ConversionError(f"node '{node.name}' ({_describe(gm, node)}) is an activation that was "
                                  "not quantized; call fastspike.quantize on the model first")
    if replaced == 0:
        raise ConversionError("the model has no QuantReLU to turn into neurons: call fastspike.quantize first")
    gm.recompile()
    return gm


class RepeatOverTime(nn.Module):
    """[B, ...] -> [T·B, ...]: the same analog input at every step (time-major)."""

    def __init__(self, time_steps: int):
        super().__init__()
        self.time_steps = time_steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(0).expand((self.time_steps,) + tuple(x.shape)).reshape(
            (self.time_steps * x.shape[0],) + tuple(x.shape[1:]))


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


def add_time_axis(gm: fx.GraphModule, time_steps: int, readout: str = "mean") -> fx.GraphModule:
    """Repeats every input over T (merged layout) and reads the outputs out over T."""
    gm.add_submodule("repeat_over_time", RepeatOverTime(time_steps))
    gm.add_submodule("readout_over_time", ReadoutOverTime(time_steps, readout))
    for node in list(gm.graph.nodes):
        if node.op == "placeholder":
            with gm.graph.inserting_after(node):
                repeated = gm.graph.call_module("repeat_over_time", (node,))
            node.replace_all_uses_with(repeated, delete_user_cb=lambda user: user is not repeated)
        elif node.op == "output":
            with gm.graph.inserting_before(node):
                read = gm.graph.call_module("readout_over_time", (node.args[0],))
            node.args = (read,)
    gm.graph.lint()
    gm.recompile()
    return gm


def to_snn(
    qmodel: nn.Module,
    time_steps: int,
    neuron: str = "if",
    *,
    group_size: Optional[int] = None,
    readout: str = "mean",
    leaf_modules: Sequence[Type[nn.Module]] = (),
    **neuron_kwargs,
) -> fx.GraphModule:
    """Converts a quantized network into a spiking one that runs all
    ``time_steps`` steps through the fused neuron kernels in one call.

    Args:
        qmodel: the output of :func:`quantize` (trained or calibrated).
        time_steps: T. IF neurons reproduce the quantized ANN exactly on
            constant input when T = levels; group neurons when m·T = levels.
        neuron: "if", "signed" (Fast-SNN), "group" or "signed-group".
        group_size: m for the group kinds.
        readout: "mean" (default), "sum" or "sequence" ([T, B, ...]).
        neuron_kwargs: passed to each :class:`~fastspike.nn.SpikingNeuron`
            (e.g. grad="rate", init_fraction=...).

    The input is the usual [B, ...] analog batch; the result is in eval mode.
    """
    if isinstance(time_steps, bool) or not isinstance(time_steps, int) or time_steps < 1:
        raise ValueError(f"time_steps must be an integer >= 1, got {time_steps!r}")
    gm = trace(copy.deepcopy(qmodel), leaf_modules).eval()
    gm = fold_batch_norms(gm)
    gm = insert_neurons(gm, time_steps, neuron, group_size, **neuron_kwargs)
    gm = add_time_axis(gm, time_steps, readout)
    gm.time_steps = time_steps
    return gm
