"""The demo, the ``fastspike`` command and checkpoints (issue 4, and the checkpoint part of issue 7)."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

import fastspike
from fastspike.checkpoint import (CheckpointError, load_checkpoint, load_model, make_checkpoint,
                                  save_checkpoint)
from fastspike.cli import main
from fastspike.demo import DemoConfig, run_demo
from fastspike.models import get_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, env=None, timeout=300):
    """Runs ``python -m fastspike ARGS`` in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "fastspike", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """The reduced demo, all three tasks, run once for the module."""
    out = tmp_path_factory.mktemp("demo")
    result = run_demo(str(out), DemoConfig.quick())
    return out, result


def test_demo_runs_end_to_end_and_writes_json_and_png(demo_dir):
    out, result = demo_dir
    with open(out / "demo.json") as f:
        saved = json.load(f)
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    tasks = {r["task"] for r in saved["rows"]}
    assert tasks == {"classification", "detection", "segmentation"}
    cfg = DemoConfig.quick()
    for task in tasks:
        rows = [r for r in saved["rows"] if r["task"] == task]
        # ANN, quantized ANN, every neuron kind at every T, then the fine-tuned ones at every T.
        assert len(rows) == 2 + (len(cfg.neurons) + len(cfg.finetune_neurons)) * len(cfg.time_steps)
        for r in rows:
            assert 0.0 <= r["value"] <= 1.0
            if r["T"] is None:  # the ANNs are timed
                assert r["images_per_s"] > 0
            elif r["model"].endswith("fine-tuned"):  # tuned at its own T; not timed (the same network)
                assert r["tuned_at_T"] == r["T"] and "images_per_s" not in r
            else:  # each neuron kind is timed at T = L only, fused and with the Python loop
                assert ("images_per_s" in r) == (r["T"] == cfg.levels), r
                if r["T"] == cfg.levels:
                    assert r["images_per_s"] > 0 and r["images_per_s_reference"] > 0
    png = (out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    for task in tasks:
        assert load_checkpoint(str(out / f"{task}.pt"))["levels"] == cfg.levels
        for T in cfg.time_steps:
            assert load_checkpoint(str(out / f"{task}-signed-finetuned-T{T}.pt"))["levels"] == cfg.levels


def test_demo_rows_read_off_one_run_equal_separate_conversions(demo_dir):
    """The demo converts each SNN once, at max(T) with a sequence readout, and reads every T off
    that run; its rows equal a separate to_snn at each T (mean readout) from the saved checkpoint.
    Each fine-tuned row equals its T's tuned checkpoint (write_back) converted at that T."""
    from fastspike.data import digits
    from fastspike.train import classification_accuracy

    out, result = demo_dir
    cfg = DemoConfig.quick()
    rows = {(r["model"], r["T"]): r["value"] for r in result["rows"] if r["task"] == "classification"}
    test = digits("test", seed=cfg.seed)
    for T in cfg.time_steps:
        for model, path in (("SNN signed", "classification.pt"),
                            ("SNN signed fine-tuned", f"classification-signed-finetuned-T{T}.pt")):
            snn = load_model(str(out / path), time_steps=T, neuron="signed")
            assert classification_accuracy(snn, test, cfg.batch_size) == rows[(model, T)], (model, T)
    # A tuned checkpoint converts to other weights than the quantized ANN's iff a layer was kept.
    kept = {r["T"]: r["layers_kept"] for r in result["rows"]
            if r["task"] == "classification" and r["model"] == "SNN signed fine-tuned"}
    base = load_model(str(out / "classification.pt"), time_steps=1, neuron="signed")
    for T in cfg.time_steps:
        tuned = load_model(str(out / f"classification-signed-finetuned-T{T}.pt"), time_steps=1, neuron="signed")
        same = all(torch.equal(a, b) for a, b in zip(base.parameters(), tuned.parameters()))
        assert same != bool(kept[T]), T


def test_demo_classification_learns_and_the_snn_follows_the_quantized_ann(demo_dir):
    _, result = demo_dir
    rows = {(r["model"], r["T"]): r["value"] for r in result["rows"] if r["task"] == "classification"}
    assert rows[("ANN", None)] > 0.5  # 10 classes: chance is 0.1
    L = DemoConfig.quick().levels
    quantized = rows[(f"quantized ANN (L={L})", None)]
    # Signed neurons at T = L stay close to the quantized ANN (a three-epoch model in the quick run).
    assert rows[("SNN signed", L)] >= quantized - 0.15


def test_detection_bootstrap_rebuilds_the_demo_rows(demo_dir, tmp_path):
    """benchmarks/detection_bootstrap.py (README, issue 20): on all test scenes its mAP of every
    model is the demo's row (same checkpoints, same scenes)."""
    out, result = demo_dir
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "detection_bootstrap.py"), str(out),
                        "--resamples", "4", "--out", str(tmp_path / "boot.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    boot = json.loads((tmp_path / "boot.json").read_text())
    rows = {(x["model"], x["T"]): x["value"] for x in result["rows"] if x["task"] == "detection"}
    cfg = DemoConfig.quick()
    assert boot["scenes"] == cfg.scenes_test and boot["resamples"] == 4
    assert boot["map"]["quantized ANN"] == pytest.approx(rows[(f"quantized ANN (L={cfg.levels})", None)], abs=1e-12)
    for T in cfg.time_steps:
        for name, model in (("IF", "SNN if"), ("signed", "SNN signed"), ("signed fine-tuned", "SNN signed fine-tuned")):
            assert boot["map"][f"{name} T={T}"] == pytest.approx(rows[(model, T)], abs=1e-12), (name, T)
    for d in boot["differences"]:
        assert d["difference"] == pytest.approx(boot["map"][d["a"]] - boot["map"][d["b"]], abs=1e-12)
        assert 0.0 <= d["fraction_at_or_below_0"] <= 1.0 and d["std"] >= 0.0


def test_finetune_variants_score_the_demos_own_pipeline(demo_dir, tmp_path):
    """benchmarks/finetune_variants.py (README, issue 20): on the test scenes its untuned, IF and
    demo-pipeline SNNs are the demo's rows (the same conversion and the same fine-tuning code)."""
    out, result = demo_dir
    cfg = DemoConfig.quick()
    T = max(cfg.time_steps)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "finetune_variants.py"), str(out),
                        "-T", str(T), "--dev-scenes", "4", "--out", str(tmp_path / "v.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    found = {row["variant"]: row for row in json.loads((tmp_path / "v.json").read_text())["rows"]}
    rows = {(x["model"], x["T"]): x["value"] for x in result["rows"] if x["task"] == "detection"}
    assert found["quantized ANN"]["test"] == pytest.approx(rows[(f"quantized ANN (L={cfg.levels})", None)], abs=1e-12)
    for variant, model in (("IF", "SNN if"), ("not tuned", "SNN signed"), ("demo", "SNN signed fine-tuned")):
        assert found[variant]["test"] == pytest.approx(rows[(model, T)], abs=1e-12), variant
    assert set(found) == {"quantized ANN", "IF", "not tuned", "readout bias alone", "layers then bias", "demo"}
    assert all(0.0 <= row["dev"] <= 1.0 for row in found.values())


def test_convert_and_eval_from_the_command_line(demo_dir, tmp_path):
    out, _ = demo_dir
    converted = tmp_path / "snn.pt"
    r = _cli("convert", str(out / "classification.pt"), "--out", str(converted), "-T", "4", "--neuron", "signed")
    assert r.returncode == 0, r.stderr
    assert "spiking layers" in r.stdout
    snn = load_model(str(converted))
    assert snn.time_steps == 4
    r = _cli("eval", str(out / "classification.pt"), "--T", "1", "4", "--out", str(tmp_path / "eval.json"))
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert [row["T"] for row in rows] == [None, 1, 4]
    # The CLI's quantized-ANN accuracy is the demo's (same checkpoint, same test split).
    demo_rows = json.loads((out / "demo.json").read_text())["rows"]
    demo_q = [x["value"] for x in demo_rows if x["task"] == "classification" and x["model"].startswith("quantized")]
    assert rows[0]["accuracy"] == pytest.approx(demo_q[0])


def test_torchrun_evaluation_equals_single_process(demo_dir, tmp_path):
    out, _ = demo_dir
    single = tmp_path / "single.json"
    r = _cli("eval", str(out / "classification.pt"), "--T", "2", "--batch-size", "50", "--out", str(single))
    assert r.returncode == 0, r.stderr
    parallel = tmp_path / "parallel.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "fastspike", "eval", str(out / "classification.pt"), "--T", "2",
                        "--batch-size", "50", "--out", str(parallel)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = json.loads(single.read_text()), json.loads(parallel.read_text())
    assert b["world_size"] == 2
    assert a["rows"] == b["rows"]


@pytest.mark.parametrize("args, expected", [
    (["eval", "no/such/file.pt"], "does not exist"),
    (["convert", "no/such/file.pt", "--out", "x.pt", "-T", "4"], "does not exist"),
    (["convert", "CKPT", "--out", "OUT", "-T", "4", "--model", "resnet1000"], "unknown model 'resnet1000'"),
    (["eval", "CKPT", "--T", "0"], "expected a positive integer, got 0"),
    (["convert", "CKPT", "--out", "OUT", "-T", "-3"], "expected a positive integer"),
])
def test_cli_mistakes_give_one_line_and_nonzero_exit(args, expected, demo_dir, tmp_path):
    out, _ = demo_dir
    args = [str(out / "classification.pt") if a == "CKPT" else str(tmp_path / "o.pt") if a == "OUT" else a
            for a in args]
    r = _cli(*args)
    assert r.returncode == 2
    assert expected in r.stderr
    assert "Traceback" not in r.stderr
    assert len([line for line in r.stderr.splitlines() if "error" in line]) == 1


def test_cli_help_everywhere_and_info():
    for command in ([], ["demo"], ["convert"], ["eval"], ["bench"], ["info"], ["train-snn"]):
        with pytest.raises(SystemExit) as info:
            main([*command, "--help"])
        assert info.value.code == 0
    r = _cli("info")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["backend"]["backend"] == fastspike.backend_info()["backend"]
    assert info["torch"] == torch.__version__


# ---------------------------------------------------------------------------
# Checkpoints


def _digits_checkpoint():
    net = get_model("digits_cnn", 10)
    qnet = fastspike.quantize(net, levels=4)
    return make_checkpoint("digits_cnn", 10, 4, "qcfs", qnet)


def test_checkpoint_round_trip(tmp_path):
    ckpt = _digits_checkpoint()
    path = str(tmp_path / "c.pt")
    save_checkpoint(ckpt, path)
    model = load_model(path)
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(model.state_dict()[k], v)
    assert os.listdir(tmp_path) == ["c.pt"]  # no temporary left behind


def test_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    save_checkpoint(_digits_checkpoint(), path)
    before = open(path, "rb").read()

    def dies_halfway(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_digits_checkpoint(), path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["c.pt"]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_truncated_and_mismatched_checkpoints_are_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "fastspike", "payload": _Exploit()}, str(evil))
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(str(evil))

    good = tmp_path / "good.pt"
    save_checkpoint(_digits_checkpoint(), str(good))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(str(truncated))

    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, str(plain))
    with pytest.raises(CheckpointError, match="not a fastspike checkpoint"):
        load_checkpoint(str(plain))

    wrong = _digits_checkpoint()
    wrong["model"] = "cifar_resnet20"
    mismatched = tmp_path / "mismatched.pt"
    save_checkpoint(wrong, str(mismatched))
    with pytest.raises(CheckpointError, match="does not match model 'cifar_resnet20'"):
        load_model(str(mismatched))

    not_torch = tmp_path / "text.pt"
    not_torch.write_text("hello")
    with pytest.raises((CheckpointError, pickle.UnpicklingError)):
        load_checkpoint(str(not_torch))


