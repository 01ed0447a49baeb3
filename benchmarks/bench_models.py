"""Whole-network benchmark of converted SNNs against their dense floor and the loops they replace.

Run from the repository root (after building the extension):

    python benchmarks/bench_models.py --quick                    # a tiny residual CNN, T 1 2 (seconds)
    python benchmarks/bench_models.py                            # all models, T 1 2 4 8, --device cuda if present
    python benchmarks/bench_models.py --models cifar_resnet18 --T 4 --batch 8 --device cuda

Models (random weights, quantized with fastspike.quantize, calibrated on random images, converted
with fastspike.to_snn): ``cifar_resnet18`` (32x32), ``resnet18`` (torchvision, 224x224),
``cifar_vgg16`` (32x32), ``tiny_yolov2`` (width 0.5, 224x224), ``small_deeplab`` (width 16,
128x128), and ``tiny_cnn`` (a small residual CNN for tests). Nothing is downloaded.

For every model and T, these contenders are timed interleaved round-robin for ``--rounds`` rounds
(median reported; each sample repeats the call until it lasts ``--min-time`` seconds), per image:

* ``ann``          the quantized ANN; ``T x ann`` is the dense floor an SNN of T steps is held to
* ``snn``          the converted SNN as to_snn builds it by default (all T steps in one call per layer)
* ``snn_plain``    to_snn with every optional speed-up off (fuse_residual, constant_input_once,
                   compact_spikes, where to_snn has them); skipped as the same network as ``snn``
                   while to_snn's defaults are all off (then ``snn`` is the plain network)
* ``snn+<opt>``    the plain network with just that option on, so each one's saving (time and peak
                   memory) is the ratio/difference to the plain network; skipped (with the reason) where to_snn has
                   no such keyword
* ``snn_all``      every option to_snn has switched on
* ``stepped``      the same network stepped one time step at a time through the whole network, the
                   way the seed papers evaluate (``for t in range(T): out += net(x)``): converted
                   with T = 1 and every spiking layer carrying its (v, count) state from step to step
                   through SpikingNeuron.step; its output equals the plain network's up to how
                   the convolutions round over B images instead of T*B (exact on small nets;
                   max_abs_diff_vs_plain and stepped_equals_plain in the JSON say)
* ``reference``    ``snn`` under fastspike.use_reference() (the pure-PyTorch neuron loop)
* ``sj``           SpikingJelly (where installed; skipped with the reason otherwise): the same float
                   model converted by SpikingJelly's own ann2snn (``Converter`` with
                   ``RateCodingRecipe(mode="max")`` in 2.x, ``Converter(mode="max")`` in 0.0.0.0.14,
                   calibrated on the same random images: ``VoltageScaler`` + ``IFNode``, soft reset),
                   simulated the way SpikingJelly evaluates it: ``functional.reset_net``, then the
                   network called T times on the image, outputs averaged
* ``sj_fastspike`` that same SpikingJelly network imported with
                   ``fastspike.interop.from_spikingjelly`` and run on fastspike's kernels (all T steps
                   in one call on the [T, B, ...] input, averaged over T); ``max_abs_diff_sj`` in the
                   JSON is its largest difference from ``sj`` (0.0: bit for bit), and
                   ``ratios.sj_over_sj_fastspike`` the speed-up. A different network from ``snn``
                   (SpikingJelly's thresholds and scaling), so it is left out of max_abs_diff_vs_plain.

Peak memory per contender, one warm call each (``peak_bytes``): on CUDA
torch.cuda.max_memory_allocated (reset before the call) minus the memory allocated before it; on
the CPU the high-water mark of the tensor memory allocated during the call, from torch.profiler's
memory events (profile_memory=True), plus ``rss_peak_delta_bytes``, the process's resident-set
high-water mark (VmHWM, reset through /proc/self/clear_refs) over the resident set before the
call (glibc keeps freed pages resident, so this OS view undercounts and is often 0).

Spikes and energy (from the plain network, whose neurons emit (k+ - k-)*u): per spiking layer the spike
rate (mean |k| per neuron per time step); per conv/linear layer its multiply-accumulates per image
(MACs, from forward hooks on the quantized ANN) and, in the SNN, whether its input comes from a
spiking layer. Synaptic operations SOPs = MACs x T x (fraction of non-zero inputs over the T
steps); layers fed by the analog image still multiply (MACs x T). The 45 nm estimate (Horowitz,
ISSCC 2014, as used by the conversion papers): 0.9 pJ per accumulate (SOP), 4.6 pJ per MAC.

The stepped network, the MAC/SOP counts, the energy estimate and the peak memory are
fastspike.analysis's (SteppedSNN, count_macs, spike_statistics, PeakMemory).

Output: a table on stdout and a JSON file (default benchmarks/results/models-<cpu|cuda>-<device name>.json,
rewritten after every configuration) plus a PNG of time per image against T (--no-plot skips it).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_neurons, the sibling script

import fastspike  # noqa: E402
from fastspike.analysis import PJ_PER_MAC, PJ_PER_SOP, PeakMemory, SteppedSNN, count_macs, spike_statistics  # noqa: E402
from fastspike.models import get_model  # noqa: E402

from bench_neurons import Timer, default_device, device_name, run_header, slug, write_json  # noqa: E402
OPTIONS = ("fuse_residual", "constant_input_once", "compact_spikes")
SJ_CONTENDERS = ("sj", "sj_fastspike")
CONTENDERS = (("ann", "snn", "snn_plain") + tuple(f"snn+{o}" for o in OPTIONS) + ("snn_all", "stepped", "reference")
              + SJ_CONTENDERS)
SEED = 0


class TinyCNN(nn.Module):
    """A small residual CNN (conv-BN-ReLU stem, one residual block, pooling, linear) for --quick."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = self.relu2(self.conv2(self.relu1(self.conv1(y))) + y)
        return self.fc(torch.flatten(self.pool(y), 1))


