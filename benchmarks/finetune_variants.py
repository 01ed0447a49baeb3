"""Variants of Fast-SNN's fine-tuning on the demo's detector, scored on a dev split (issue 20).

Run from the repository root after ``make demo`` (or ``fastspike demo --tasks detection``):

    python benchmarks/finetune_variants.py demo-results                      # T = 8, recipe seed 0
    python benchmarks/finetune_variants.py demo-results -T 4 8 --seeds 0 1 --batches 4 8 --out v.json

It rebuilds the demo's detection task from ``<dir>/demo.json`` (its training, tuning and test
scenes) and its quantized ANN (``detection.pt``), and scores each variant's signed SNN on a dev
split of ``--dev-scenes`` scenes of their own seed (``--dev-seed``, default the demo's seed + 3:
neither training, tuning nor test scenes) and on the demo's test scenes. The dev column is the
one to choose a variant by; the test column is the one to report. Variants:

- ``not tuned`` and ``IF``: the signed and the IF SNN as converted;
- ``readout bias alone``: only the readout-bias stage, unjudged;
- ``layers then bias``: the layer stages, then the readout bias (the order before this round);
- ``demo``: the demo's pipeline (:func:`fastspike.demo.fast_snn_finetune`: the readout bias
  first, re-fitted after each layer before the layer is judged);

the tuned ones for each recipe seed (``--seeds``; the demo's is its ``seed``) and number of
training batches (``--batches``; the demo's is ``finetune_batches``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Dict, List

import torch
from torch.utils.data import DataLoader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fastspike import to_snn  # noqa: E402
from fastspike.checkpoint import build_quantized, load_checkpoint  # noqa: E402
from fastspike.data import SyntheticScenes, collate_scenes  # noqa: E402
from fastspike.demo import DemoConfig, _cached, fast_snn_finetune, make_task  # noqa: E402
from fastspike.finetune import READOUT_BIAS  # noqa: E402


def main(argv: List[str] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", help="the demo's output folder (demo.json, detection.pt)")
    parser.add_argument("-T", type=int, nargs="+", help="time steps (default the demo's largest)")
    parser.add_argument("--seeds", type=int, nargs="+", help="recipe seeds (default the demo's)")
    parser.add_argument("--batches", type=int, nargs="+", help="training batches (default the demo's)")
    parser.add_argument("--dev-scenes", type=int, default=2048)
    parser.add_argument("--dev-seed", type=int, help="default the demo's seed + 3 (its splits use + 0, 1, 2)")
    parser.add_argument("--out", help="also write the result as JSON here")
    args = parser.parse_args(argv)

    with open(os.path.join(args.results, "demo.json")) as f:
        saved = json.load(f)["config"]
    cfg = DemoConfig(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(DemoConfig)}})
    dev_seed = cfg.seed + 3 if args.dev_seed is None else args.dev_seed
    if dev_seed in (cfg.seed, cfg.seed + 1, cfg.seed + 2):
        parser.error(f"--dev-seed must differ from the demo's training, test and tuning seeds "
                     f"{[cfg.seed, cfg.seed + 1, cfg.seed + 2]}, got {dev_seed}")
    task = make_task("detection", cfg)
    qnet = build_quantized(load_checkpoint(os.path.join(args.results, "detection.pt"))).eval()
    dev_scenes = SyntheticScenes(args.dev_scenes, cfg.scene_size, seed=dev_seed)
    splits = {"dev": DataLoader(_cached(dev_scenes), cfg.batch_size, collate_fn=collate_scenes),
              "test": DataLoader(task.test_set, cfg.batch_size, collate_fn=collate_scenes)}
    device = torch.device("cpu")
    rows: List[Dict[str, Any]] = []

    def score(name: str, T: int, snn: torch.nn.Module, **info: Any) -> None:
        row = {"variant": name, "T": T, **info, **{k: task.evaluate(snn, loader) for k, loader in splits.items()}}
        rows.append(row)
        print(f"T={T:<2d} {name:22s} {json.dumps(info):32s} dev {row['dev']:.4f}  test {row['test']:.4f}", flush=True)

    score("quantized ANN", 0, qnet)
    for T in args.T or [max(cfg.time_steps)]:
        score("IF", T, to_snn(qnet, T, "if"))
        score("not tuned", T, to_snn(qnet, T, "signed"))
        for seed in args.seeds or [cfg.seed]:
            for batches in args.batches or [cfg.finetune_batches]:
                run = dataclasses.replace(cfg, seed=seed, finetune_batches=batches)  # the recipe's only
                info = {"seed": seed, "batches": batches}
                snn, _ = fast_snn_finetune(task, run, qnet, "signed", T, device, layers=[READOUT_BIAS], force=True)
                score("readout bias alone", T, snn, **info)
                snn, _ = fast_snn_finetune(task, run, qnet, "signed", T, device, readout_bias=False)
                snn, _ = fast_snn_finetune(task, run, qnet, "signed", T, device, snn=snn, layers=[READOUT_BIAS])
                score("layers then bias", T, snn, **info)
                snn, _ = fast_snn_finetune(task, run, qnet, "signed", T, device)
                score("demo", T, snn, **info)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"dev_scenes": args.dev_scenes, "dev_seed": dev_seed, "rows": rows}, f, indent=1)
    return {"rows": rows}


if __name__ == "__main__":
    main()
