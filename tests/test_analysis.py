"""fastspike.analysis.layerwise_comparison on networks where the answer is known."""

import math

import pytest
import torch
from torch import nn

from fastspike.analysis import compare_neurons, format_comparison, layerwise_comparison
from fastspike.convert import quantize, quantizers, to_snn


def _set_thresholds(qnet, value=1.0):
    for _, q in quantizers(qnet):
        q.set_threshold(torch.tensor(value))
    return qnet


def test_one_layer_at_T_equal_L_is_exact_for_if_and_signed():
    # Constant input reaches the only spiking layer: at T = L, IF and signed IF are the quantized ANN.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 2, 1))
    qnet = _set_thresholds(quantize(net, levels=4), 0.7).eval()
    x = torch.rand(5, 3, 8, 8) * 2 - 0.5
    for kind, rows in compare_neurons(qnet, x, 4).items():
        layer, out = rows
        assert layer["neuron"] == kind and layer["time_steps"] == 4
        assert layer["threshold"] == pytest.approx(0.7)
        for key in ("mae", "bias", "differ", "over", "under", "local_differ", "input_mae", "late"):
            assert layer[key] == pytest.approx(0.0, abs=1e-6), (kind, key)
        assert layer["negative"] == 0.0  # a constant input never needs a negative spike
        assert out["layer"] == "output" and out["mae"] < 1e-5 and out["differ"] == 0.0
    assert "output" in format_comparison(rows)
    table = format_comparison(compare_neurons(qnet, x, 4)).splitlines()  # the README's spelling
    assert [line.split()[1] for line in table[2:] if not line.startswith("output")] == ["if", "signed"]


def _early_then_late():
    # Layer 1 (θ = 1, L = T = 2, input 1): neuron A gets 0.5 -> spikes [1, 0], neuron B gets
    # 0.25 -> spikes [0, 1]; both are 0.5 in the ANN. Layer 2 gets A - B: +1 then -1, mean 0,
    # which the ANN quantizes to 0.
    net = nn.Sequential(nn.Linear(1, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False), nn.ReLU(),
                        nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.5], [0.25]]))
        net[2].weight.copy_(torch.tensor([[1.0, -1.0]]))
        net[4].weight.fill_(1.0)
    return _set_thresholds(quantize(net, levels=2)).eval()


def test_sequential_error_known_case():
    qnet = _early_then_late()
    x = torch.ones(1, 1)
    rows = compare_neurons(qnet, x, 2)
    first, second, out = rows["if"]
    assert first["differ"] == 0.0 and first["input_mae"] == 0.0
    # IF: spike at t = 1 (v = 1.5), nothing at t = 2 (v = -0.5): 0.5 where the ANN has 0.
    assert second["differ"] == 1.0 and second["over"] == 1.0 and second["under"] == 0.0
    assert second["mae"] == pytest.approx(1.0) and second["bias"] == pytest.approx(1.0)  # one step λ/L
    assert second["local_differ"] == 1.0 and second["local_over"] == 1.0  # its own error, not inherited
    assert second["input_mae"] == pytest.approx(0.0, abs=1e-7) and second["negative"] == 0.0
    assert out["mae"] > 0 and out["differ"] == 1.0
    first, second, out = rows["signed"]
    # Signed IF: the negative spike at t = 2 takes the early one back.
    assert second["differ"] == 0.0 and second["local_differ"] == 0.0 and second["negative"] == 1.0
    assert out["mae"] == pytest.approx(0.0, abs=1e-7)


def test_late_input_is_counted():
    # Layer 2 gets 2·B: 0 then 2, mean 1 -> the ANN's 1.0 (count 2). SNN: v = 0.5, then 2.5 ->
    # one spike (m = 1: one per step), 1.5 left over: count 1 < 2, too late for either kind.
    qnet = _early_then_late()
    with torch.no_grad():
        qnet.get_submodule("2").weight.copy_(torch.tensor([[0.0, 2.0]]))
    for kind, (_, second, _) in compare_neurons(qnet, torch.ones(1, 1), 2).items():
        assert second["late"] == 1.0 and second["under"] == 1.0, kind
        assert second["local_under"] == 1.0


def test_batches_accumulate_and_errors():
    qnet = _early_then_late()
    snn = to_snn(qnet, 2, "if")
    one = layerwise_comparison(qnet, snn, torch.ones(3, 1))
    many = layerwise_comparison(qnet, snn, [(torch.ones(1, 1), None)] * 3)
    assert [r["differ"] for r in one] == [r["differ"] for r in many]
    with pytest.raises(ValueError, match="no batches"):
        layerwise_comparison(qnet, snn, [])
    other = quantize(nn.Sequential(nn.Linear(1, 1), nn.ReLU()), levels=2)
    with pytest.raises(ValueError, match="no quantizer"):
        layerwise_comparison(other, snn, torch.ones(1, 1))
    assert math.isnan(one[-1]["threshold"])
