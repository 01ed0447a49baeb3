"""Where a converted SNN departs from its quantized ANN, layer by layer.

    from fastspike.analysis import layerwise_comparison, format_comparison
    rows = layerwise_comparison(qnet, fastspike.to_snn(qnet, 8, "signed"), loader)
    print(format_comparison(rows))

For every spiking layer (the neuron that replaced quantizer ``name``) and the same input
images, the SNN's time-averaged output s (net spike count · u / T) is set against the
quantized ANN's output a of that quantizer. Errors are in the ANN's steps λ/L:

* ``mae``, ``bias``: mean |s − a| and mean (s − a), in steps;
* ``differ``, ``over``, ``under``: fraction of neurons with s ≠ a, s > a, s < a;
* ``local_differ``, ``local_over``, ``local_under``: the same against what the neuron would
  emit with its own *mean* input current x̄ held constant (the quantization of x̄ on m·T
  levels, exactly an IF neuron's output on constant input): this is the error the neuron
  adds by itself (the order of its input spikes in time: "sequential" error), separate from
  the error it inherits through x̄ from the layers before it;
* ``input_mae``: mean |x̄ − z| in steps, z the ANN's pre-activation (the inherited error);
* ``late``: fraction of neurons whose final membrane is still ≥ u = θ/m while their count is
  below its maximum m·T (input that arrived too late to be emitted, an error neither IF nor
  signed IF can correct), and ``negative``: fraction
  of neurons that emitted at least one negative spike;
* ``threshold``: λ of the layer (mean over channels).

The last row, ``output``, compares the network outputs (the linear head's readout): ``mae``
is in units of the ANN output's standard deviation, ``differ`` is the fraction of outputs
that differ by more than 1e-4 of it.

Also here (used by ``benchmarks/bench_models.py``): :class:`SteppedSNN`, the network
stepped one time step at a time the way the seed papers evaluate; :func:`count_macs`
and :func:`spike_statistics` (spike rates, synaptic operations, the 45 nm energy
estimate); :class:`PeakMemory`, the peak memory of one call.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import math
import os
import sys
import tempfile
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import torch
from torch import fx, nn

from .nn import SpikingNeuron
from .quant import QuantReLU, quantize_tensor

__all__ = ["layerwise_comparison", "format_comparison", "compare_neurons",
           "SteppedSNN", "CarriedState", "count_macs", "spike_statistics", "PeakMemory",
           "PJ_PER_SOP", "PJ_PER_MAC"]

_SUMS = ("n", "abs", "signed", "differ", "over", "under", "local_differ", "local_over", "local_under",
         "input_abs", "late", "negative")


def _batches(inputs: Any) -> Iterable[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        yield inputs
        return
    for batch in inputs:
        yield batch[0] if isinstance(batch, (list, tuple)) else batch


def _per_channel(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or [C] threshold broadcast against [B, C, ...]."""
    value = value.to(like.dtype)
    if value.dim() == 0:
        return value
    return value.reshape((1, -1) + (1,) * (like.dim() - 2))


