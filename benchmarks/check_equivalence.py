"""CUDA == CPU == reference: the kernels on a GPU against the CPU kernels and the reference loop.

    python benchmarks/check_equivalence.py --device cuda --out equivalence.json   # on a GPU (under a minute)
    python benchmarks/check_equivalence.py --device cpu --quick                   # rehearsal: CPU kernels only

Step (b) of benchmarks/gpu_check.sh. For every neuron kind (IF, signed IF, group 4, group 3,
signed group 3, signed group 127), dtype (float32, float64, float16, bfloat16), threshold layout
(a Python number, a 0-dim tensor, per channel [C], per neuron shared over the batch, per neuron)
and input (randn, and a lattice of multiples of 0.15 that puts the membrane exactly on the
levels), the same input runs through

* ``device``      fastspike.neuron on --device (the CUDA kernels on a GPU),
* ``cpu``         fastspike.neuron on the CPU (the compiled CPU kernels),
* ``ref_device``  the reference loop (fastspike.reference.neuron_reference) on --device,

and each is compared bit for bit (spikes, v, count) with the reference loop on the CPU, in five
forms: plain, ``residual=``, ``compact=True`` (int8 counts), ``out=`` in place over x, and chunked
(T = 2 + rest, the second call from the first's state). The thresholds are drawn so that about a
third of them give a unit θ/3 that CUDA's reciprocal division would round differently (docs/design.md §4).

Gradients (grad="surrogate" and "rate", float32 and float64): the kernels' input gradient on
--device and on the CPU against the CPU reference's, within tests/test_backward.py's tolerances
(a failure), and whether the device's and the CPU's are bit-equal (reported, not a failure: the
device's expf/atanf may round differently from the host's libm).

With --device cpu only ``cpu`` is compared (the script's own rehearsal where there is no GPU).

Output: one line per failing comparison and a summary line on stdout; with --out a JSON of every
figure (cases, comparisons, mismatches with element counts, the gradients' largest differences).
Exit status: 0 every comparison passed; 1 some did not; 2 bad arguments; 3 --device cuda and torch
sees no GPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

import fastspike
from fastspike.reference import accumulation_dtype, neuron_reference

NO_GPU = 3
KINDS = {  # name -> (group_size, signed)
    "if": (1, False), "signed": (1, True), "group4": (4, False), "group3": (3, False),
    "signed_group3": (3, True), "signed_group127": (127, True),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
LAYOUTS = ("number", "scalar", "channel", "neuron", "sample_neuron")
INPUTS = ("randn", "lattice")
FORMS = ("plain", "residual", "compact", "out", "chunked")
SHAPE = (6, 3, 5, 7, 11)  # T, B, C, H, W: 1155 neurons a step, not a multiple of any block or vector width
QUICK_SHAPE = (4, 2, 3, 5, 7)
GRAD_DTYPES = {"float32": torch.float32, "float64": torch.float64}
GRAD_LAYOUTS = ("number", "channel", "sample_neuron")
# tests/test_backward.py's tolerances
TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def sensitive_thresholds(count: int, seed: int) -> torch.Tensor:
    """float32 thresholds in [0.3, 1.3), about a third with θ·(1/3) != θ/3."""
    theta = torch.rand(8 * count + 64, generator=torch.Generator().manual_seed(seed)) + 0.3
    odd = theta * (torch.ones(()) / 3) != theta / 3
    # interleave sensitive and other values so that every layout gets both
    sensitive = count // 3 + 1 if count > 1 else 1
    chosen = torch.cat([theta[odd][:sensitive], theta[~odd][: count - sensitive]])
    assert chosen.numel() == count
    return chosen[torch.randperm(count, generator=torch.Generator().manual_seed(seed))]


def make_threshold(layout: str, shape: Sequence[int]):
    if layout == "number":
        return float(sensitive_thresholds(1, 1)[0])
    if layout == "scalar":
        return sensitive_thresholds(1, 2).reshape(())
    if layout == "channel":
        return sensitive_thresholds(shape[2], 3)
    dims = tuple(shape[2:]) if layout == "neuron" else tuple(shape[1:])
    return sensitive_thresholds(int(torch.Size(dims).numel()), 4).reshape(dims)


def make_input(kind: str, shape: Sequence[int], dtype: torch.dtype, group_size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "lattice":  # exact ties with the levels j·u for some neurons
        values = torch.randint(-6, 9, tuple(shape), generator=gen).float() * 0.15
    else:
        values = torch.randn(tuple(shape), generator=gen) * (0.7 if group_size < 100 else 40.0)
    return values.to(dtype)


def on(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def run_form(impl, form: str, x, threshold, residual, group_size, signed, device) -> List[torch.Tensor]:
    """(spikes, v, count) of one form, on the CPU for comparison."""
    x, threshold, residual = on(x, device), on(threshold, device), on(residual, device)
    kw = dict(group_size=group_size, signed=signed)
    ref = impl is neuron_reference
    if ref:
        kw["grad"] = "none"
    with torch.no_grad():
        if form == "plain":
            result = impl(x, threshold, **kw)
        elif form == "residual":
            result = impl(x, threshold, residual=residual, **kw)
        elif form == "compact":
            result = impl(x, threshold, compact=True, **kw)
        elif form == "out":
            if ref:
                result = impl(x, threshold, **kw)
            else:
                buffer = x.clone()
                result = impl(buffer, threshold, out=buffer, **kw)
        elif form == "chunked":
            if ref:  # the reference's whole run: chunking must not change anything
                result = impl(x, threshold, **kw)
            else:
                first = impl(x[:2], threshold, **kw)
                second = impl(x[2:], threshold, v_init=first.v, count_init=first.count, **kw)
                result = (torch.cat([first.spikes, second.spikes]), second.v, second.count)
        else:
            raise ValueError(form)
    return [t.cpu() for t in result]


def compare(expected: Sequence[torch.Tensor], actual: Sequence[torch.Tensor]) -> Optional[str]:
    for name, e, a in zip(("spikes", "v", "count"), expected, actual):
        if e.dtype != a.dtype or e.shape != a.shape:
            return f"{name}: {a.dtype}{list(a.shape)} != {e.dtype}{list(e.shape)}"
        same = (e == a) | (torch.isnan(e) & torch.isnan(a)) if e.is_floating_point() else e == a
        if not bool(same.all()):
            diff = (e.double() - a.double()).abs()
            return f"{name}: {int((~same).sum())} of {e.numel()} differ, max {diff.max().item():.3g}"
    return None


def gradient(impl, x, threshold, grad, group_size, signed, device, weights) -> torch.Tensor:
    xg = on(x, device).clone().requires_grad_(True)
    spikes = impl(xg, on(threshold, device), group_size=group_size, signed=signed, grad=grad).spikes
    (spikes.double() * on(weights, device)).sum().backward()
    return xg.grad.cpu()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="CUDA == CPU == reference, bit for bit (see the module docstring)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller shape and only the randn input (the rehearsal; seconds)")
    parser.add_argument("--out", default=None, help="JSON of every figure")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("check_equivalence: no GPU: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return NO_GPU
    device = torch.device(args.device)
    shape = QUICK_SHAPE if args.quick else SHAPE
    inputs = INPUTS[:1] if args.quick else INPUTS
    started = time.perf_counter()
    info = fastspike.backend_info()
    implementations = {"cpu": (fastspike.neuron, "cpu")}
    if device.type == "cuda":
        implementations = {"device": (fastspike.neuron, device), **implementations,
                           "ref_device": (neuron_reference, device)}
    counts: Dict[str, int] = {name: 0 for name in implementations}
    mismatches: List[Dict[str, Any]] = []
    cases = 0
    for (kind, (m, signed)), (dname, dtype), layout, input_kind in itertools.product(
            KINDS.items(), DTYPES.items(), LAYOUTS, inputs):
        cases += 1
        seed = cases
        x = make_input(input_kind, shape, dtype, m, seed)
        residual = make_input("randn", shape, dtype, m, seed + 10_000) * 0.5
        threshold = make_threshold(layout, shape)
        for form in FORMS:
            if form == "compact" and m > 127:
                continue
            expected = run_form(neuron_reference, form, x, threshold, residual, m, signed, "cpu")
            for name, (impl, where) in implementations.items():
                counts[name] += 1
                try:
                    problem = compare(expected, run_form(impl, form, x, threshold, residual, m, signed, where))
                except Exception as exc:  # an error is a failed comparison, not the end of the check
                    problem = f"error: {type(exc).__name__}: {exc}"
                if problem:
                    case = dict(kind=kind, dtype=dname, layout=layout, input=input_kind, form=form,
                                implementation=name, problem=problem)
                    mismatches.append(case)
                    print("MISMATCH " + " ".join(f"{k}={v}" for k, v in case.items()), flush=True)

    grad_rows: List[Dict[str, Any]] = []
    grad_failures = 0
    for (kind, (m, signed)), dname, layout, grad in itertools.product(
            KINDS.items(), GRAD_DTYPES, GRAD_LAYOUTS, ("surrogate", "rate")):
        dtype = GRAD_DTYPES[dname]
        x = make_input("randn", shape, dtype, m, 7) + (0.2 if grad == "rate" else 0.0)
        weights = torch.randn(shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
        threshold = make_threshold(layout, shape)
        expected = gradient(neuron_reference, x, threshold, grad, m, signed, "cpu", weights)
        row: Dict[str, Any] = dict(kind=kind, dtype=dname, layout=layout, grad=grad)
        got = {}
        for name, (impl, where) in implementations.items():
            if impl is neuron_reference:
                continue
            try:
                got[name] = gradient(impl, x, threshold, grad, m, signed, where, weights)
                ok = torch.allclose(got[name].double(), expected.double(), **TOLERANCE[dtype])
                row[f"{name}_max_abs_diff_vs_reference"] = (got[name].double() - expected.double()).abs().max().item()
            except Exception as exc:
                ok = False
                row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
            row[f"{name}_within_tolerance"] = ok
            if not ok:
                grad_failures += 1
                print(f"GRADIENT {name} kind={kind} dtype={dname} layout={layout} grad={grad}: {row}", flush=True)
        if "device" in got and "cpu" in got:
            row["device_equals_cpu_bitwise"] = bool(torch.equal(got["device"], got["cpu"]))
        grad_rows.append(row)

    compared = sum(counts.values())
    bitwise = [r["device_equals_cpu_bitwise"] for r in grad_rows if "device_equals_cpu_bitwise" in r]
    passed = not mismatches and grad_failures == 0
    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "backend": info, "shape": list(shape), "inputs": list(inputs),
        "cases": cases, "forms": list(FORMS), "forward_comparisons": counts, "forward_mismatches": len(mismatches),
        "mismatches": mismatches[:200], "gradient_cases": len(grad_rows), "gradient_failures": grad_failures,
        "gradients_device_bitwise_equal_cpu": f"{sum(bitwise)}/{len(bitwise)}" if bitwise else None,
        "gradients": grad_rows, "passed": passed, "elapsed_s": round(time.perf_counter() - started, 2),
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    print(f"check_equivalence on {summary['device']}: {'PASS' if passed else 'FAIL'}: "
          f"{cases} cases x {len(FORMS)} forms, {compared} forward comparisons, {len(mismatches)} mismatches; "
          f"{len(grad_rows)} gradient cases, {grad_failures} outside tolerance"
          + (f", device == CPU bitwise in {summary['gradients_device_bitwise_equal_cpu']}" if bitwise else "")
          + f" ({summary['elapsed_s']} s)", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
