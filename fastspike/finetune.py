"""Tuning a converted SNN: Fast-SNN's layer-wise fine-tuning and end-to-end surrogate training.

    snn = fastspike.to_snn(qnet, time_steps=2, neuron="signed")
    report = finetune_layerwise(snn, qnet, train_set, val_set=val_set)   # layer by layer, in place
    write_back(snn, qnet)               # to_snn(qnet, 2, "signed") now rebuilds the tuned SNN
    train_snn(snn, train_set, TrainConfig(epochs=5, optimizer="adamw", lr=1e-3))  # BPTT, optional

**Layer-wise fine-tuning** (Hu et al., Fast-SNN, TPAMI 2023). With T below the number of levels
the spiking layers no longer reproduce the quantized ANN exactly and the error grows with depth.
For each spiking layer k in order, the SNN's time-averaged output of layer k is pulled towards
the quantized ANN's output of the same layer (quantizer k: the converter gives neuron k the
quantizer's module name) on the same input, with an MSE loss. Only the weights feeding layer k
(the convs/linears between the previous spiking layers and it, BatchNorm already folded into
them) are trained; thresholds are buffers and stay. The neurons run with ``grad="rate"`` (docs/design.md
§2): the forward value is the SNN's, the gradient the one of the layer's quantized-ANN twin on the
mean input (straight through). After the layer's epochs a metric decides: the update is kept
only if the metric did not get worse (``force=True`` keeps it anyway). Everything runs on the
fused kernels.

**Readout bias correction** (``readout_bias=True``, a first stage named :data:`READOUT_BIAS`):
the bias of the output layer (the linear head) is shifted by the mean of (quantized ANN's output
− SNN's output) per output channel over the tuning batches, optionally weighted per output
(``readout_weight``, e.g. :func:`fastspike.models.yolo.detection_readout_weight`: a detector's box
channels where the quantized ANN sees an object). A signed-IF SNN at T = L under-counts input
that arrives in the last steps, one-sidedly, and the rate-gradient MSE cannot see it (the layer's
mean input is already right); the mean output error it leaves is what this removes, in closed form.
Once kept, the correction is re-fitted after every later stage, before that stage is judged: a
layer's update moves the output's mean, and judging it without the constant that cancels that
move mixes the two (on the demo's detector, layers judged first and the bias last ended below the
bias alone on held-out scenes; the bias first and re-fitted ended above both).

**Surrogate-gradient training** (:func:`train_snn`): the whole SNN through the fused BPTT
backward (``grad="surrogate"``), with the loop of :func:`fastspike.train.train_model`
(checkpoints, resume, DDP, mixed precision).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from tqdm import tqdm

from .convert import ReadoutOverTime, RepeatOverTime, trace
from .nn import SpikingNeuron
from .train import (TrainConfig, _to_device, classification_accuracy, make_loader, make_optimizer,
                    make_schedule, train_model)

__all__ = ["READOUT", "READOUT_BIAS", "finetune_layerwise", "readout_bias_shift", "spiking_layers", "feeding_parameters", "layer_loss", "write_back",
           "train_snn", "neuron_grad", "train_only", "FINETUNE_DEFAULTS"]

#: The name of the readout stage of :func:`finetune_layerwise` (``readout=True``): the layers
#: after the last spiking layers, tuned so that the SNN's output matches the quantized ANN's.
READOUT = "output"

#: The name of the readout-bias stage of :func:`finetune_layerwise` (``readout_bias=True``): the
#: output layer's bias shifted by the (weighted) mean of the quantized ANN's output minus the SNN's.
READOUT_BIAS = "output-bias"

#: Recipe of the layer-wise fine-tuning unless a config is given: one epoch of Adam per layer.
FINETUNE_DEFAULTS = TrainConfig(epochs=1, batch_size=64, optimizer="adam", lr=1e-3, weight_decay=0.0)


class _Stop(Exception):
    """Raised by a forward hook to end a forward pass once the wanted layer has run."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output


