"""Issue 16: the one-command GPU check cannot rot between GPU runs.

benchmarks/gpu_check.sh --dry-run runs its whole control flow here (no GPU): every GPU step must
get as far as finding no GPU (NOGPU), not fail on a bad option or a moved file; and the pieces it
is made of (the CUDA == CPU == reference script, the report, tools/sanitize.sh gpu, the `cuda`
marker) are checked on their own. The dry run takes about 40 s on two cores (one run, shared by
the tests that read its output).
"""

import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET

import pytest
import torch

import fastspike

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
STEPS = ["a_build", "b_tests", "b_equivalence", "c_memcheck", "c_racecheck", "d_neurons_bandwidth",
         "d_neurons_compile", "e_models", "f_cupy", "c_initcheck", "c_synccheck"]


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report_module = load("gpu_check_report")
needs_extension = pytest.mark.skipif(fastspike.backend_info()["backend"] != "extension",
                                     reason="the compiled operators are not loaded")


def run(args, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, **kwargs)


# ----------------------------------------------------------------------------- the dry run


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if not fastspike.backend_info()["cuda_kernels"]:
        pytest.skip("the dry run reuses the prebuilt extension, which has no CUDA kernels here")
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, PYTHON=sys.executable, FASTSPIKE_COMMIT="rehearsal-commit-line")
    result = run(["bash", SCRIPT, "--dry-run", "--out", str(out)], env=env, timeout=300)
    return result, out


def test_dry_run_passes_with_every_gpu_step_ending_nogpu(dry_run):
    result, out = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["gpu_check.json", "logs.tar.gz", "summary.txt"]  # at most 6
    payload = json.loads((out / "gpu_check.json").read_text())
    statuses = {s["name"]: s["status"] for s in payload["steps"]}
    assert list(statuses) == STEPS  # priority order, none left out
    assert statuses.pop("a_build") == "PASS"  # the prebuilt extension reused, nothing compiled
    assert set(statuses.values()) == {"NOGPU"}, statuses
    assert payload["passed"] and payload["dry_run"] and payload["device"] is None
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("fastspike gpu_check: PASS (dry run")
    assert "commit: rehearsal-commit-line" in summary
    assert summary == result.stdout[result.stdout.index("fastspike gpu_check:"):].split("gpu_check.sh: results")[0]


def test_dry_run_selects_every_cuda_case_and_only_those(dry_run):
    _, out = dry_run
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
        junit = ET.parse(io.BytesIO(tar.extractfile("./tests.xml").read())).getroot()
    assert {f"./logs/{s}.log" for s in STEPS[1:]} <= set(names)
    cases = list(junit.iter("testcase"))
    assert len(cases) > 200
    for case in cases:  # each a CUDA case, skipped here for want of a GPU
        reason = case.find("skipped").get("message")
        assert "CUDA device" in reason or "needs a GPU" in reason, (case.get("name"), reason)
    # and no test left unmarked: nothing outside -m cuda takes a CUDA device
    listed = run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                  "-m", "not cuda", "tests"], timeout=300)
    assert listed.returncode == 0, listed.stdout[-2000:]
    unmarked = [line for line in listed.stdout.splitlines() if re.search(r"[\[-]cuda[\]-]", line)]  # a "cuda" param
    assert not unmarked, unmarked[:10]


# ----------------------------------------------------------------------------- arguments