# ---------------------------------------------------------------------------
# eval on PASCAL VOC folders; error types instead of message matching


@torch.no_grad()
def _direct_metric(task, model, loader, size):
    """The metric computed here, without the CLI: the same models, batches and metrics."""
    from fastspike.metrics import SegmentationMeter, mean_average_precision
    from fastspike.models import DEFAULT_ANCHORS, decode_yolo

    preds, targets, meter = [], [], SegmentationMeter(4)
    for x, batch_targets in loader:
        y = model(x)
        if task == "detection":
            preds += decode_yolo(y, DEFAULT_ANCHORS, 3, size)
            targets += batch_targets
        else:
            meter.update(y.argmax(1), torch.stack([t["mask"] for t in batch_targets]))
    return mean_average_precision(preds, targets, 3)["map"] if task == "detection" else meter.compute()["miou"]


def test_eval_reads_a_voc_folder_and_matches_a_direct_computation(demo_dir, tmp_path):
    from torch.utils.data import DataLoader

    from fastspike.checkpoint import build_quantized
    from fastspike.data import VOCBoxes, VOCMasks, collate_scenes, voc_detection, voc_segmentation
    from test_data_metrics import SCENE_CLASSES, write_tiny_voc

    out, _ = demo_dir
    write_tiny_voc(tmp_path / "voc", num_images=6, image_size=40)
    folder = tmp_path / "voc" / "VOCdevkit" / "VOC2012"  # the folder with JPEGImages, as a user would give it
    size = DemoConfig.quick().scene_size  # the demo's models saw 32 px scenes: VOC images are resized to that
    cases = [("detection", ["--classes", *SCENE_CLASSES], "mAP@0.5",
              voc_detection(folder, transforms=VOCBoxes(size, SCENE_CLASSES))),
             ("segmentation", [], "miou", voc_segmentation(folder, transforms=VOCMasks(size, 4)))]
    for task, extra, metric, dataset in cases:
        result = tmp_path / f"{task}.json"
        assert main(["eval", str(out / f"{task}.pt"), "--data", str(folder), "--image-size", str(size),
                     "--T", "2", "--batch-size", "4", "--out", str(result), *extra]) == 0
        rows = json.loads(result.read_text())["rows"]
        assert [r["T"] for r in rows] == [None, 2]
        qnet = build_quantized(load_checkpoint(str(out / f"{task}.pt")))
        loader = DataLoader(dataset, 4, collate_fn=collate_scenes)
        for row, model in zip(rows, (qnet, fastspike.to_snn(qnet, 2, "signed"))):
            expected = _direct_metric(task, model, loader, size)
            print(f"{task} {row['model']} T={row['T']}: eval {row[metric]:.4f}, direct {expected:.4f}")
            assert row[metric] == pytest.approx(expected, abs=1e-12)
        assert 0.0 <= rows[0][metric] <= 1.0


