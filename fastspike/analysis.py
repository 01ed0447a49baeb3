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
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import nn

from .nn import SpikingNeuron
from .quant import QuantReLU, quantize_tensor

__all__ = ["layerwise_comparison", "format_comparison", "compare_neurons"]

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


def format_comparison(rows: List[Dict[str, Any]]) -> str:
    """The rows of :func:`layerwise_comparison` as a text table."""
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
