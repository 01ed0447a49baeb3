"""The benchmark scripts (benchmarks/bench_models.py, bench_neurons.py), the profiling entry
point (benchmarks/profile_kernels.py) and the GPU check script (benchmarks/gpu_check.sh):
the benchmarks' JSON has its fields with sane values (SpikingJelly contenders included),
the profiler writes a valid Chrome trace, and the script is valid bash. The library code the
model benchmark uses (fastspike.analysis: the stepped network, MAC/SOP counts, peak memory)
is tested here too, imported from the package; the scripts themselves are imported from
benchmarks/ (they are what is tested)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastspike
from fastspike.analysis import PeakMemory, SteppedSNN, count_macs, spike_statistics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import bench_models  # noqa: E402
import bench_neurons  # noqa: E402
import profile_kernels  # noqa: E402

needs_extension = pytest.mark.skipif(fastspike.backend_info()["backend"] != "extension",
                                     reason="the compiled operators are not loaded")


class HandNet(nn.Module):
    """conv 1->2 (3x3, pad 1) on 4x4, ReLU, conv 2->3 (3x3, no pad), ReLU, linear 12->5."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(y, 1))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "models.json"
    assert bench_models.main(["--quick", "--device", "cpu", "--rounds", "1", "--min-time", "0",
                              "--out", str(out)]) == 0
    with open(out) as f:
        return json.load(f), out


@needs_extension
def test_bench_models_quick_json_has_the_fields_with_sane_values(quick_run):
    payload, out = quick_run
    assert payload["device_type"] == "cpu" and payload["energy_model"] == {
        "pj_per_sop": 0.9, "pj_per_mac": 4.6, "note": payload["energy_model"]["note"]}
    assert [(r["model"], r["T"]) for r in payload["results"]] == [("tiny_cnn", 1), ("tiny_cnn", 2)]
    present = bench_models.available_options()
    for r in payload["results"]:
        T, c = r["T"], r["contenders"]
        assert set(c) == set(bench_models.CONTENDERS)
        defaults_off = not any(bench_models._default_options().values())
        for name, entry in c.items():
            if name in bench_models.SJ_CONTENDERS and bench_models.spikingjelly_version() is None:
                assert entry["skipped"] == "SpikingJelly is not installed"
                continue
            option = name.split("+", 1)[1] if "+" in name else None
            if option is not None and option not in present:
                assert "has no" in entry["skipped"]
                continue
            if name == "snn_plain" and defaults_off:
                assert "same network as snn" in entry["skipped"] and r["plain_network"] == "snn"
                continue
            assert "skipped" not in entry, (name, entry)
            assert entry["median_s_per_image"] > 0 and len(entry["samples"]) == 1
            # CPU: the tensor high-water mark of one call (at least its output) and the RSS view
            assert entry["peak_bytes"] > 0 and entry["rss_peak_delta_bytes"] >= 0
        # the dense floor and the ratios are what they say
        assert r["floor_T_ann_s_per_image"] == pytest.approx(T * c["ann"]["median_s_per_image"])
        assert r["ratios"]["snn_over_T_ann"] == pytest.approx(
            c["snn"]["median_s_per_image"] / r["floor_T_ann_s_per_image"])
        assert r["ratios"]["stepped_over_snn"] == pytest.approx(
            c["stepped"]["median_s_per_image"] / c["snn"]["median_s_per_image"])
        # the same network however it is run: stepped and reference exactly, the speed-ups to rounding
        assert r["stepped_equals_plain"] is True
        diffs = r["max_abs_diff_vs_plain"]
        assert diffs["stepped"] == 0.0 and diffs["reference"] == 0.0 and diffs["snn"] == 0.0
        for name, diff in diffs.items():
            if name != "snn_vs_ann":
                assert diff <= 1e-5, (name, diff)
        assert not set(diffs) & set(bench_models.SJ_CONTENDERS)  # another network: compared with each other
        if bench_models.spikingjelly_version() is not None:
            # SpikingJelly's own loop and fastspike's import of the same network: bit for bit
            assert r["max_abs_diff_sj"] == 0.0
            assert r["ratios"]["sj_over_sj_fastspike"] == pytest.approx(
                c["sj"]["median_s_per_image"] / c["sj_fastspike"]["median_s_per_image"])
        assert set(r["option_savings"]) == set(present)
        e = r["energy"]
        assert e["ann_macs"] == sum(layer["macs"] for layer in e["layers"].values())
        assert e["energy_ann_uj"] == pytest.approx(e["ann_macs"] * 4.6e-6)
        assert e["energy_snn_uj"] == pytest.approx(e["sops"] * 0.9e-6 + e["snn_macs"] * 4.6e-6)
        assert not e["layers"]["stem.0"]["spiking_input"] and e["layers"]["fc"]["spiking_input"]
        for rate in e["spike_rates"].values():
            assert 0 <= rate["rate"] <= 1  # IF neurons: at most one spike per step
    png = os.path.splitext(str(out))[0] + ".png"
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@needs_extension
@pytest.mark.parametrize("neuron", ["if", "signed"])
def test_stepped_network_equals_the_fused_one(neuron):
    """Stepping the T = 1 network T times with carried state gives the fused T-step output;
    the benchmark's stepped contender is fastspike.analysis.SteppedSNN."""
    assert bench_models.SteppedSNN is SteppedSNN
    qnet, x = bench_models.build_quantized("tiny_cnn", 4, 3, torch.device("cpu"))
    plain = {o: False for o in bench_models.available_options()}
    with torch.no_grad():
        fused = bench_models.convert(qnet, 3, neuron, plain)(x)
        stepped_net = SteppedSNN(qnet, 3, neuron, plain)
        stepped = stepped_net(x)
        again = stepped_net(x)  # the state is reset per call
    assert len(stepped_net.carried) == 3
    assert torch.equal(fused, stepped) and torch.equal(stepped, again)
    assert stepped_net.carried[0].state.v.shape == (3, 8, 16, 16)