# name -> (builder, input shape without batch)
MODELS: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...]]] = {
    "cifar_resnet18": (lambda: get_model("cifar_resnet18", num_classes=10), (3, 32, 32)),
    "resnet18": (lambda: get_model("resnet18", num_classes=1000), (3, 224, 224)),
    "cifar_vgg16": (lambda: get_model("cifar_vgg16", num_classes=10), (3, 32, 32)),
    "tiny_yolov2": (lambda: get_model("tiny_yolov2", num_classes=3, width=0.5), (3, 224, 224)),
    "small_deeplab": (lambda: get_model("small_deeplab", num_classes=4, width=16), (3, 128, 128)),
    "tiny_cnn": (lambda: TinyCNN(), (3, 16, 16)),
}
DEFAULT_MODELS = ("cifar_resnet18", "resnet18", "cifar_vgg16", "tiny_yolov2", "small_deeplab")


# ----------------------------------------------------------------------------- building


def available_options() -> List[str]:
    """The speed-up keywords this fastspike.to_snn accepts (of OPTIONS)."""
    params = inspect.signature(fastspike.to_snn).parameters
    return [o for o in OPTIONS if o in params]


def _default_options() -> Dict[str, bool]:
    """to_snn's default value of each speed-up keyword it has."""
    params = inspect.signature(fastspike.to_snn).parameters
    return {o: bool(params[o].default) for o in available_options()}


def build_quantized(name: str, levels: int, batch: int, device: torch.device) -> Tuple[nn.Module, torch.Tensor]:
    """The quantized ANN of model ``name`` (calibrated on seeded random images) and an input batch."""
    builder, shape = MODELS[name]
    torch.manual_seed(SEED)
    net = builder().eval()
    gen = torch.Generator().manual_seed(SEED)
    calib = [torch.rand((4,) + shape, generator=gen) for _ in range(2)]  # the same λ at any --batch
    qnet = fastspike.quantize(net, levels=levels)
    fastspike.calibrate(qnet, calib)
    x = torch.rand((batch,) + shape, generator=gen)
    return qnet.eval().to(device), x.to(device)


