"""How far apart the demo detector's SNNs really are: a paired bootstrap of mAP@0.5 over test scenes.

Run from the repository root after ``make demo`` (or ``fastspike demo --tasks detection``):

    python benchmarks/detection_bootstrap.py demo-results                  # 200 resamples
    python benchmarks/detection_bootstrap.py demo-results --resamples 50 --out boot.json

It reads the demo's own settings from ``<dir>/demo.json`` (test scenes, their size and seed, the
Ts), rebuilds the quantized ANN (``detection.pt``), its IF and signed-IF SNNs and the signed SNN
fine-tuned at each T (``detection-signed-finetuned-T<T>.pt``), and decodes every test scene's
detections once per model. Then it draws ``--resamples`` resamples of the scenes (with
replacement, the same resamples for every model, so differences are paired) and recomputes
mAP@0.5 on each. Printed and written: each model's mAP on all scenes, and for the differences
that issue 20 is about (fine-tuned − IF, fine-tuned − signed, each SNN − quantized ANN) the
difference on all scenes, its standard deviation over the resamples and how often it is <= 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List

import numpy as np
import torch
from torch.utils.data import DataLoader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fastspike.checkpoint import load_model  # noqa: E402
from fastspike.data import SyntheticScenes, collate_scenes  # noqa: E402
from fastspike.metrics import mean_average_precision  # noqa: E402
from fastspike.models.yolo import DEFAULT_ANCHORS, decode_yolo  # noqa: E402

NUM_CLASSES = 3  # the demo's scenes (fastspike.demo._detection)


@torch.no_grad()
def _detections(path: str, loader: DataLoader, size: int, **snn: Any) -> List[Dict[str, torch.Tensor]]:
    model = load_model(path, **snn).eval()
    return [d for x, _ in loader for d in decode_yolo(model(x), DEFAULT_ANCHORS, NUM_CLASSES, size)]


def main(argv: List[str] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", help="the demo's output folder (demo.json, detection*.pt)")
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="of the resampling")
    parser.add_argument("--out", help="also write the result as JSON here")
    args = parser.parse_args(argv)

    with open(os.path.join(args.results, "demo.json")) as f:
        cfg = json.load(f)["config"]
    size, steps = cfg["scene_size"], sorted(set(cfg["time_steps"]))
    scenes = SyntheticScenes(cfg["scenes_test"], size, seed=cfg["seed"] + 1)  # the demo's test split
    loader = DataLoader([scenes[i] for i in range(len(scenes))], cfg["batch_size"], collate_fn=collate_scenes)
    targets = [t for _, batch in loader for t in batch]
    base = os.path.join(args.results, "detection.pt")

    models = {"quantized ANN": _detections(base, loader, size)}
    for T in steps:
        models[f"IF T={T}"] = _detections(base, loader, size, time_steps=T, neuron="if")
        models[f"signed T={T}"] = _detections(base, loader, size, time_steps=T, neuron="signed")
        tuned = os.path.join(args.results, f"detection-signed-finetuned-T{T}.pt")
        models[f"signed fine-tuned T={T}"] = _detections(tuned, loader, size, time_steps=T, neuron="signed")

    def mean_ap(dets: List[Dict[str, torch.Tensor]], index: Any) -> float:
        return mean_average_precision([dets[i] for i in index], [targets[i] for i in index], NUM_CLASSES)["map"]

    n = len(targets)
    rng = np.random.default_rng(args.seed)
    draws = [rng.integers(0, n, n) for _ in range(args.resamples)]
    full = {name: mean_ap(dets, range(n)) for name, dets in models.items()}
    boot = {name: np.array([mean_ap(dets, d) for d in draws]) for name, dets in models.items()}

    pairs = []
    for T in steps:
        tuned = f"signed fine-tuned T={T}"
        pairs += [(tuned, f"IF T={T}"), (tuned, f"signed T={T}"), (tuned, "quantized ANN"),
                  (f"IF T={T}", "quantized ANN"), (f"signed T={T}", "quantized ANN")]
    differences = []
    for a, b in pairs:
        diff = boot[a] - boot[b]
        differences.append({"a": a, "b": b, "difference": full[a] - full[b], "std": float(diff.std()),
                            "fraction_at_or_below_0": float((diff <= 0).mean())})
    result = {"scenes": n, "resamples": args.resamples, "map": full, "differences": differences}

    for name, value in full.items():
        print(f"{name:28s} mAP@0.5 {value:.4f}")
    print(f"paired bootstrap over {n} scenes, {args.resamples} resamples (pt):")
    for d in differences:
        print(f"  {d['a']:26s} - {d['b']:14s} {100 * d['difference']:+6.1f} ± {100 * d['std']:.1f}"
              f"   <= 0 in {100 * d['fraction_at_or_below_0']:.0f} %")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