@needs_extension
def test_mac_and_sop_counts_match_a_hand_count():
    torch.manual_seed(0)
    net = HandNet().eval()
    x = torch.rand(2, 1, 4, 4) * 4
    macs = count_macs(net, x)
    # conv1: 2x4x4 outputs x 9 taps x 1 channel; conv2: 3x2x2 outputs x 9 x 2; fc: 5 x 12
    assert macs == {"conv1": 288, "conv2": 216, "fc": 60}
    qnet = fastspike.quantize(net, levels=4)
    fastspike.calibrate(qnet, [x])
    T = 4
    snn = fastspike.to_snn(qnet, T).eval()
    seen = {}
    for name, module in snn.named_modules():
        if isinstance(module, fastspike.SpikingNeuron):
            module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, (o.clone(), m.threshold)))
    stats = spike_statistics(snn, macs, x, T)
    (name1, (s1, th1)), (name2, (s2, th2)) = sorted(seen.items())
    # IF neurons: every non-zero output is one spike of size θ
    assert torch.all((s1 == 0) | (s1 == th1)) and torch.all((s2 == 0) | (s2 == th2))
    n1, n2 = int((s1 != 0).sum()), int((s2 != 0).sum())
    assert stats["spike_rates"][name1]["rate"] == pytest.approx(n1 / s1.numel())
    assert stats["spike_rates"][name1]["spikes_per_image"] == pytest.approx(n1 / 2)
    layers = stats["layers"]
    assert layers["conv1"]["snn_macs"] == 288 * T and not layers["conv1"]["spiking_input"]
    assert layers["conv2"]["sops"] == pytest.approx(216 * T * n1 / s1.numel())
    assert layers["fc"]["sops"] == pytest.approx(60 * T * n2 / s2.numel())
    sops = 216 * T * n1 / s1.numel() + 60 * T * n2 / s2.numel()
    assert stats["sops"] == pytest.approx(sops)
    assert stats["energy_snn_uj"] == pytest.approx((sops * 0.9 + 288 * T * 4.6) * 1e-6)
    assert stats["energy_ann_uj"] == pytest.approx(564 * 4.6e-6)