def test_eval_on_voc_mistakes_give_one_line(demo_dir, tmp_path, capsys):
    from test_data_metrics import SCENE_CLASSES, write_tiny_voc

    out, _ = demo_dir
    samples = write_tiny_voc(tmp_path / "voc", num_images=2, image_size=32)
    voc = str(tmp_path / "voc")
    present = SCENE_CLASSES[int(samples[0][1]["labels"][0])]
    others = [name if name != present else "oval" for name in SCENE_CLASSES]
    cases = [
        # 3 detector classes, 20 VOC names by default.
        (["eval", str(out / "detection.pt"), "--data", voc, "--T", "1"], "the model detects 3 classes but the default"),
        # A name in the annotations that --classes lacks: a DatasetError while reading.
        (["eval", str(out / "detection.pt"), "--data", voc, "--T", "1", "--classes", *others],
         f"object class {present!r} is not among the classes"),
        (["eval", str(out / "segmentation.pt"), "--data", str(tmp_path / "no-voc")], "or a PASCAL VOC folder"),
        (["eval", str(out / "segmentation.pt"), "--data", voc, "--image-set", "test"], "--image-set 'test'"),
        (["eval", str(out / "segmentation.pt"), "--data", str(tmp_path)], "expected a PASCAL VOC copy"),
        (["eval", str(out / "classification.pt"), "--neuron", "group"], "--neuron group needs --group-size >= 2"),
        (["convert", str(out / "classification.pt"), "--out", str(tmp_path / "c.pt"), "-T", "2", "--group-size", "2"],
         "--group-size applies to --neuron group or signed-group, not signed"),
    ]
    for args, expected in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert expected in err, (args, err)
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c.pt").exists()  # refused before anything was written