def spikingjelly_version() -> Optional[str]:
    """The installed SpikingJelly's version, or None when it cannot be imported."""
    try:
        import spikingjelly.activation_based.ann2snn  # noqa: F401
        from importlib import metadata
    except Exception:  # not installed, or broken: the SpikingJelly contenders are skipped
        return None
    try:
        return metadata.version("spikingjelly")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_spikingjelly(name: str, device: torch.device) -> Tuple[Optional[nn.Module], Optional[str]]:
    """(SpikingJelly's ann2snn conversion of model ``name``, None), calibrated on the same seeded
    random images as build_quantized; or (None, why not) when SpikingJelly is missing or fails."""
    if spikingjelly_version() is None:
        return None, "SpikingJelly is not installed"
    import io

    from spikingjelly.activation_based import ann2snn

    builder, shape = MODELS[name]
    torch.manual_seed(SEED)
    net = builder().eval()
    gen = torch.Generator().manual_seed(SEED)
    calib = [(torch.rand((4,) + shape, generator=gen), torch.zeros(4, dtype=torch.long)) for _ in range(2)]
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # its progress bars
            if hasattr(ann2snn, "recipes"):  # 2.x
                snn = ann2snn.Converter(ann2snn.recipes.RateCodingRecipe(calib, mode="max")).convert(net)
            else:  # 0.0.0.0.14
                snn = ann2snn.Converter(mode="max", dataloader=calib)(net)
    except Exception as exc:  # a model SpikingJelly's converter cannot take: reported, not fatal
        return None, f"SpikingJelly's ann2snn failed: {type(exc).__name__}: {exc}"
    return snn.eval().to(device), None


def spikingjelly_calls(sj_net: nn.Module, T: int) -> Dict[str, Callable]:
    """The two SpikingJelly contenders on one SpikingJelly network: SpikingJelly's own T-step
    loop and fastspike's import of it (from_spikingjelly), both returning the mean over T."""
    from spikingjelly.activation_based import functional as sj_functional

    from fastspike.interop import from_spikingjelly

    imported = from_spikingjelly(sj_net).eval()

    def simulate(x: torch.Tensor) -> Any:
        sj_functional.reset_net(sj_net)
        outputs = [sj_net(x) for _ in range(T)]
        return torch.stack(outputs).mean(0)

    def fused(x: torch.Tensor) -> Any:
        return imported(x.unsqueeze(0).expand((T,) + tuple(x.shape))).mean(0)

    return {"sj": simulate, "sj_fastspike": fused}


def convert(qnet: nn.Module, T: int, neuron: str, options: Dict[str, bool]) -> fx.GraphModule:
    return fastspike.to_snn(qnet, T, neuron, **options).eval()


# ----------------------------------------------------------------------------- one configuration


def _max_abs_diff(a: Any, b: Any) -> float:
    la, lb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    return max(float((p.double() - q.double()).abs().max()) for p, q in zip(la, lb) if isinstance(p, torch.Tensor))


def make_contenders(qnet: nn.Module, T: int, args: argparse.Namespace,
                    sj: Tuple[Optional[nn.Module], Optional[str]] = (None, "no SpikingJelly network given")
                    ) -> Tuple[Dict[str, Callable], Dict[str, str], Dict[str, nn.Module]]:
    """The callables (input -> output) of each contender, the skipped ones with a reason, and the
    converted networks by name. ``sj``: (SpikingJelly network, None) or (None, why there is none)."""
    present = available_options()
    plain = {o: False for o in present}
    nets: Dict[str, nn.Module] = {"ann": qnet}
    skipped: Dict[str, str] = {}
    sj_calls: Dict[str, Callable] = {}
    if any(c in SJ_CONTENDERS for c in args.contenders):
        sj_net, why = sj
        if sj_net is None:
            skipped.update({c: str(why) for c in SJ_CONTENDERS if c in args.contenders})
        else:
            try:
                sj_calls = spikingjelly_calls(sj_net, T)
            except Exception as exc:  # from_spikingjelly refused it: said, not fatal
                skipped.update({c: f"error: {type(exc).__name__}: {exc}" for c in SJ_CONTENDERS})
    for name in args.contenders:
        if name in ("ann", "reference") or name in SJ_CONTENDERS:
            continue
        if name == "snn":
            nets[name] = convert(qnet, T, args.neuron, {})
        elif name == "snn_plain":
            if not any(_default_options().values()):
                skipped[name] = "the same network as snn (to_snn's options are all off by default): see snn"
                continue
            nets[name] = convert(qnet, T, args.neuron, plain)
        elif name == "snn_all":
            if not present:
                skipped[name] = f"fastspike.to_snn has none of the options {', '.join(OPTIONS)}"
                continue
            nets[name] = convert(qnet, T, args.neuron, {o: True for o in present})
        elif name == "stepped":
            nets[name] = SteppedSNN(qnet, T, args.neuron, plain).eval()
        else:
            option = name.split("+", 1)[1]
            if option not in present:
                skipped[name] = f"fastspike.to_snn has no {option}= option"
                continue
            nets[name] = convert(qnet, T, args.neuron, dict(plain, **{option: True}))
    calls: Dict[str, Callable] = {}
    for name in args.contenders:
        if name in skipped:
            continue
        if name == "reference":
            snn = nets.get("snn") or convert(qnet, T, args.neuron, {})
            nets.setdefault("snn", snn)

            def reference(x, snn=snn):
                with fastspike.use_reference():
                    return snn(x)
            calls[name] = reference
        elif name in SJ_CONTENDERS:
            calls[name] = sj_calls[name]
        else:
            calls[name] = nets[name]
    return calls, skipped, nets