def test_bench_models_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        bench_models.main(["--models", "alexnet"])
    with pytest.raises(SystemExit, match="--T values must be >= 1"):
        bench_models.main(["--T", "0", "--device", "cpu"])


@needs_extension
def test_profile_kernels_runs_one_configuration_on_cpu(capsys):
    assert profile_kernels.main(["--device", "cpu", "--T", "4", "--N", "1000", "--iters", "2", "--warmup", "1"]) == 0
    assert profile_kernels.main(["--device", "cpu", "--op", "group", "--direction", "backward", "--T", "3",
                                 "--N", "500", "--iters", "2"]) == 0
    out = capsys.readouterr().out
    assert "signed forward T=4 N=1000 float32 on cpu: median" in out
    assert "group backward T=3 N=500" in out


@needs_extension
def test_profile_kernels_writes_a_chrome_trace_of_a_converted_model(tmp_path):
    path = tmp_path / "trace.json"
    assert profile_kernels.main(["--device", "cpu", "--trace", str(path), "--T", "2", "--warmup", "1"]) == 0
    with open(path) as f:
        trace = json.load(f)
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "fastspike::neuron_forward" in names and "aten::conv2d" in names
    assert "fastspike/tiny_cnn/T2/forward" in names
    complete = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    assert complete and all(e["dur"] >= 0 for e in complete)


def test_profile_kernels_help_prints_the_nsight_commands():
    text = profile_kernels.build_parser().format_help()
    assert "nsys profile --trace=cuda,nvtx --capture-range=nvtx --nvtx-capture=fastspike" in text
    assert 'ncu --nvtx --nvtx-include "fastspike/"' in text