def _output_of(model: nn.Module, name: str, x: Any) -> torch.Tensor:
    """The output of submodule ``name`` when ``model`` runs on ``x``; the layers after it do not run."""
    def hook(_module, _inputs, output):
        raise _Stop(output)

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        model(x)
    except _Stop as stop:
        return stop.output
    finally:
        handle.remove()
    raise RuntimeError(f"layer {name!r} did not run in the forward pass")


def _graph_module(model: nn.Module) -> fx.GraphModule:
    if not isinstance(model, fx.GraphModule):
        raise TypeError(f"expected a converted SNN (the fx.GraphModule of fastspike.to_snn), "
                        f"got {type(model).__name__}")
    return model


def spiking_layers(snn: nn.Module) -> List[str]:
    """Names of the SNN's spiking layers in the order the forward pass runs them."""
    gm = _graph_module(snn)
    return [n.target for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), SpikingNeuron)]


def feeding_parameters(snn: nn.Module, name: str) -> Dict[str, nn.Parameter]:
    """The parameters between the previous spiking layers (or the input) and spiking layer
    ``name``: the weights (and folded BN biases) that compute its input current. ``name`` may
    also be :data:`READOUT`: the parameters between the last spiking layers and the output
    (the linear head: classifier, detection map, segmentation logits)."""
    gm = _graph_module(snn)
    if name == READOUT:
        nodes = [n for n in gm.graph.nodes if n.op == "output"]
    else:
        nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == name]
        if not nodes or not isinstance(gm.get_submodule(name), SpikingNeuron):
            raise ValueError(f"layer must name a spiking layer of the SNN ({spiking_layers(gm)}) or "
                             f"{READOUT!r}, got {name!r}")
    found: Dict[str, nn.Parameter] = {}
    stack, seen = list(nodes[0].all_input_nodes), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, (SpikingNeuron, RepeatOverTime)):
                continue  # an earlier layer, or the analog input: stop here
            for pname, p in module.named_parameters():
                found[f"{node.target}.{pname}"] = p
        elif node.op == "get_attr":
            value = gm.get_parameter(node.target) if isinstance(_attr(gm, node.target), nn.Parameter) else None
            if value is not None:
                found[node.target] = value
        stack.extend(node.all_input_nodes)
    return found


def _attr(gm: nn.Module, target: str) -> Any:
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


@contextmanager
def neuron_grad(model: nn.Module, mode: str, surrogate: Optional[str] = None,
                alpha: Optional[float] = None) -> Iterator[nn.Module]:
    """Within the block every spiking layer of ``model`` uses gradient ``mode`` ("rate" or
    "surrogate", and the given surrogate shape/sharpness); the previous settings come back after."""
    if mode not in ("rate", "surrogate"):
        raise ValueError(f"mode must be 'rate' or 'surrogate', got {mode!r}")
    layers = [m for m in model.modules() if isinstance(m, SpikingNeuron)]
    saved = [(m.grad, m.surrogate, m.alpha) for m in layers]
    for m in layers:
        m.grad = mode
        if surrogate is not None:
            m.surrogate, m.alpha = surrogate, alpha
    try:
        yield model
    finally:
        for m, (grad, surr, alpha_) in zip(layers, saved):
            m.grad, m.surrogate, m.alpha = grad, surr, alpha_


def _tensor_output(y: Any) -> torch.Tensor:
    return y["out"] if isinstance(y, dict) else y