def bench_model_T(name: str, qnet: nn.Module, x: torch.Tensor, T: int, macs: Dict[str, int],
                  args: argparse.Namespace, timer: Timer, memory: PeakMemory,
                  sj: Tuple[Optional[nn.Module], Optional[str]] = (None, "no SpikingJelly network given")
                  ) -> Dict[str, Any]:
    calls, skipped, nets = make_contenders(qnet, T, args, sj)
    batch = x.shape[0]
    contenders: Dict[str, Dict[str, Any]] = {c: {"skipped": r} for c, r in skipped.items()}
    iters: Dict[str, int] = {}
    outputs: Dict[str, Any] = {}
    with torch.no_grad():
        for cname, call in list(calls.items()):
            entry: Dict[str, Any] = {"samples": []}
            contenders[cname] = entry
            try:
                timer.sync()
                start = time.perf_counter()
                outputs[cname] = call(x)  # the warm-up call, timed to size the samples
                timer.sync()
                warm = time.perf_counter() - start
            except Exception as exc:  # one failing contender must not stop the benchmark
                entry["skipped"] = f"error: {type(exc).__name__}: {exc}"
                del calls[cname]
                continue
            if warm > args.max_seconds_per_call:
                entry["skipped"] = f"one call took {warm:.2f} s > --max-seconds-per-call {args.max_seconds_per_call}"
                del calls[cname]
                continue
            iters[cname] = max(1, math.ceil(args.min_time / max(warm, 1e-9)))
            entry["iters"] = iters[cname]
        for _ in range(args.rounds):
            for cname, call in calls.items():
                contenders[cname]["samples"].append(timer.run(lambda call=call: call(x), iters[cname], no_grad=True) / batch)
        for cname, call in calls.items():
            entry = contenders[cname]
            entry["median_s_per_image"] = statistics.median(entry["samples"])
            entry["min_s_per_image"] = min(entry["samples"])
            entry.update(memory.measure(lambda call=call: call(x)))
        plain_name = "snn_plain" if "snn_plain" in nets else "snn"
        stats_net = nets.get(plain_name)
        stats = spike_statistics(stats_net, macs, x, T) if isinstance(stats_net, fx.GraphModule) else None
    med = {c: e.get("median_s_per_image") for c, e in contenders.items()}

    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return a / b if a and b else None

    ann = med.get("ann")
    floor = ann * T if ann else None
    ratios: Dict[str, Optional[float]] = {
        "snn_over_T_ann": ratio(med.get("snn"), floor),
        "snn_all_over_T_ann": ratio(med.get("snn_all"), floor),
        "stepped_over_snn": ratio(med.get("stepped"), med.get("snn")),
        "reference_over_snn": ratio(med.get("reference"), med.get("snn")),
        "snn_plain_over_snn": ratio(med.get("snn_plain"), med.get("snn")),
        "sj_over_sj_fastspike": ratio(med.get("sj"), med.get("sj_fastspike")),
    }
    savings: Dict[str, Dict[str, Any]] = {}
    for option in OPTIONS:
        cname = f"snn+{option}"
        if med.get(cname) and med.get(plain_name):
            plain_peak, opt_peak = contenders[plain_name].get("peak_bytes"), contenders[cname].get("peak_bytes")
            savings[option] = {
                "time_ratio_plain_over_option": med[plain_name] / med[cname],
                "peak_bytes_saved": plain_peak - opt_peak if plain_peak is not None and opt_peak is not None else None,
            }
    agreement: Dict[str, float] = {}
    reference_out = outputs.get(plain_name)
    if reference_out is not None:
        for cname, out in outputs.items():
            if cname != "ann" and cname not in SJ_CONTENDERS and out is not None:
                agreement[cname] = _max_abs_diff(out, reference_out)
    if "ann" in outputs and "snn" in outputs:
        agreement["snn_vs_ann"] = _max_abs_diff(outputs["snn"], outputs["ann"])
    sj_diff = (_max_abs_diff(outputs["sj_fastspike"], outputs["sj"])
               if "sj" in outputs and "sj_fastspike" in outputs else None)
    for cname in contenders:
        contenders[cname].setdefault("median_s_per_image", None)
    del calls, nets, outputs
    gc.collect()
    return {
        "model": name, "T": T, "batch": batch, "input_shape": list(x.shape[1:]), "contenders": contenders,
        "floor_T_ann_s_per_image": floor, "ratios": ratios, "option_savings": savings,
        "plain_network": plain_name, "max_abs_diff_vs_plain": agreement,
        "stepped_equals_plain": agreement.get("stepped") == 0.0 if "stepped" in agreement else None,
        "max_abs_diff_sj": sj_diff,
        "energy": stats,
    }