def test_gpu_check_script_is_valid_bash(tmp_path):
    script = os.path.join(BENCH, "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", script], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout
    help_text = subprocess.run(["bash", script, "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "--dry-run" in help_text.stdout  # more in tests/test_gpu_check.py
    bad = subprocess.run(["bash", script, "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument '--bogus'" in bad.stderr
    if shutil.which("nvidia-smi") is None:
        result = subprocess.run(["bash", script, "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "nvidia-smi not found" in result.stderr


def test_cli_bench_runs_the_chosen_suite_with_its_arguments(monkeypatch):
    import runpy
    from fastspike import cli
    calls = []
    monkeypatch.setattr(runpy, "run_path", lambda path, run_name: calls.append((os.path.basename(path), sys.argv[1:])))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert cli.main(["bench", "--quick"]) == 0
    assert cli.main(["bench", "--suite", "models", "--quick", "--models", "tiny_cnn"]) == 0
    assert cli.main(["bench", "--", "--T", "4"]) == 0
    assert calls == [("bench_neurons.py", ["--quick"]), ("bench_models.py", ["--quick", "--models", "tiny_cnn"]),
                     ("bench_neurons.py", ["--T", "4"])]
    with pytest.raises(SystemExit) as exc:
        cli.main(["info", "--bogus"])
    assert exc.value.code == 2


def test_cpu_peak_memory_is_the_tensor_high_water_mark_of_one_call():
    """x*2 (4 MB), x+1 (4 MB) and their concatenation (8 MB) are alive together: 16 MB,
    every time (the profiler's running total persists between sessions)."""
    memory = PeakMemory(torch.device("cpu"))
    x = torch.randn(1000, 1000)
    peaks = [memory.measure(lambda: torch.cat([x * 2, x + 1])) for _ in range(2)]
    assert [p["peak_bytes"] for p in peaks] == [16_000_000, 16_000_000]
    assert all(p["rss_peak_delta_bytes"] is None or p["rss_peak_delta_bytes"] >= 0 for p in peaks)


@needs_extension
def test_bench_neurons_json_has_the_contenders_ratios_and_thread_scaling(tmp_path):
    out = tmp_path / "neurons.json"
    threads = torch.get_num_threads()
    assert bench_neurons.main(["--T", "2", "--N", "12", "--kinds", "signed", "--dtypes", "float32",
                               "--directions", "forward", "--contenders", "fused", "fused_out", "reference", "copy", "copy_out",
                               "--rounds", "1", "--min-time", "0", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # the scaling probe restores the thread count
    payload = json.loads(out.read_text())
    scaling = payload["cpu_compute_scaling"]
    assert scaling["threads"] == threads and scaling["one_thread_s"] > 0 and scaling["all_threads_s"] > 0
    assert abs(scaling["speedup"] - scaling["one_thread_s"] / scaling["all_threads_s"]) < 1e-12
    (result,) = payload["results"]
    assert (result["T"], result["N"], result["kind"]) == (2, 4096, "signed")
    assert set(result["contenders"]) == {"fused", "fused_out", "reference", "copy", "copy_out"}
    for timing in result["contenders"].values():
        assert timing["median_s"] > 0 and timing["gbps"] > 0
    fused_out, copy_out = result["contenders"]["fused_out"], result["contenders"]["copy_out"]
    assert result["ratios"]["fused_out_bw_fraction_of_copy_out"] == pytest.approx(
        fused_out["gbps"] / copy_out["gbps"])


def test_bench_neurons_spikingjelly_contenders(tmp_path):
    """SpikingJelly's multi-step IFNode(v_reset=None) as contenders: timed and equal to fastspike's
    neuron from a zero membrane where SpikingJelly is installed, skipped with the reason elsewhere
    (other kinds, CUDA-only implementations on the CPU, SpikingJelly missing)."""
    out = tmp_path / "neurons-sj.json"
    assert bench_neurons.main(["--T", "3", "--N", "1000", "--kinds", "if", "signed", "--dtypes", "float32",
                               "--directions", "forward", "forward_backward", "--device", "cpu",
                               "--contenders", "fused", *bench_neurons.SJ_CONTENDERS,
                               "--rounds", "1", "--min-time", "0", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    installed = bench_neurons.spikingjelly_version()
    assert payload["settings"]["spikingjelly"] == installed
    for r in payload["results"]:
        c = r["contenders"]
        assert c["fused"]["median_s"] > 0
        for name in ("sj_cuda", "sj_triton", "sj_cupy"):
            assert "skipped" in c[name]
        if installed is None:
            assert all(c[n]["skipped"] == "SpikingJelly is not installed" for n in bench_neurons.SJ_CONTENDERS)
        elif r["kind"] == "signed":
            assert "if kind only" in c["sj_torch"]["skipped"] and "fused_speedup_vs_sj_torch" not in r["ratios"]
        else:
            assert c["sj_torch"]["median_s"] > 0
            assert r["ratios"]["fused_speedup_vs_sj_torch"] == pytest.approx(
                c["sj_torch"]["median_s"] / c["fused"]["median_s"])
            assert "CUDA only" in c["sj_cuda"]["skipped"]
            if r["direction"] == "forward":
                assert r["sj_equals_fused"] == {"sj_torch": True}


def test_bench_models_spikingjelly_skipped_cleanly_without_it(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_models, "spikingjelly_version", lambda: None)
    out = tmp_path / "models.json"
    assert bench_models.main(["--quick", "--T", "1", "--device", "cpu", "--rounds", "1", "--min-time", "0",
                              "--contenders", "ann", "sj", "sj_fastspike", "--no-plot", "--out", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert r["contenders"]["sj"] == {"skipped": "SpikingJelly is not installed", "median_s_per_image": None}
    assert r["contenders"]["sj_fastspike"]["skipped"] == "SpikingJelly is not installed"
    assert r["ratios"]["sj_over_sj_fastspike"] is None and r["max_abs_diff_sj"] is None