@torch.no_grad()
def layerwise_comparison(qnet: nn.Module, snn: nn.Module, inputs: Any, *,
                         max_batches: Optional[int] = None, device: Optional[torch.device] = None
                         ) -> List[Dict[str, Any]]:
    """Compares ``snn`` (from :func:`fastspike.to_snn` of ``qnet``, ``readout="mean"``, any
    neuron kind) with its quantized ANN ``qnet`` layer by layer on ``inputs`` (a tensor
    [B, ...] or an iterable of batches, (input, target) pairs allowed). Returns one dict per
    spiking layer in forward order (keys in the module doc), then one for ``output``."""
    device = torch.device(device) if device is not None else next(snn.parameters()).device
    qnet.to(device).eval()
    snn.to(device).eval()
    neurons = [(name, m) for name, m in snn.named_modules() if isinstance(m, SpikingNeuron)]
    quants = dict((name, m) for name, m in qnet.named_modules() if isinstance(m, QuantReLU))
    missing = [name for name, _ in neurons if name not in quants]
    if not neurons or missing:
        raise ValueError(f"snn must be fastspike.to_snn(qnet, ...): its spiking layers {missing or '(none)'} "
                         "have no quantizer of the same name in qnet")
    sums = {name: dict.fromkeys(_SUMS, 0.0) for name, _ in neurons}
    out_sums = dict(n=0.0, abs=0.0, signed=0.0, differ=0.0, var=0.0)
    out_errors: List[torch.Tensor] = []
    thresholds: Dict[str, float] = {}
    for batches, x in enumerate(_batches(inputs)):
        if max_batches is not None and batches >= max_batches:
            break
        x = x.to(device)
        ann: Dict[str, tuple] = {}
        snn_in: Dict[str, torch.Tensor] = {}
        snn_out: Dict[str, torch.Tensor] = {}
        handles = []
        for name, q in quants.items():
            handles.append(q.register_forward_hook(
                lambda _m, inp, out, name=name: ann.__setitem__(name, (inp[0].detach(), out.detach()))))

        def charge(module: SpikingNeuron, args, kwargs, name: str) -> None:
            current = args[0] if args else kwargs["x"]
            residual = args[1] if len(args) > 1 else kwargs.get("residual")
            seq = module._to_sequence(current, module.constant_input)
            if residual is not None:
                seq = seq + module._to_sequence(residual, module.constant_residual)
            snn_in[name] = seq

        for name, m in neurons:
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, kwargs, name=name: charge(mod, args, kwargs, name), with_kwargs=True))
            handles.append(m.register_forward_hook(
                lambda mod, _inp, out, name=name: snn_out.__setitem__(name, out.detach())))
        try:
            y_ann = qnet(x)
            y_snn = snn(x)
        finally:
            for h in handles:
                h.remove()
        for name, m in neurons:
            quant = quants[name]
            z, a = ann[name]
            steps, members = m.time_steps, m.group_size
            seq = snn_in[name].float()
            s = snn_out[name].float().reshape(seq.shape).mean(0)
            a = a.float()
            lam = _per_channel(quant.threshold().detach().float(), a)
            step = lam / quant.levels
            theta = _per_channel(m.threshold.float(), s)
            thresholds[name] = float(quant.threshold().detach().float().mean())
            diff = s - a
            tol = 1e-4 * step
            acc = sums[name]
            acc["n"] += a.numel()
            acc["abs"] += float((diff.abs() / step).sum())
            acc["signed"] += float((diff / step).sum())
            acc["differ"] += float((diff.abs() > tol).sum())
            acc["over"] += float((diff > tol).sum())
            acc["under"] += float((diff < -tol).sum())
            mean_in = seq.mean(0)
            ideal = quantize_tensor(mean_in, theta, steps * members)
            local = s - ideal
            local_tol = 1e-4 * theta / (steps * members)
            acc["local_differ"] += float((local.abs() > local_tol).sum())
            acc["local_over"] += float((local > local_tol).sum())
            acc["local_under"] += float((local < -local_tol).sum())
            acc["input_abs"] += float(((mean_in - z.float()).abs() / step).sum())
            # The membrane replayed on the layer's input: what is left at the end, and negative spikes.
            result = _replay(m, seq)
            unemitted = (result["v"] >= theta / members) & (result["count"] < steps * members)
            acc["late"] += float(unemitted.sum())
            acc["negative"] += float(result["negative"].sum())
        ya = (y_ann["out"] if isinstance(y_ann, dict) else y_ann).float()
        ys = (y_snn["out"] if isinstance(y_snn, dict) else y_snn).float()
        out_sums["n"] += ya.numel()
        out_sums["var"] += float((ya - ya.mean()).pow(2).sum())
        out_sums["abs"] += float((ys - ya).abs().sum())
        out_sums["signed"] += float((ys - ya).sum())
        out_errors.append((ys - ya).abs().flatten())
    if not any(acc["n"] for acc in sums.values()):
        raise ValueError("layerwise_comparison got no batches")
    rows: List[Dict[str, Any]] = []
    for name, m in neurons:
        acc = sums[name]
        n = acc["n"]
        rows.append({"layer": name, "neuron": _kind(m), "time_steps": m.time_steps, "threshold": thresholds[name],
                     "mae": acc["abs"] / n, "bias": acc["signed"] / n, "differ": acc["differ"] / n,
                     "over": acc["over"] / n, "under": acc["under"] / n, "local_differ": acc["local_differ"] / n,
                     "local_over": acc["local_over"] / n, "local_under": acc["local_under"] / n,
                     "input_mae": acc["input_abs"] / n, "late": acc["late"] / n, "negative": acc["negative"] / n})
    std = (out_sums["var"] / out_sums["n"]) ** 0.5 or 1.0
    errors = torch.cat(out_errors)
    rows.append({"layer": "output", "neuron": rows[0]["neuron"], "time_steps": rows[0]["time_steps"],
                 "threshold": float("nan"), "mae": out_sums["abs"] / out_sums["n"] / std,
                 "bias": out_sums["signed"] / out_sums["n"] / std,
                 "differ": float((errors > 1e-4 * std).float().mean()), "over": float("nan"), "under": float("nan"),
                 "local_differ": float("nan"), "local_over": float("nan"), "local_under": float("nan"),
                 "input_mae": float("nan"), "late": float("nan"), "negative": float("nan")})
    return rows