def test_checkpoint_recipe_errors_are_checkpoint_errors(tmp_path, capsys):
    cases = [(dict(model="resnet1000"), "names unknown model 'resnet1000'"),
             (dict(model_kwargs={"width": -1}), "cannot be built with"),
             (dict(model_kwargs={"no_such_argument": 1}), "cannot be built with"),
             (dict(preset="nope"), "cannot quantize 'digits_cnn'"),
             (dict(levels=0), "cannot quantize 'digits_cnn'"),
             (dict(state_dict={"features.0.weight": torch.zeros(1)}), "does not match model 'digits_cnn'"),
             (dict(snn={"time_steps": 2, "neuron": "group"}), "conversion settings"),
             (dict(model_kwargs=[1, 2]), "model_kwargs must be a dict")]
    for i, (change, expected) in enumerate(cases):
        path = str(tmp_path / f"bad{i}.pt")
        ckpt = _digits_checkpoint()
        ckpt.update(change)
        save_checkpoint(ckpt, path)
        with pytest.raises(CheckpointError, match=expected) as info:
            load_model(path)
        assert path in str(info.value)
        if "snn" not in change:  # (convert replaces the stored conversion settings by its own)
            # The command line shows the same message as one line.
            assert main(["convert", path, "--out", str(tmp_path / "o.pt"), "-T", "2"]) == 2
            err = capsys.readouterr().err
            assert expected in err and len(err.strip().splitlines()) == 1
            # ... and writes nothing: the rebuild is checked before the save.
            assert not (tmp_path / "o.pt").exists()
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(str(tmp_path))