# ----------------------------------------------------------------------------- output


def table_row(r: Dict[str, Any]) -> str:
    def ms(c: str) -> str:
        v = r["contenders"].get(c, {}).get("median_s_per_image")
        return f"{v * 1e3:>9.2f}" if v else f"{'-':>9}"

    def x(v: Optional[float]) -> str:
        return f"{v:>7.2f}" if v else f"{'-':>7}"

    e = r.get("energy") or {}
    return (f"{r['model']:>15} {r['T']:>2} " + " ".join(ms(c) for c in CONTENDERS)
            + f" {x(r['ratios']['snn_over_T_ann'])} {x(r['ratios']['stepped_over_snn'])}"
            + f" {x(r['ratios'].get('sj_over_sj_fastspike'))}"
            + f" {x(e.get('energy_ratio_snn_over_ann'))}")


def table_header() -> str:
    short = {"snn+fuse_residual": "+fuse", "snn+constant_input_once": "+const", "snn+compact_spikes": "+int8",
             "snn_plain": "plain", "snn_all": "all", "reference": "ref", "sj_fastspike": "sj>fs"}
    return (f"{'model':>15} {'T':>2} " + " ".join(f"{short.get(c, c) + ' ms':>9}" for c in CONTENDERS)
            + f" {'/T*ann':>7} {'step/snn':>7} {'sj/sj>fs':>7} {'E s/a':>7}")