def layer_loss(snn: nn.Module, qnet: nn.Module, name: str, x: Any) -> torch.Tensor:
    """MSE between the SNN's time-averaged output of spiking layer ``name`` and the quantized
    ANN's output of the quantizer of the same name, both on input ``x`` (the ANN in eval mode,
    without gradient); for ``name == READOUT`` between the two networks' outputs (the SNN's
    readout, ``to_snn(readout="mean")``). The SNN's neurons keep their own ``grad`` setting;
    fine-tuning runs this under ``neuron_grad(snn, "rate")``."""
    with torch.no_grad():
        was_training = qnet.training
        qnet.eval()
        target = _tensor_output(qnet(x)) if name == READOUT else _output_of(qnet, name, x)
        qnet.train(was_training)
    if name == READOUT:
        return F.mse_loss(_tensor_output(snn(x)).float(), target.float())
    layer = snn.get_submodule(name)
    merged = _output_of(snn, name, x)
    steps = layer.time_steps
    mean = merged.view((steps, merged.shape[0] // steps) + tuple(merged.shape[1:])).mean(0)
    return F.mse_loss(mean.float(), target.float())


@contextmanager
def train_only(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Freezes every parameter but ``params`` (so backward stops at the layer's input)."""
    keep = {id(p) for p in params}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(id(p) in keep)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _first_input(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


@torch.no_grad()
def _target_square(qnet: nn.Module, name: str, x: Any) -> float:
    """Mean square of the quantized ANN's output of layer ``name`` (or of the network) on x."""
    target = _tensor_output(qnet(x)) if name == READOUT else _output_of(qnet, name, x)
    return float(target.float().pow(2).mean())


@torch.no_grad()
def _mean_layer_loss(snn, qnet, name, loader, device, max_batches) -> float:
    total, batches = 0.0, 0
    for batch in loader:
        if max_batches is not None and batches >= max_batches:
            break
        total += layer_loss(snn, qnet, name, _to_device(_first_input(batch), device)).item()
        batches += 1
    return total / max(1, batches)


def _output_bias(snn: nn.Module) -> nn.Parameter:
    """The bias of the SNN's output layer: of the convs/linears between the last spiking layers
    and the output, the one the forward pass runs last."""
    gm = _graph_module(snn)
    readout = set(feeding_parameters(gm, READOUT).values())
    found = None
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and module.bias is not None \
                    and module.bias in readout:
                found = module.bias
    if found is None:
        raise ValueError("readout_bias needs an output layer with a bias (a conv or linear after the last "
                         "spiking layers)")
    return found


def _channel_sums(t: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but 1 (the channels) of a [B, C, ...] tensor."""
    return t.sum(dim=[d for d in range(t.dim()) if d != 1]) if t.dim() > 1 else t.sum().reshape(1)


@torch.no_grad()
def readout_bias_shift(snn: nn.Module, qnet: nn.Module, batches: Iterable[Any],
                       weight: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, *,
                       check: bool = True) -> Dict[str, Any]:
    """Shifts the bias of ``snn``'s output layer (in place) by the mean of ``qnet(x) - snn(x)`` per
    output channel over the inputs ``batches``, weighted by ``weight(qnet(x))`` (non-negative,
    broadcastable to the output; default 1): the constant that minimises the weighted squared
    error of each output channel. ``snn`` must read out the mean (``to_snn(readout="mean")``), and
    the layers after its output layer must carry a per-channel constant through unchanged
    (pooling, interpolation, flatten): checked on the first batch, the bias restored and a
    ValueError raised if not (``check=False`` skips that: a re-fit of an SNN already checked,
    whose near-zero shift the check's tolerance cannot tell from rounding). Returns
    ``{"shift": [C], "mse_before", "mse_after"}`` (weighted mean squared output error over the
    batches, before and after)."""
    bias = _output_bias(snn)
    total = wsum = square = None
    first, before = None, None
    for x in batches:
        y_q = _tensor_output(qnet(x)).float()
        y_s = _tensor_output(snn(x)).float()
        if y_q.dim() < 2 or y_q.shape[1] != bias.numel():
            raise ValueError(f"readout_bias: the output's channels (dim 1, shape {list(y_q.shape)}) do not match "
                             f"the output layer's {bias.numel()} biases")
        w = torch.ones_like(y_q) if weight is None else torch.as_tensor(weight(y_q)).float().expand_as(y_q)
        if bool((w < 0).any()):
            raise ValueError("readout_weight must be non-negative")
        diff = y_q - y_s
        total = _channel_sums(w * diff) + (0 if total is None else total)
        wsum = _channel_sums(w) + (0 if wsum is None else wsum)
        square = _channel_sums(w * diff * diff) + (0 if square is None else square)
        if first is None:
            first, before = x, y_s
    if first is None:
        raise ValueError("readout_bias got no batches")
    shift = torch.where(wsum > 0, total / wsum.clamp(min=1e-30), torch.zeros_like(total))
    denominator = float(wsum.sum()) or 1.0
    mse_before = float(square.sum()) / denominator
    # sum w (d - s)^2 = sum w d^2 - 2 s sum w d + s^2 sum w, per channel
    mse_after = float((square - 2 * shift * total + shift * shift * wsum).sum().clamp(min=0)) / denominator
    saved = bias.detach().clone()
    bias.add_(shift.to(bias.dtype))
    if check:
        moved = _tensor_output(snn(first)).float() - before
        expected = shift.view((1, -1) + (1,) * (moved.dim() - 2))
        if not torch.allclose(moved, expected.expand_as(moved), rtol=1e-3,
                              atol=1e-4 * (1 + float(shift.abs().max()))):
            bias.copy_(saved)
            raise ValueError("readout_bias: shifting the output layer's bias does not shift the SNN's output by "
                             "the same constant per channel (an operation after it is not affine with slope 1)")
    return {"shift": shift, "mse_before": mse_before, "mse_after": mse_after}


def finetune_layerwise(
    snn: nn.Module,
    qnet: nn.Module,
    train_set,
    config: Optional[TrainConfig] = None,
    *,
    val_set=None,
    metric: Optional[Callable[[nn.Module], float]] = None,
    force: bool = False,
    layers: Optional[Sequence[str]] = None,
    collate_fn: Optional[Callable] = None,
    max_batches: Optional[int] = None,
    device: Optional[torch.device] = None,
    progress: bool = True,
    readout: bool = False,
    readout_bias: bool = False,
    readout_weight: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> List[Dict[str, Any]]:
    """Fast-SNN layer-wise fine-tuning of ``snn`` (in place) towards its quantized ANN ``qnet``.

    Args:
        snn: the output of :func:`fastspike.to_snn` (``readout`` any); modified in place.
        qnet: the quantized ANN it was converted from (not modified).
        train_set: Dataset of (input, target) pairs (targets unused); batched in a seeded order.
        config: optimizer, lr, weight decay, schedule, epochs per layer and batch size
            (:data:`FINETUNE_DEFAULTS` if None; ``label_smoothing``/``amp`` unused).
        val_set: classification Dataset; the default metric is the SNN's accuracy on it.
        metric: ``metric(snn) -> float``, higher is better (e.g. mAP or mIoU for detectors and
            segmenters); takes precedence over ``val_set``. Without either, a layer's update is
            judged by its own loss on the training batches (lower is better).
        force: keep every layer's update whatever the metric says.
        layers: names of the stages to run (default all): spiking layers, :data:`READOUT`,
            :data:`READOUT_BIAS`; they run in the fixed order (bias, layers in forward order, head).
        collate_fn: for the loader (e.g. :func:`fastspike.data.collate_scenes`).
        max_batches: batches per epoch (and for the loss-based judgement); default all.
        device: default the SNN's device.
        progress: a tqdm bar per layer.
        readout: after the spiking layers, also tune the layers after the last ones (the
            linear head) on the MSE between the SNN's output and the quantized ANN's, as one
            more stage named :data:`READOUT` (needs ``to_snn(readout="mean")``).
        readout_bias: first, shift the output layer's bias by the mean output error
            (:func:`readout_bias_shift` on the first epoch's batches), as a stage named
            :data:`READOUT_BIAS`, judged like the others; if kept, the shift is re-fitted after
            each later stage before it is judged, and undone with it if the stage is rejected
            (needs ``to_snn(readout="mean")``).
        readout_weight: ``weight(qnet_output) -> non-negative weights`` for that mean (e.g.
            :func:`fastspike.models.yolo.detection_readout_weight`); default every output alike.

    A layer that already equals its quantized-ANN twin on the first batch (MSE below 1e-12 of
    the target's mean square, e.g. the first layer at T = L: its input is constant) is left as
    it is (``skipped``): its gradient is rounding noise, which Adam would scale up to real steps.

    Returns:
        one dict per tuned layer: ``layer``, ``parameters`` (count), ``loss_first_epoch`` and
        ``loss_last_epoch`` (mean layer MSE over the batches of the first and last epoch),
        ``metric_before``, ``metric_after`` (after the update and the bias re-fit, before any
        revert), ``kept`` and ``skipped`` (True for an exact layer, not tuned).
    """
    config = config or FINETUNE_DEFAULTS
    config.validate()
    order = spiking_layers(snn)
    if any(getattr(snn.get_submodule(name), "compact", False) for name in order):
        raise ValueError("snn emits compact spike counts (to_snn(compact_spikes=True)), whose scale is folded "
                         "into the next weights; fine-tune an SNN converted without compact_spikes")
    if readout or readout_bias:
        if any(isinstance(m, ReadoutOverTime) and m.mode != "mean" for m in snn.modules()):
            flag = "readout=True" if readout else "readout_bias=True"
            raise ValueError(f"{flag} compares the SNN's output with the quantized ANN's: convert with "
                             "to_snn(readout='mean')")
    if readout:
        order = order + [READOUT]
    # the output layer's bias (found, or refused, once): the readout-bias stage and its re-fits move it
    output_bias = _output_bias(snn) if readout_bias else None
    if readout_bias:
        order = [READOUT_BIAS] + order  # first: every later stage is judged with it re-fitted
    if readout_weight is not None and not callable(readout_weight):
        raise TypeError(f"readout_weight must be a callable weight(output) -> tensor, got "
                        f"{type(readout_weight).__name__}")
    if layers is None:
        layers = order
    unknown = [name for name in layers if name not in order]
    if unknown:
        raise ValueError(f"layers must name spiking layers of the SNN ({order}), got {unknown}"
                         + (f" ({READOUT!r} needs readout=True)" if READOUT in unknown else "")
                         + (f" ({READOUT_BIAS!r} needs readout_bias=True)" if READOUT_BIAS in unknown else ""))
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches must be None or an integer >= 1, got {max_batches!r}")
    if metric is not None and not callable(metric):
        raise TypeError(f"metric must be a callable metric(snn) -> float, got {type(metric).__name__}")
    device = torch.device(device) if device is not None else next(snn.parameters()).device
    snn.to(device).eval()  # BN folded, dropout off: the network that will be deployed
    qnet.to(device).eval()
    loader, sampler = make_loader(train_set, config, collate_fn=collate_fn)
    steps_per_epoch = len(loader) if max_batches is None else min(len(loader), max_batches)

    def score(name: str) -> float:
        if metric is not None:
            return float(metric(snn))
        if val_set is not None:
            return classification_accuracy(snn, val_set, device=device)
        sampler.set_epoch(0)  # before and after an update on the same batches
        return -_mean_layer_loss(snn, qnet, name, loader, device, max_batches)

    global_metric = metric is not None or val_set is not None
    current = score(layers[0]) if global_metric else None
    report: List[Dict[str, Any]] = []
    refit = False  # True once the readout-bias stage is kept: later stages re-fit the bias before judging

    def bias_batches() -> Iterator[Any]:
        sampler.set_epoch(0)  # the batches of the layers' first epoch, one at a time
        return (_to_device(_first_input(batch), device) for _, batch in zip(range(steps_per_epoch), loader))

    for name in [n for n in order if n in layers]:
        if name == READOUT_BIAS:
            saved = output_bias.detach().clone()
            batches = bias_batches()
            before = current if global_metric else None
            shifted = readout_bias_shift(snn, qnet, batches, readout_weight)
            if not global_metric:  # judged by the weighted output MSE it minimises
                before, after = -shifted["mse_before"], -shifted["mse_after"]
            else:
                after = score(name)
            kept = force or after >= before
            if not kept:
                with torch.no_grad():
                    output_bias.copy_(saved)
            refit = kept
            if global_metric:
                current = after if kept else before
            report.append({"layer": name, "parameters": output_bias.numel(), "loss_first_epoch": shifted["mse_before"],
                           "loss_last_epoch": shifted["mse_after"], "metric_before": before, "metric_after": after,
                           "kept": kept, "skipped": False})
            continue
        params = feeding_parameters(snn, name)
        if not params:
            continue  # e.g. a neuron right after a pool of an earlier neuron: nothing to tune
        first = _to_device(_first_input(next(iter(loader))), device)
        with torch.no_grad():
            initial = layer_loss(snn, qnet, name, first).item()
            scale = _target_square(qnet, name, first)
        if initial <= 1e-12 * max(scale, 1e-30):
            report.append({"layer": name, "parameters": sum(p.numel() for p in params.values()),
                           "loss_first_epoch": initial, "loss_last_epoch": initial, "metric_before": current,
                           "metric_after": current, "kept": False, "skipped": True})
            continue
        before = current if global_metric else score(name)
        snapshot = {k: p.detach().clone() for k, p in params.items()}
        if refit:
            snapshot[READOUT_BIAS] = output_bias.detach().clone()
        optimizer = make_optimizer(params.values(), config)
        schedule = make_schedule(optimizer, config, config.epochs * steps_per_epoch)
        with neuron_grad(snn, "rate"), train_only(snn, list(params.values())), \
                tqdm(total=config.epochs * steps_per_epoch, desc=f"fine-tune {name}", leave=False,
                     disable=not progress) as bar:
            epoch_losses = []
            for epoch in range(config.epochs):
                sampler.set_epoch(epoch)
                losses = []
                for step, batch in enumerate(loader):
                    if step >= steps_per_epoch:
                        break
                    loss = layer_loss(snn, qnet, name, _to_device(_first_input(batch), device))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    losses.append(loss.item())
                    bar.update()
                    bar.set_postfix(mse=f"{loss.item():.4g}")
                epoch_losses.append(sum(losses) / len(losses))
        if refit:
            # The layer's update moves the output's mean; the kept readout bias is the closed-form
            # constant that cancels it, so re-fit it before the update is judged (incrementally:
            # the output is affine in the bias with slope 1, checked by readout_bias_shift).
            readout_bias_shift(snn, qnet, bias_batches(), readout_weight, check=False)
        after = score(name)
        kept = force or after >= before
        if not kept:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(snapshot[k])
                if refit:
                    output_bias.copy_(snapshot[READOUT_BIAS])
        if global_metric:
            current = after if kept else before
        report.append({"layer": name, "parameters": sum(p.numel() for p in params.values()),
                       "loss_first_epoch": epoch_losses[0], "loss_last_epoch": epoch_losses[-1],
                       "metric_before": before, "metric_after": after, "kept": kept, "skipped": False})
    return report


# ---------------------------------------------------------------------------
# Saving a tuned SNN as a quantized ANN


def _unit_variance(eps: float, like: torch.Tensor) -> torch.Tensor:
    """A running variance v with v + eps == 1 exactly in ``like``'s dtype, so that a folded
    BatchNorm scales by rsqrt(1) = 1 exactly."""
    v = torch.tensor(1.0 - eps, dtype=like.dtype)
    one = torch.tensor(1.0, dtype=like.dtype)
    for _ in range(16):
        total = v + eps
        if total == one:
            return v
        v = torch.nextafter(v, v - 1 if total > one else v + 1)
    raise ValueError(f"no float {like.dtype} variance gives var + eps == 1 for eps={eps}")


@torch.no_grad()
def write_back(snn: nn.Module, qnet: nn.Module) -> nn.Module:
    """Copies the weights of a tuned SNN into the quantized ANN it came from, so that
    ``to_snn(qnet, ...)`` (and so a checkpoint of ``qnet``) rebuilds exactly the tuned SNN.

    A BatchNorm that :func:`fastspike.to_snn` folded into the conv/linear before it is set to
    an exact identity in eval mode (mean 0, variance with var + eps == 1, scale 1) with the
    folded bias as its shift, and the conv takes the folded weight: folding again reproduces
    the SNN's weights bit for bit. (The BN's statistics are thereby replaced: retraining ``qnet``
    in train mode afterwards starts its BN statistics from this identity.) Other parameters and
    buffers are copied by name. Returns ``qnet``.
    """
    snn_modules = dict(_graph_module(snn).named_modules())
    qgm = trace(qnet)
    folded = set()
    for node in qgm.graph.nodes:
        if node.op != "call_module":
            continue
        bn = qgm.get_submodule(node.target)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or node.target in snn_modules:
            continue
        source = node.args[0]
        if not (isinstance(source, fx.Node) and source.op == "call_module" and source.target in snn_modules):
            raise ValueError(f"BatchNorm {node.target!r} of qnet is not in the SNN and does not follow a "
                             "layer of it: the SNN was not converted from this qnet")
        layer, fused = qgm.get_submodule(source.target), snn_modules[source.target]
        layer.weight.copy_(fused.weight)
        bn.running_mean.zero_()
        bn.running_var.copy_(_unit_variance(bn.eps, bn.running_var).expand_as(bn.running_var))
        if bn.affine:
            bn.weight.fill_(1.0)
            bn.bias.copy_(fused.bias)
            if layer.bias is not None:
                layer.bias.zero_()
        elif layer.bias is not None:
            layer.bias.copy_(fused.bias)
        else:
            raise ValueError(f"BatchNorm {node.target!r} has no affine shift and {source.target!r} no bias: "
                             "the folded bias cannot be stored in qnet")
        folded.update((node.target, source.target))
    snn_state = snn.state_dict()
    for key, value in qnet.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner not in folded and key in snn_state and snn_state[key].shape == value.shape:
            value.copy_(snn_state[key])
    return qnet


# ---------------------------------------------------------------------------
# End-to-end surrogate-gradient training


def train_snn(snn: nn.Module, train_set, config: Optional[TrainConfig] = None, *,
              surrogate: str = "sigmoid", alpha: Optional[float] = None, **train_kwargs: Any
              ) -> List[Dict[str, float]]:
    """Trains a converted SNN end to end by backpropagation through time: every spiking layer
    uses the fused surrogate backward (``surrogate``/``alpha`` as :func:`fastspike.neuron`),
    thresholds stay fixed, and the loop is :func:`fastspike.train.train_model` (same arguments:
    ``loss_fn``, ``val_set``, ``checkpoint``, ``resume``, DDP, mixed precision). Every parameter
    is trained, the biases that BatchNorm folding created (which come out with
    ``requires_grad=False``) included; to freeze some, call ``train_model`` under
    :func:`neuron_grad` instead. The neurons' previous gradient settings are restored
    afterwards. Returns the per-epoch history."""
    if not any(isinstance(m, SpikingNeuron) for m in snn.modules()):
        raise ValueError("train_snn needs a spiking network (fastspike.to_snn); for an ANN use train_model")
    with neuron_grad(snn, "surrogate", surrogate, alpha):
        for p in snn.parameters():
            p.requires_grad_(True)
        return train_model(snn, train_set, config, **train_kwargs)