def _kind(m: SpikingNeuron) -> str:
    base = "signed" if m.signed else "if"
    return base if m.group_size == 1 else f"{'signed-' if m.signed else ''}group(m={m.group_size})"


def _replay(m: SpikingNeuron, seq: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Final membrane and 'emitted a negative spike' of layer ``m`` on input ``seq`` [T, B, ...]."""
    from .ops import neuron

    result = neuron(seq.contiguous(), m.threshold, group_size=m.group_size, signed=m.signed,
                    init_fraction=m.init_fraction, neg_margin=m.neg_margin, grad="none", compact=True)
    counts = result.spikes
    return {"v": result.v.float(), "count": counts.sum(0, dtype=torch.int32), "negative": (counts < 0).any(0)}


def format_comparison(rows: Union[List[Dict[str, Any]], Dict[str, List[Dict[str, Any]]]]) -> str:
    """The rows of :func:`layerwise_comparison` as a text table; or the ``{kind: rows}`` of
    :func:`compare_neurons`, one block of rows per neuron kind."""
    if isinstance(rows, dict):
        rows = [r for kind_rows in rows.values() for r in kind_rows]
    header = (f"{'layer':18s} {'neuron':8s} {'T':>2s} {'λ':>6s} {'MAE':>6s} {'bias':>7s} {'differ':>7s} "
              f"{'over':>6s} {'under':>6s} {'loc.diff':>8s} {'loc.over':>8s} {'loc.und':>7s} {'in.MAE':>7s} "
              f"{'late':>6s} {'neg':>6s}")
    lines = [header, "-" * len(header)]

    def pct(v: float) -> str:
        return "" if v != v else f"{100 * v:5.1f}%"

    for r in rows:
        lam = "" if r["threshold"] != r["threshold"] else f"{r['threshold']:6.2f}"
        in_mae = "" if r["input_mae"] != r["input_mae"] else f"{r['input_mae']:7.3f}"
        lines.append(f"{r['layer']:18s} {r['neuron']:8s} {r['time_steps']:2d} {lam:>6s} {r['mae']:6.3f} "
                     f"{r['bias']:+7.3f} {pct(r['differ']):>7s} {pct(r['over']):>6s} {pct(r['under']):>6s} "
                     f"{pct(r['local_differ']):>8s} {pct(r['local_over']):>8s} {pct(r['local_under']):>7s} "
                     f"{in_mae:>7s} {pct(r['late']):>6s} {pct(r['negative']):>6s}")
    return "\n".join(lines)


def compare_neurons(qnet: nn.Module, inputs: Any, time_steps: int, kinds=("if", "signed"), *,
                    max_batches: Optional[int] = None, **to_snn_kwargs: Any) -> Dict[str, List[Dict[str, Any]]]:
    """{kind: layerwise_comparison rows} for ``to_snn(qnet, time_steps, kind)`` of each kind."""
    from .convert import to_snn

    if isinstance(inputs, torch.Tensor) is False and not isinstance(inputs, (list, tuple)):
        inputs = list(_batches(inputs))[: max_batches or None]
    return {kind: layerwise_comparison(qnet, to_snn(qnet, time_steps, kind, **to_snn_kwargs), inputs,
                                       max_batches=max_batches)
            for kind in kinds}


# ---------------------------------------------------------------------------
# Stepping, operation counts, spike statistics and peak memory
# (from benchmarks/bench_models.py, issue 17 item 5)

PJ_PER_SOP = 0.9  # 45 nm accumulate (Horowitz, ISSCC 2014), per synaptic operation
PJ_PER_MAC = 4.6  # 45 nm multiply-accumulate


class CarriedState(nn.Module):
    """A spiking layer of a T = 1 network that carries its (v, count) from one call to the next
    through :meth:`SpikingNeuron.step`, so calling the network T times runs T time steps."""

    def __init__(self, layer: SpikingNeuron) -> None:
        super().__init__()
        self.layer = layer
        self.state: Optional[Any] = None

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        # residual: the second operand of a fused residual join (to_snn's fuse_residual)
        spikes, self.state = self.layer.step(x, self.state, residual)
        return spikes


class SteppedSNN(nn.Module):
    """The seed papers' evaluation loop: ``qnet`` converted for one time step
    (``to_snn(qnet, 1, neuron, **options)``), called ``time_steps`` times on the same
    input with every spiking layer's state carried over, outputs averaged over T
    (the same reduction as ``to_snn``'s mean readout). The state is reset at every
    call. Its output equals ``to_snn(qnet, time_steps, neuron, **options)``'s up to
    how the layers round over B rows instead of T·B (bit for bit on small networks).

    Raises ValueError when the converted network has no spiking layer."""

    def __init__(self, qnet: nn.Module, time_steps: int, neuron: str = "if",
                 options: Optional[Dict[str, bool]] = None) -> None:
        super().__init__()
        from .convert import to_snn

        self.time_steps = time_steps
        self.net = to_snn(qnet, 1, neuron, **(options or {})).eval()
        self.carried: List[CarriedState] = []
        for name, module in list(self.net.named_modules()):
            if isinstance(module, SpikingNeuron):
                wrapper = CarriedState(module)
                parent, _, attr = name.rpartition(".")
                setattr(self.net.get_submodule(parent) if parent else self.net, attr, wrapper)
                self.carried.append(wrapper)
        if not self.carried:
            raise ValueError("the converted network has no spiking layer to step")

    def forward(self, x: torch.Tensor) -> Any:
        for layer in self.carried:
            layer.state = None
        outputs = [self.net(x) for _ in range(self.time_steps)]
        return torch.utils._pytree.tree_map(lambda *ys: torch.stack(ys).mean(0), *outputs)


def _run_with_hooks(model: nn.Module, x: torch.Tensor, handles: List[Any]) -> None:
    """One forward without gradients, then removes the hooks ``handles`` (whatever happened)."""
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()


def count_macs(model: nn.Module, x: torch.Tensor) -> Dict[str, int]:
    """Multiply-accumulates per image of every conv and linear layer of ``model``
    ({module name: MACs}), from one forward of the batch ``x`` [B, ...] with hooks."""
    macs: Dict[str, int] = {}
    handles = []

    def hook(name: str) -> Callable:
        def record(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            batch = inputs[0].shape[0]
            if isinstance(module, nn.modules.conv._ConvNd):
                kernel = math.prod(module.kernel_size) * (module.in_channels // module.groups)
                macs[name] = macs.get(name, 0) + output.numel() // batch * kernel
            else:
                macs[name] = macs.get(name, 0) + output.numel() // batch * module.in_features
        return record

    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            handles.append(module.register_forward_hook(hook(name)))
    _run_with_hooks(model, x, handles)
    return macs


def _is_spiking(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), SpikingNeuron)


def _spiking_fed_layers(snn: fx.GraphModule) -> Dict[str, bool]:
    """For every conv/linear call in the converted graph: whether a spiking layer precedes it."""
    fed: Dict[fx.Node, bool] = {}
    result: Dict[str, bool] = {}
    for node in snn.graph.nodes:
        fed[node] = any(fed[i] or _is_spiking(snn, i) for i in node.all_input_nodes)
        if node.op == "call_module" and isinstance(snn.get_submodule(node.target),
                                                   (nn.modules.conv._ConvNd, nn.Linear)):
            result[node.target] = fed[node]
    return result


def _unit(layer: SpikingNeuron, spikes: torch.Tensor) -> torch.Tensor:
    """u = θ/m shaped to broadcast against the layer's merged [T·B, C, ...] output."""
    unit = layer.threshold.to(spikes.device, torch.float64) / layer.group_size
    if unit.dim() == 1 and spikes.dim() >= 2 and unit.numel() == spikes.shape[1] and unit.numel() > 1:
        return unit.view((1, -1) + (1,) * (spikes.dim() - 2))
    return unit


def spike_statistics(snn: fx.GraphModule, macs: Dict[str, int], x: torch.Tensor, time_steps: int
                     ) -> Dict[str, Any]:
    """Spike rates, synaptic operations and the 45 nm energy estimate of a converted
    network ``snn`` (``to_snn(qnet, time_steps, ...)`` with neurons emitting
    (k+ − k−)·u, e.g. without ``compact_spikes``), per image, from one forward of ``x``.

    ``macs`` is :func:`count_macs` of the quantized ANN. Returns ``spike_rates``
    ({layer: rate (mean |k| per neuron per step), neurons, spikes_per_image}),
    ``layers`` ({conv/linear: macs, spiking_input, input_nonzero, and sops =
    MACs·T·non-zero input fraction for layers fed by spikes or snn_macs = MACs·T
    for layers fed by the analog input}), the totals ``sops``, ``snn_macs``,
    ``ann_macs``, and ``energy_snn_uj``, ``energy_snn_constant_input_once_uj``
    (the analog-fed layers computed once), ``energy_ann_uj``,
    ``energy_ratio_snn_over_ann`` at :data:`PJ_PER_SOP` / :data:`PJ_PER_MAC`."""
    T = time_steps
    rates: Dict[str, Dict[str, float]] = {}
    nonzero: Dict[str, float] = {}
    fed = _spiking_fed_layers(snn)
    handles = []

    def neuron_hook(name: str) -> Callable:
        def record(module: SpikingNeuron, inputs: Any, output: torch.Tensor) -> None:
            counts = (output.double() / _unit(module, output)).abs().round()
            rates[name] = {"rate": float(counts.sum()) / output.numel(), "neurons": output[0].numel(),
                           "spikes_per_image": float(counts.sum()) / (output.shape[0] // T)}
        return record

    def layer_hook(name: str) -> Callable:
        def record(module: nn.Module, inputs: Any) -> None:
            nonzero[name] = float((inputs[0] != 0).sum()) / inputs[0].numel()
        return record

    for name, module in snn.named_modules():
        if isinstance(module, SpikingNeuron):
            handles.append(module.register_forward_hook(neuron_hook(name)))
        elif isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            handles.append(module.register_forward_pre_hook(layer_hook(name)))
    _run_with_hooks(snn, x, handles)
    layers = {}
    sops = mac_ops = 0.0
    for name, layer_macs in macs.items():
        if name not in nonzero:
            continue  # a layer the conversion removed (e.g. folded)
        spiking_input = fed.get(name, False)
        entry: Dict[str, Any] = {"macs": layer_macs, "spiking_input": spiking_input, "input_nonzero": nonzero[name]}
        if spiking_input:
            entry["sops"] = layer_macs * T * nonzero[name]
            sops += entry["sops"]
        else:
            entry["snn_macs"] = layer_macs * T
            mac_ops += entry["snn_macs"]
        layers[name] = entry
    ann_macs = float(sum(macs.values()))
    snn_pj = sops * PJ_PER_SOP + mac_ops * PJ_PER_MAC
    # constant_input_once computes the analog-fed layers once instead of T times
    once_pj = sops * PJ_PER_SOP + mac_ops / T * PJ_PER_MAC
    return {
        "spike_rates": rates, "layers": layers, "sops": sops, "snn_macs": mac_ops, "ann_macs": ann_macs,
        "energy_snn_uj": snn_pj * 1e-6, "energy_snn_constant_input_once_uj": once_pj * 1e-6,
        "energy_ann_uj": ann_macs * PJ_PER_MAC * 1e-6,
        "energy_ratio_snn_over_ann": snn_pj / (ann_macs * PJ_PER_MAC) if ann_macs else None,
    }


# Lines kineto (torch.profiler's C++ side) writes to the native stderr on every profiling session,
# at any KINETO_LOG_LEVEL that still shows errors; its WARNING and ERROR lines pass through.
_PROFILER_NOISE = ("USDT:", "STAGE:")


@contextlib.contextmanager
def _without_profiler_noise() -> Any:
    """Sends file descriptor 2 (where C++ std::cerr writes) to a temporary file for the block,
    then writes every line of it except kineto's noise lines to sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode("utf-8", errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not line.startswith(_PROFILER_NOISE))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


class PeakMemory:
    """Peak memory a call adds. ``peak_bytes``: the high-water mark of tensor memory allocated
    during the call (CUDA: max_memory_allocated; CPU: the running sum of the allocations and
    frees in torch.profiler's memory events). ``rss_peak_delta_bytes`` (CPU): the process's
    resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) over the resident
    set before the call; glibc keeps freed pages, so this undercounts a call that reuses them
    (often 0)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    @staticmethod
    def _status_kb(key: str) -> Optional[int]:
        try:
            with open("/proc/self/status", encoding="ascii") as status:
                for line in status:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def _rss_delta(self, call: Callable[[], Any]) -> Optional[int]:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
                clear.write("5")  # resets VmHWM to the current resident set
        except OSError:
            return None
        before = self._status_kb("VmRSS")
        result = call()
        peak = self._status_kb("VmHWM")
        del result
        return None if before is None or peak is None else (peak - before) * 1024

    @staticmethod
    def _profiled_peak(call: Callable[[], Any]) -> Optional[int]:
        from torch.profiler import ProfilerActivity, profile

        fd, path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        try:
            with _without_profiler_noise():  # kineto logs at start, stop and export
                with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                    result = call()
                    del result  # freed while profiling, so the profiler's running total sees it
                prof.export_chrome_trace(path)
            with open(path, encoding="utf-8") as handle:
                events = json.load(handle)["traceEvents"]
        finally:
            os.unlink(path)
        memory = [e["args"] for e in sorted(events, key=lambda e: e.get("ts", 0))
                  if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0]
        if not memory:
            return 0
        # Each event's "Bytes" is one allocation (+) or free (-). Their running sum is the
        # tensor memory this call holds; "Total Allocated" is not used because every
        # allocator reports its own total (fastspike's huge-page outputs have their own).
        return max(0, max(itertools.accumulate(a["Bytes"] for a in memory)))

    def measure(self, call: Callable[[], Any]) -> Dict[str, Optional[int]]:
        """{"peak_bytes": ..., and on the CPU "rss_peak_delta_bytes": ...} of one ``call()``."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            call()
            torch.cuda.synchronize(self.device)
            return {"peak_bytes": torch.cuda.max_memory_allocated(self.device) - before}
        rss = self._rss_delta(call)
        gc.collect()
        return {"peak_bytes": self._profiled_peak(call), "rss_peak_delta_bytes": rss}
