"""``fastspike eval --T 1 2 4`` converts and runs the SNN once, at max(T), and reads every shorter T
off that run (issue 18): its rows equal those of separate runs at each T, for the three tasks."""

import json

import pytest
import torch

import fastspike
import fastspike.convert
from fastspike.checkpoint import make_checkpoint, save_checkpoint
from fastspike.cli import main
from fastspike.models import get_model

# model, classes, model kwargs, calibration input shape, eval arguments
CASES = {
    "classification": ("digits_cnn", 10, {}, (1, 8, 8), ["--data", "digits", "--batch-size", "120"]),
    "detection": ("tiny_yolov2", 3, {"width": 0.25, "num_downsamples": 3}, (3, 32, 32),
                  ["--data", "scenes", "--num-images", "6", "--image-size", "32", "--batch-size", "3"]),
    "segmentation": ("small_deeplab", 4, {"width": 8}, (3, 32, 32),
                     ["--data", "scenes", "--num-images", "6", "--image-size", "32", "--batch-size", "3"]),
}


def _checkpoint(tmp_path, task):
    name, classes, kwargs, shape, _ = CASES[task]
    torch.manual_seed(0)
    qnet = fastspike.quantize(get_model(name, num_classes=classes, **kwargs), levels=4)
    gen = torch.Generator().manual_seed(1)
    fastspike.calibrate(qnet, [torch.rand((4,) + shape, generator=gen) * 2])
    path = tmp_path / f"{task}.pt"
    save_checkpoint(make_checkpoint(name, classes, 4, "qcfs", qnet, kwargs), str(path))
    return str(path)


@pytest.mark.parametrize("task", sorted(CASES))
def test_eval_reads_every_T_from_one_run_equal_to_separate_runs(task, tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path, task)
    extra = CASES[task][4]
    conversions = []
    to_snn = fastspike.convert.to_snn

    def counting(qnet, time_steps, *args, **kwargs):
        conversions.append((time_steps, kwargs.get("readout", "mean")))
        return to_snn(qnet, time_steps, *args, **kwargs)

    monkeypatch.setattr(fastspike.convert, "to_snn", counting)
    one = tmp_path / "one.json"
    assert main(["eval", ckpt, "--T", "4", "1", "2", "--neuron", "signed", "--out", str(one), *extra]) == 0
    assert conversions == [(4, "sequence")]  # one SNN, one run, at max(T)
    rows = json.loads(one.read_text())["rows"]
    assert [r["T"] for r in rows] == [None, 4, 1, 2]  # in the order asked
    metric = [k for k in rows[0] if k not in ("model", "T")][0]
    for row in rows[1:]:
        separate = tmp_path / f"T{row['T']}.json"
        assert main(["eval", ckpt, "--T", str(row["T"]), "--neuron", "signed", "--out", str(separate), *extra]) == 0
        alone = json.loads(separate.read_text())["rows"]
        assert alone[0] == rows[0]  # the quantized ANN
        assert alone[1] == row, (task, row["T"])
    assert all(0.0 <= r[metric] <= 1.0 for r in rows)