def test_bad_arguments_are_refused(tmp_path):
    assert run(["bash", "-n", SCRIPT]).returncode == 0
    for args, message in ((["--bogus"], "unknown argument '--bogus'"), ([], "--out DIR is required"),
                          (["--out", str(tmp_path), "--budget", "soon"], "--budget needs a number of seconds"),
                          (["--out"], "--out needs a folder")):
        result = run(["bash", SCRIPT] + args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    assert "--budget SECONDS" in run(["bash", SCRIPT, "--help"]).stdout
    assert os.listdir(tmp_path) == []


def test_commit_line_without_git(tmp_path):
    function = run(["sed", "-n", "/^commit_line() {/,/^}/p", SCRIPT]).stdout
    assert function.strip().endswith("}")
    probe = f"{function}\ncommit_line"
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tmp_path.parent))
    env.pop("FASTSPIKE_COMMIT", None)
    bare = subprocess.run(["bash", "-c", probe], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert bare.stdout.strip() == "unknown"
    (tmp_path / "COMMIT").write_text("0123abc from a file\nsecond line\n")
    from_file = subprocess.run(["bash", "-c", probe], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert from_file.stdout.strip() == "0123abc from a file"
    env["FASTSPIKE_COMMIT"] = "feed42"
    from_env = subprocess.run(["bash", "-c", probe], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert from_env.stdout.strip() == "feed42"


def test_sanitize_gpu_tells_no_gpu_and_bad_tools_apart():
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    no_gpu = run(["bash", "tools/sanitize.sh", "gpu", "memcheck"], env=env)
    assert no_gpu.returncode == 3 and "no GPU" in no_gpu.stderr
    bad = run(["bash", "tools/sanitize.sh", "gpu", "memcheck", "leakcheck"], env=env)
    assert bad.returncode == 2 and "unknown compute-sanitizer tool 'leakcheck'" in bad.stderr


# ----------------------------------------------------------------------------- CUDA == CPU == reference


@needs_extension
def test_equivalence_script_on_the_cpu(tmp_path):
    equivalence = load("check_equivalence")
    path = tmp_path / "eq.json"
    assert equivalence.main(["--device", "cpu", "--quick", "--out", str(path)]) == 0
    result = json.loads(path.read_text())
    kinds, dtypes, layouts = len(equivalence.KINDS), len(equivalence.DTYPES), len(equivalence.LAYOUTS)
    assert result["passed"] and result["cases"] == kinds * dtypes * layouts
    assert result["forward_comparisons"] == {"cpu": result["cases"] * len(equivalence.FORMS)}
    assert result["gradient_failures"] == 0 and result["gradient_cases"] == kinds * 2 * 3 * 2
    if not torch.cuda.is_available():
        assert equivalence.main(["--device", "cuda"]) == equivalence.NO_GPU


@needs_extension
def test_equivalence_script_reports_a_one_ulp_difference(tmp_path, monkeypatch):
    equivalence = load("check_equivalence")
    monkeypatch.setattr(equivalence, "KINDS", {"signed_group3": (3, True)})
    monkeypatch.setattr(equivalence, "DTYPES", {"float32": torch.float32})
    monkeypatch.setattr(equivalence, "LAYOUTS", ("channel",))
    exact = fastspike.neuron

    def one_ulp_off(x, threshold, **kwargs):  # what a kernel computing u = θ·(1/3) would give
        result = exact(x, threshold, **kwargs)
        if kwargs.get("compact") or kwargs.get("grad", "surrogate") != "none" and x.requires_grad:
            return result
        return fastspike.NeuronResult(torch.nextafter(result.spikes, torch.full_like(result.spikes, 9.0)),
                                      result.v, result.count)

    monkeypatch.setattr(fastspike, "neuron", one_ulp_off)
    path = tmp_path / "eq.json"
    assert equivalence.main(["--device", "cpu", "--quick", "--out", str(path)]) == 1
    result = json.loads(path.read_text())
    assert not result["passed"] and result["forward_mismatches"] == 4  # plain, residual, out=, chunked
    assert {m["form"] for m in result["mismatches"]} == {"plain", "residual", "out", "chunked"}
    assert all(m["problem"].startswith("spikes: ") for m in result["mismatches"])


# ----------------------------------------------------------------------------- the report


def write_steps(work, rows):
    (work / "logs").mkdir(parents=True, exist_ok=True)
    with open(work / "steps.tsv", "w") as f:
        for row in rows:
            f.write("\t".join(str(v) for v in row) + "\n")


def test_report_reads_outcomes_and_headline_figures(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    results = os.path.join(ROOT, "benchmarks", "results")
    write_steps(work, [
        ("a_build", "ran", 80, 300, 0, "", "build", ""),
        ("b_tests", "ran", 40, 150, 1, "", "pytest", "tests.xml"),
        ("b_equivalence", "ran", 120, 120, 124, "", "cmd", "equivalence.json"),
        ("c_memcheck", "ran", 60, 120, 86, "", "sanitizer", ""),
        ("c_racecheck", "ran", 50, 90, 0, "", "sanitizer", ""),
        ("d_neurons_bandwidth", "ran", 60, 100, 0, "", "cmd", "neurons_bandwidth.json"),
        ("d_neurons_compile", "ran", 90, 150, 0, "", "cmd", "neurons_compile.json"),
        ("e_models", "ran", 60, 150, 0, "", "cmd", "models.json"),
        ("f_cupy", "skipped", 0, 60, "", "budget: 12 s left, needs 20 s", "pytest", "cupy.xml"),
    ])
    (work / "tests.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_forward" name="test_a[cuda]"/>'
        '<testcase classname="tests.test_forward" name="test_b[cuda]"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_fusion" name="test_c[cuda]"><skipped message="needs more memory"/></testcase>'
        '</testsuite></testsuites>')
    (work / "info.json").write_text(json.dumps({"cuda_available": True, "device": "NVIDIA H200", "capability": "9.0",
                                                "commit": "abc", "budget_s": 540}))
    shutil.copy(os.path.join(results, "neurons-cpu-headline.json"), work / "neurons_bandwidth.json")
    shutil.copy(os.path.join(results, "neurons-cpu-fwd-bwd.json"), work / "neurons_compile.json")
    shutil.copy(os.path.join(results, "models-cpu-resnet18-T4.json"), work / "models.json")
    assert report_module.report(str(work), str(out), dry_run=False) == 1
    payload = json.loads((out / "gpu_check.json").read_text())
    statuses = {s["name"]: (s["status"], s["detail"]) for s in payload["steps"]}
    assert statuses["a_build"][0] == "PASS"
    assert statuses["b_tests"] == ("FAIL", "1 passed, 1 failed, 0 errors, 1 skipped")
    assert statuses["b_equivalence"][0] == "TIMEOUT"
    assert statuses["c_memcheck"] == ("FAIL", "compute-sanitizer reported errors")
    assert statuses["c_racecheck"] == ("PASS", "clean")
    assert statuses["f_cupy"] == ("SKIPPED", "budget: 12 s left, needs 20 s")
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("fastspike gpu_check: FAIL\ndevice: NVIDIA H200 (sm_90")
    assert "failed: tests.test_forward::test_b[cuda]: x" in summary
    assert "failed: b_tests (FAIL), b_equivalence (TIMEOUT), c_memcheck (FAIL)" in summary
    # the figures of the benchmarks' own JSON formats reach the headline and the targets
    assert "neuron forward: bandwidth of fused_out / copy_out" in summary
    assert "forward_backward T=8 N=2^20  float32     if:" in summary
    assert "  cifar_resnet18 T=4" in summary and "  resnet18 T=4" in summary
    targets = payload["targets"]
    assert {t["target"] for t in targets} >= {"forward+backward >= 5x eager", "SNN <= 1.10 x (T x ANN)",
                                              "stepped >= 3x SNN"}
    assert payload["neurons"]["bandwidth"]["results"] and payload["models"]["results"]


def test_report_of_a_dry_run_fails_when_a_gpu_step_fails_for_another_reason(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    write_steps(work, [("a_build", "ran", 5, 300, 0, "usable prebuilt", "build", ""),
                       ("d_neurons_bandwidth", "ran", 3, 100, 2, "", "cmd", "x.json"),
                       ("e_models", "ran", 3, 150, 2, "", "cmd", "y.json")])
    (work / "logs" / "d_neurons_bandwidth.log").write_text("bench_neurons.py: error: unrecognized arguments: --x\n")
    (work / "logs" / "e_models.log").write_text("bench_models.py: --device cuda but torch sees no GPU\n")
    (work / "info.json").write_text(json.dumps({"cuda_available": False}))
    assert report_module.report(str(work), str(out), dry_run=True) == 1
    statuses = {s["name"]: s["status"] for s in json.loads((out / "gpu_check.json").read_text())["steps"]}
    assert statuses == {"a_build": "PASS", "d_neurons_bandwidth": "FAIL", "e_models": "NOGPU"}