# ---------------------------------------------------------------------------
# Command-line mistakes from the adversarial pass (issue 19 items 4, 5): one line, exit 2


def _bad_checkpoint(tmp_path, name, change):
    ckpt = _digits_checkpoint()
    change(ckpt)
    path = str(tmp_path / name)
    save_checkpoint(ckpt, path)
    return path


def _set_threshold(value):
    def change(ckpt):
        key = next(k for k in ckpt["state_dict"] if k.endswith("raw_threshold"))
        ckpt["state_dict"][key] = torch.full_like(ckpt["state_dict"][key], value)
    return change


BAD_COMMANDS = [
    ("eval --T 1e9", ["eval", "CKPT", "--T", "1000000000"], "out of memory"),
    ("--out a directory", ["eval", "CKPT", "--T", "1", "--out", "DIR"], "--out 'DIR' is a directory"),
    ("--out under a file", ["convert", "CKPT", "-T", "2", "--out", "FILE/o.pt"], "is a file, not a folder"),
    ("--out read-only", ["eval", "CKPT", "--T", "1", "--out", "READONLY/o.json"], "cannot write in"),
    ("--device bogus", ["eval", "CKPT", "--T", "1", "--device", "bogus"], "--device 'bogus': expected cpu, cuda"),
    ("--device cuda", ["eval", "CKPT", "--T", "1", "--device", "cuda"], "--device 'cuda': no CUDA GPU"),
    ("--workers -1", ["eval", "CKPT", "--T", "1", "--workers", "-1"], "argument --workers: expected an integer >= 0"),
    ("NaN thresholds", ["eval", "NAN", "--T", "1"], "has thresholds that are not finite and > 0"),
    ("negative thresholds", ["eval", "NEGATIVE", "--T", "1"], "has thresholds that are not finite and > 0"),
    ("num_classes=10**12", ["eval", "CLASSES", "--T", "1"], "num_classes must be an integer in [1, 1000000]"),
    ("non-string key", ["eval", "INTKEY", "--T", "1"], "state_dict keys must be parameter names (str), got int"),
    ("group size 2000000", ["convert", "CKPT", "-T", "2", "--out", "OUT", "--neuron", "signed-group",
                            "--group-size", "2000000"], "--group-size 2000000: expected at most 2^20"),
    ("train --workers -1", ["train", "digits_cnn", "--out", "OUT", "--workers", "-1"], "argument --workers"),
    ("train --device bogus", ["train", "digits_cnn", "--out", "OUT", "--device", "cuda:x"], "--device 'cuda:x'"),
]