def plot(payload: Dict[str, Any], path: str) -> Optional[str]:
    """Time per image against T, one panel per model; None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = list(dict.fromkeys(r["model"] for r in payload["results"]))
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = sorted((r for r in payload["results"] if r["model"] == model), key=lambda r: r["T"])
        Ts = [r["T"] for r in rows]
        for cname in CONTENDERS:
            ys = [r["contenders"].get(cname, {}).get("median_s_per_image") for r in rows]
            if any(ys):
                ax.plot([t for t, y in zip(Ts, ys) if y], [y * 1e3 for y in ys if y], marker="o", label=cname)
        floor = [r["floor_T_ann_s_per_image"] for r in rows]
        if any(floor):
            ax.plot([t for t, y in zip(Ts, floor) if y], [y * 1e3 for y in floor if y], "k--", label="T x ann (floor)")
        ax.set_title(model)
        ax.set_xlabel("T")
        ax.set_ylabel("ms per image")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"fastspike converted SNNs on {payload['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Contenders: " + ", ".join(CONTENDERS))
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None,
                        help=f"default: {' '.join(DEFAULT_MODELS)} (tiny_cnn with --quick)")
    parser.add_argument("--T", type=int, nargs="+", default=None, help="time steps (default 1 2 4 8; 1 2 with --quick)")
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device())
    parser.add_argument("--batch", type=int, default=None, help="images per call (default 4 on CPU, 32 on CUDA; 2 with --quick)")
    parser.add_argument("--levels", type=int, default=8, help="quantization levels L (default 8)")
    parser.add_argument("--neuron", choices=sorted(fastspike.convert.NEURON_KINDS), default="if")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; 2 with --quick)")
    parser.add_argument("--min-time", type=float, default=None, help="seconds per sample (default 0.2; 0.01 with --quick)")
    parser.add_argument("--max-seconds-per-call", type=float, default=20.0,
                        help="skip a contender whose one warm call takes longer (default 20)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/models-<cpu|cuda>-<device name>.json)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG beside the JSON")
    parser.add_argument("--quick", action="store_true", help="tiny_cnn, T 1 2, batch 2, 2 rounds (for tests)")
    return parser


def resolve(args: argparse.Namespace) -> None:
    for positive in ("batch", "rounds", "levels"):
        value = getattr(args, positive)
        if value is not None and value < 1:
            raise SystemExit(f"bench_models.py: --{positive} must be >= 1, got {value}")
    if args.T is not None and any(t < 1 for t in args.T):
        raise SystemExit(f"bench_models.py: --T values must be >= 1, got {args.T}")
    quick = args.quick
    args.models = args.models or (["tiny_cnn"] if quick else list(DEFAULT_MODELS))
    args.T = args.T or ([1, 2] if quick else [1, 2, 4, 8])
    args.batch = args.batch or (2 if quick else (32 if args.device == "cuda" else 4))
    args.rounds = args.rounds or (2 if quick else 5)
    args.min_time = args.min_time if args.min_time is not None else (0.01 if quick else 0.2)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_models.py: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    resolve(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dname = device_name(device)
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        f"models-{device.type}-{slug(dname)}.json")
    payload: Dict[str, Any] = {
        **run_header(device, argv),
        "settings": {"models": args.models, "T": args.T, "contenders": args.contenders, "batch": args.batch,
                     "levels": args.levels, "neuron": args.neuron, "rounds": args.rounds, "min_time": args.min_time,
                     "to_snn_options_present": available_options(), "seed": SEED,
                     "spikingjelly": spikingjelly_version()},
        "energy_model": {"pj_per_sop": PJ_PER_SOP, "pj_per_mac": PJ_PER_MAC,
                         "note": "SOPs = MACs x T x non-zero input fraction for layers fed by spikes; "
                                 "layers fed by the analog input count MACs x T"},
        "targets": {"snn_over_T_ann": "<= 1.15 (resnet18 models, T = 4)", "stepped_over_snn": ">= 3"},
        "results": [],
    }
    timer, memory = Timer(device), PeakMemory(device)
    print(f"# {dname} ({device.type}), torch {torch.__version__}, {torch.get_num_threads()} threads, backend "
          f"{payload['backend']['backend']}, to_snn options {available_options() or 'none'} -> {out_path}")
    print(table_header(), flush=True)
    started = time.perf_counter()
    for name in args.models:
        qnet, x = build_quantized(name, args.levels, args.batch, device)
        macs = count_macs(qnet, x)
        sj = (build_spikingjelly(name, device) if any(c in SJ_CONTENDERS for c in args.contenders)
              else (None, "not asked for"))
        for T in args.T:
            result = bench_model_T(name, qnet, x, T, macs, args, timer, memory, sj)
            payload["results"].append(result)
            print(table_row(result), flush=True)
            for cname, entry in result["contenders"].items():
                if "skipped" in entry:
                    print(f"    {cname}: skipped ({entry['skipped']})", flush=True)
            payload["elapsed_s"] = time.perf_counter() - started
            write_json(out_path, payload)
        del qnet, x, sj
    if not args.no_plot:
        png = plot(payload, os.path.splitext(out_path)[0] + ".png")
        payload["plot"] = png
        write_json(out_path, payload)
    print(f"# {len(payload['results'])} configurations in {time.perf_counter() - started:.1f} s; wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
