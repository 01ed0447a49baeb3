"""The model zoo: every registry name builds, runs, and traces with torch.fx to the same numbers."""

import operator
from typing import Dict

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from fastspike.models import CifarVGG, available_models, cifar_vgg16, get_model

CIFAR_NAMES = ["cifar_resnet18", "cifar_resnet20", "cifar_vgg16"]
TORCHVISION_NAMES = ["resnet18", "resnet34", "resnet50", "vgg11_bn", "vgg16_bn"]
NUM_CLASSES = 7  # not 10 or 1000, so a head that ignores num_classes shows up

_built: Dict[str, nn.Module] = {}


def _model(name: str) -> nn.Module:
    # The torchvision models take a second or so to initialise: build each once per session.
    if name not in _built:
        torch.manual_seed(0)
        _built[name] = get_model(name, num_classes=NUM_CLASSES).eval()
    return _built[name]


def _input(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if name.startswith("cifar_"):
        return torch.randn(2, 3, 32, 32, generator=g)
    return torch.randn(1, 3, 64, 64, generator=g)  # small input: the nets pool adaptively


def _relu_sites(gm: fx.GraphModule) -> int:
    """ReLU call sites in a traced graph (a module called twice counts twice)."""
    modules = dict(gm.named_modules())
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.ReLU):
            n += 1
        elif node.op == "call_function" and node.target in (F.relu, torch.relu, torch.relu_):
            n += 1
        elif node.op == "call_method" and node.target in ("relu", "relu_"):
            n += 1
    return n


def test_registry_names():
    dense = ["tiny_yolov2", "yolov2_resnet34", "small_deeplab", "deeplabv3_resnet50"]
    assert available_models() == sorted(CIFAR_NAMES + TORCHVISION_NAMES + dense + ["digits_cnn"])


@pytest.mark.parametrize("name", CIFAR_NAMES + TORCHVISION_NAMES)
@torch.no_grad()
def test_builds_runs_and_traces(name):
    model = _model(name)
    x = _input(name)
    expected = model(x)
    assert expected.shape == (x.shape[0], NUM_CLASSES)
    assert torch.isfinite(expected).all()

    gm = fx.symbolic_trace(model)
    torch.testing.assert_close(gm(x), expected)


@pytest.mark.parametrize(
    "name, sites, modules",
    [
        ("cifar_resnet20", 1 + 9 * 2, 1 + 9 * 2),  # stem + 2 per block, one module per site
        ("cifar_resnet18", 1 + 8 * 2, 1 + 8 * 2),
        ("cifar_vgg16", 13 + 2, 13 + 2),  # 13 convs + 2 hidden linears
        ("resnet18", 1 + 8 * 2, 1 + 8),  # torchvision calls each block's ReLU twice
    ],
)
def test_relu_call_sites(name, sites, modules):
    model = _model(name)
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == modules
    assert _relu_sites(fx.symbolic_trace(model)) == sites


@pytest.mark.parametrize("name, kwargs", [
    ("cifar_resnet18", dict(base_width=4, in_channels=1)),
    ("cifar_resnet20", dict(base_width=2, in_channels=1)),
    ("cifar_vgg16", dict(width=1 / 16, hidden=16, in_channels=1, pool="max")),
])
@torch.no_grad()
def test_tiny_variants(name, kwargs):
    torch.manual_seed(0)
    model = get_model(name, num_classes=3, **kwargs).eval()
    assert sum(p.numel() for p in model.parameters()) < 100_000  # small enough for quick tests
    x = torch.randn(4, 1, 32, 32)
    gm = fx.symbolic_trace(model)
    out = model(x)
    assert out.shape == (4, 3)
    torch.testing.assert_close(gm(x), out)


def test_vgg_pooling():
    avg = cifar_vgg16(width=1 / 16, hidden=8)
    mx = cifar_vgg16(width=1 / 16, hidden=8, pool="max")
    assert sum(isinstance(m, nn.AvgPool2d) for m in avg.modules()) == 5
    assert not any(isinstance(m, nn.MaxPool2d) for m in avg.modules())
    assert sum(isinstance(m, nn.MaxPool2d) for m in mx.modules()) == 5
    assert not any(isinstance(m, nn.AvgPool2d) for m in mx.modules())
    with pytest.raises(ValueError, match="pool"):
        CifarVGG(pool="min")


def test_vgg_classifier_is_qcfs_head():
    model = cifar_vgg16(num_classes=10, width=1 / 8, hidden=32)
    kinds = [type(m) for m in model.classifier]
    assert kinds == [nn.Flatten, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert model.classifier[1].in_features == 64  # 512 / 8, with a 1x1 map after five pools
    assert model.classifier[-1].out_features == 10


def test_unknown_name():
    with pytest.raises(ValueError) as info:
        get_model("resnet1000")
    msg = str(info.value)
    assert "resnet1000" in msg
    for name in available_models():
        assert name in msg


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet18"])
@pytest.mark.parametrize("kwargs", [dict(weights="IMAGENET1K_V1"), dict(pretrained=True)])
def test_pretrained_weights_refused(name, kwargs):
    with pytest.raises(ValueError, match=r"load_state_dict") as info:
        get_model(name, **kwargs)
    assert "local file" in str(info.value)


def test_weights_none_accepted():
    model = get_model("cifar_resnet20", num_classes=5, weights=None, base_width=2)
    assert model.fc.out_features == 5


def test_every_registered_model_has_its_task():
    """One registry: the CLI reads a model's task from it (issue 17 item 3)."""
    from fastspike.models import TASKS, model_task

    tasks = {name: model_task(name) for name in available_models()}
    assert set(tasks.values()) == set(TASKS)
    assert tasks["tiny_yolov2"] == "detection" and tasks["small_deeplab"] == "segmentation"
    assert tasks["cifar_resnet20"] == "classification" and tasks["resnet18"] == "classification"
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        model_task("nope")


def test_neuron_kinds_are_one_table():
    """to_snn's kinds, the CLI's --neuron choices and the nn layer agree (issue 17 item 3)."""
    import fastspike.cli
    from fastspike.nn import NEURON_KINDS, neuron_kind_name, resolve_neuron_kind

    parser = fastspike.cli.build_parser()
    for kind in NEURON_KINDS.values():
        assert neuron_kind_name(kind.signed, kind.grouped) == kind.name
        m, signed = resolve_neuron_kind(kind.name, 3 if kind.grouped else None)
        assert (m > 1) == kind.grouped and signed == kind.signed
    with pytest.raises(ValueError, match="neuron must be one of"):
        resolve_neuron_kind("lif", None)
    convert = parser._subparsers._group_actions[0].choices["convert"]
    assert sorted(next(a for a in convert._actions if a.dest == "neuron").choices) == sorted(NEURON_KINDS)