@pytest.mark.parametrize("what,args,expected", BAD_COMMANDS, ids=[c[0] for c in BAD_COMMANDS])
def test_command_line_mistakes_are_one_line_and_exit_2(what, args, expected, tmp_path, capsys):
    if what == "--device cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    unwritable = str(readonly)
    try:
        probe = readonly / "probe"
        probe.write_text("")  # root writes anyway: then /proc, where nobody creates files
        probe.unlink()
        unwritable = "/proc"
    except OSError:
        pass
    (tmp_path / "file").write_text("")
    paths = {
        "CKPT": _bad_checkpoint(tmp_path, "c.pt", lambda c: None),
        "NAN": _bad_checkpoint(tmp_path, "nan.pt", _set_threshold(float("nan"))),
        "NEGATIVE": _bad_checkpoint(tmp_path, "neg.pt", _set_threshold(-1.0)),
        "CLASSES": _bad_checkpoint(tmp_path, "classes.pt", lambda c: c.update(num_classes=10**12)),
        "INTKEY": _bad_checkpoint(tmp_path, "intkey.pt", lambda c: c["state_dict"].update({7: torch.zeros(1)})),
        "DIR": str(tmp_path), "OUT": str(tmp_path / "o.pt"),
    }
    args = [paths.get(a, a).replace("FILE", str(tmp_path / "file")).replace("READONLY", unwritable)
            for a in args]
    expected = expected.replace("DIR", str(tmp_path))
    try:
        try:
            status = main(args)
        except SystemExit as done:  # argparse's own mistakes (one line too)
            status = done.code
        assert status == 2
    finally:
        readonly.chmod(0o700)
    err = capsys.readouterr().err
    assert expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not os.path.exists(tmp_path / "o.pt")


def test_disk_full_is_said_and_the_old_checkpoint_kept(tmp_path, capsys, monkeypatch):
    import errno

    source = _bad_checkpoint(tmp_path, "c.pt", lambda c: None)
    out = tmp_path / "o.pt"
    out.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fastspike.checkpoint.os, "fsync", full)
    assert main(["convert", source, "-T", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device (the disk is full)" in err and str(out) in err, err
    assert len(err.strip().splitlines()) == 1
    assert out.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["c.pt", "o.pt"]


def test_a_killed_save_leaves_a_temporary_that_the_next_save_removes(tmp_path):
    """Item 10: a save killed mid-write (SIGKILL: no cleanup runs) leaves its
    temporary; the next save of that path removes it, not another live writer's."""
    path = str(tmp_path / "c.pt")
    save_checkpoint(_digits_checkpoint(), path)
    code = ("import os, signal, torch, fastspike.checkpoint as c\n"
            "real = os.fsync\n"
            "def die(fd):\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "c.os.fsync = die\n"
            f"c.save_checkpoint({{'format': 'fastspike', 'x': torch.zeros(1000)}}, {path!r})\n")
    killed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    orphans = [n for n in os.listdir(tmp_path) if n != "c.pt"]
    assert len(orphans) == 1 and orphans[0].startswith(".c.pt.")
    live = tmp_path / f".c.pt.{os.getpid()}.abcdefgh.fastspike-tmp"  # a save in progress in a live process
    live.write_bytes(b"partial")
    other = tmp_path / ".other.pt.1.abcdefgh.fastspike-tmp"  # another file's temporary
    other.write_bytes(b"partial")
    save_checkpoint(_digits_checkpoint(), path)
    assert sorted(os.listdir(tmp_path)) == sorted(["c.pt", live.name, other.name])
    assert load_checkpoint(path)["model"] == "digits_cnn"


# ---------------------------------------------------------------------------
# train-snn: surrogate-gradient (BPTT) training of a checkpoint's SNN (issue 5)


class _Interrupt(Exception):
    pass


def _printed_accuracies(text):
    """(before, after) from the line 'accuracy on ...: before B, after A'."""
    line = [x for x in text.splitlines() if x.startswith("accuracy on digits test split:")][0]
    before, after = line.split(": ", 1)[1].split(", ")
    return float(before.split()[1]), float(after.split()[1])


def test_train_snn_trains_end_to_end_writes_an_eval_checkpoint_and_resumes(demo_dir, tmp_path, capsys,
                                                                           monkeypatch):
    from fastspike.checkpoint import build_quantized
    from fastspike.data import digits
    from fastspike.train import classification_accuracy

    source = str(demo_dir[0] / "classification.pt")
    full = str(tmp_path / "full.pt")
    args = ["train-snn", source, "-T", "2", "--neuron", "signed", "--epochs", "2", "--batch-size", "256",
            "--no-progress", "--out"]
    assert main(args + [full]) == 0
    printed = capsys.readouterr().out
    before, after = _printed_accuracies(printed)
    assert "trained SNN digits_cnn (T=2, signed, sigmoid surrogate)" in printed
    assert not os.path.exists(full + ".state")  # the run's state goes once --out is written
    test = digits("test")
    untrained = fastspike.to_snn(build_quantized(load_checkpoint(source)), 2, "signed")
    trained = load_model(full)  # the checkpoint format of finetune: quantized ANN + conversion settings
    assert load_checkpoint(full)["snn"] == {"time_steps": 2, "neuron": "signed", "group_size": None}
    assert trained.time_steps == 2
    # The printed accuracies are the untrained and the reloaded SNN's (4 decimals; one image is 0.0022).
    before_direct, after_direct = classification_accuracy(untrained, test), classification_accuracy(trained, test)
    print(f"\ntrain-snn digits T=2: printed {before:.4f} -> {after:.4f}, "
          f"direct {before_direct:.4f} -> {after_direct:.4f}")
    assert before == pytest.approx(before_direct, abs=5e-5)
    assert after == pytest.approx(after_direct, abs=5e-5)
    assert after >= before - 0.02  # lr 1e-4 fine-tuning of a 0.96 model (measured 0.9556 -> 0.9578)
    old, new = untrained.state_dict(), trained.state_dict()
    for k in old:
        if k.endswith("threshold"):
            assert torch.equal(old[k], new[k]), k  # thresholds are not trained
        else:
            assert (old[k] - new[k]).abs().max() > 0, k  # every weight and folded bias moved

    # Interrupted after its first epoch, then resumed: the same checkpoint bit for bit.
    from fastspike import finetune

    train_model = finetune.train_model

    def stops_after_one_epoch(*a, **kw):
        def stop(epoch, record):
            if epoch == 1:
                raise _Interrupt
        return train_model(*a, on_epoch_end=stop, **kw)

    resumed = str(tmp_path / "resumed.pt")
    monkeypatch.setattr(finetune, "train_model", stops_after_one_epoch)
    with pytest.raises(_Interrupt):
        main(args + [resumed])
    monkeypatch.undo()
    assert not os.path.exists(resumed)
    assert load_checkpoint(resumed + ".state")["training"]["epoch"] == 1
    capsys.readouterr()
    # Other settings are refused, naming the argument, and leave the saved state alone.
    other = load_checkpoint(source)
    other["state_dict"]["fc.bias"] += 1.0
    save_checkpoint(other, str(tmp_path / "other.pt"))
    for start, changed, expected in ((source, ["-T", "4"], "--time-steps 2 -> 4"),
                                     (source, ["--surrogate", "atan"], "--surrogate 'sigmoid' -> 'atan'"),
                                     (source, ["--lr", "1e-3"], "--lr 0.0001 -> 0.001"),
                                     (str(tmp_path / "other.pt"), [], "CHECKPOINT (another file")):
        assert main(["train-snn", start] + args[2:] + [resumed, "--resume"] + changed) == 2
        err = capsys.readouterr().err
        assert "resume needs the run's settings" in err and expected in err, err
        assert len(err.strip().splitlines()) == 1
    assert main(args + [resumed, "--resume"]) == 0
    assert _printed_accuracies(capsys.readouterr().out) == (before, after)
    assert not os.path.exists(resumed + ".state")
    a, b = load_checkpoint(full)["state_dict"], load_checkpoint(resumed)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("args, expected", [
    (["train-snn", "no/such/file.pt", "-T", "2", "--out", "OUT"], "does not exist"),
    (["train-snn", "CKPT", "-T", "2", "--out", "OUT", "--neuron", "if", "--group-size", "2"],
     "--group-size applies to --neuron group or signed-group, not if"),
    (["train-snn", "CKPT", "-T", "2", "--out", "OUT", "--neuron", "signed-group"], "needs --group-size >= 2"),
    (["train-snn", "DETECTOR", "-T", "2", "--out", "OUT"], "holds the detection model 'tiny_yolov2': fastspike "
                                                           "train-snn trains classifiers"),
    (["train-snn", "CKPT", "-T", "2", "--out", "OUT", "--resume"], "--resume: no interrupted run to continue"),
    (["train-snn", "CKPT", "-T", "2", "--out", "OUT", "--alpha", "0"], "--alpha: expected a finite"),
    (["train-snn", "CKPT", "-T", "2", "--out", "OUT", "--lr", "-1"], "--lr must be finite and > 0"),
    (["train-snn", "CKPT", "-T", "2", "--out", "OUT", "--data", "scenes"], "must be 'digits' or an ImageFolder"),
    (["train-snn", "CKPT", "-T", "2", "--out", "OUT", "--data", "FOLDER"], "has 2 classes, the checkpoint's "
                                                                           "classifier 10"),
])
def test_train_snn_mistakes_give_one_line_and_exit_2(args, expected, demo_dir, tmp_path, capsys):
    from PIL import Image

    for name in ("a", "b"):  # a two-class ImageFolder
        os.makedirs(tmp_path / "folder" / name)
        Image.new("RGB", (8, 8)).save(tmp_path / "folder" / name / "0.png")
    paths = {"OUT": tmp_path / "o.pt", "CKPT": demo_dir[0] / "classification.pt",
             "DETECTOR": demo_dir[0] / "detection.pt", "FOLDER": tmp_path / "folder"}
    assert main([str(paths.get(a, a)) for a in args]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not os.path.exists(tmp_path / "o.pt") and not os.path.exists(tmp_path / "o.pt.state")


@pytest.mark.parametrize("task, metric", [("detection", "held-out mAP@0.5"), ("segmentation", "held-out mIoU")])
def test_finetune_judges_detectors_and_segmenters_by_their_task_metric(demo_dir, tmp_path, capsys, task, metric):
    """Fast-SNN's pipeline from the command line (issue 20): a layer's update is kept only if
    the task's metric on held-out scenes did not drop."""
    from fastspike.cli import main

    out, _ = demo_dir
    tuned = tmp_path / "tuned.pt"
    size = DemoConfig.quick().scene_size
    assert main(["finetune", str(out / f"{task}.pt"), "-T", "2", "--neuron", "signed", "--out", str(tuned),
                 "--data", "scenes", "--image-size", str(size), "--num-images", "8", "--tune-images", "4",
                 "--batch-size", "4", "--max-batches", "1", "--epochs", "1", "--no-progress", "--readout-bias"]) == 0
    printed = capsys.readouterr().out
    assert f"{metric} before" in printed and tuned.is_file()
    rows = [line.split() for line in printed.splitlines() if line.rstrip().endswith((" yes", " no"))]
    assert rows and rows[0][0] == "output-bias"  # --readout-bias: the closed-form first stage
    for row in rows:
        before, after, kept = float(row[-3]), float(row[-2]), row[-1]
        assert (kept == "yes") == (after >= before)  # the metric decides
