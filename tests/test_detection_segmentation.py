"""Detection (YOLOv2) and segmentation (DeepLabv3) networks: they convert to SNNs
that agree with their quantized ANN, the dense parts of DeepLabv3 (image pooling,
bilinear upsampling) survive conversion, the YOLO decoder returns the box a map
encodes, and the YOLO loss trains."""

import math
from typing import Dict, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fastspike
from oracles import assert_snn_equals_quantized_ann
from fastspike.models import DEFAULT_ANCHORS, available_models, decode_yolo, get_model, yolo_loss
from fastspike.nn import SpikingNeuron
from fastspike.quant import QuantReLU

LEVELS = 4
T = 4

# name, builder kwargs, input side, batch size, calibration percentile: tiny widths,
# small images; the torchvision backbones are the full-size ones. Random-weight networks
# at 4 levels end near rel err 0.8-0.9 (seeds 0-4). The 49-ReLU ResNet-50 is calibrated
# to the maximum (max-norm): clipping its top 0.1% costs more than coarser steps
# (rel err 0.55-0.96 over seeds 0-7 at 100, 0.62-1.15 at 99.9); the others do slightly
# better at 99.9.
DENSE = [
    ("tiny_yolov2", dict(width=0.125, num_downsamples=3), 32, 4, 99.9),
    ("yolov2_resnet34", dict(width=0.125), 64, 2, 99.9),
    ("small_deeplab", dict(width=4), 32, 4, 99.9),
    ("deeplabv3_resnet50", {}, 64, 2, 100.0),
]

_converted: Dict[str, Tuple[fx.GraphModule, fx.GraphModule, torch.Tensor]] = {}


@torch.no_grad()
def _convert(name: str, kwargs: Dict, side: int, batch: int, percentile: float):
    """(quantized ANN, SNN, held-out batch), built once per session: random
    weights, BN statistics measured on random data, λ calibrated at ``percentile``."""
    if name not in _converted:
        torch.manual_seed(0)
        net = get_model(name, num_classes=3, **kwargs)
        g = torch.Generator().manual_seed(1)
        batches = [torch.randn(batch, 3, side, side, generator=g) for _ in range(3)]
        # Random weights leave BN statistics at (0, 1): measure them, as after training.
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        net.train()
        for b in batches[:2]:
            net(b)
        net.eval()
        q = fastspike.quantize(net, levels=LEVELS).eval()
        fastspike.calibrate(q, batches[:2], percentile=percentile)
        s = fastspike.to_snn(q, time_steps=T, neuron="signed")
        _converted[name] = (q, s, batches[2])
    return _converted[name]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_registry_lists_the_dense_models():
    for name in ("tiny_yolov2", "yolov2_resnet34", "small_deeplab", "deeplabv3_resnet50"):
        assert name in available_models()


@pytest.mark.parametrize("name, kwargs, side, batch, percentile", DENSE, ids=[d[0] for d in DENSE])
@torch.no_grad()
def test_snn_agrees_with_quantized_ann(name, kwargs, side, batch, percentile):
    q, s, x = _convert(name, kwargs, side, batch, percentile)
    y_ann, y_snn = q(x), s(x)
    if isinstance(y_ann, dict):
        assert list(y_snn.keys()) == list(y_ann.keys()) == ["out"]
        pairs = [(y_snn[k], y_ann[k]) for k in y_ann]
    else:
        pairs = [(y_snn, y_ann)]
    for ys, ya in pairs:
        assert ys.shape == ya.shape
        assert torch.isfinite(ys).all()
        print(f"{name}: output {tuple(ya.shape)} rel err at T={T} {_rel(ys, ya):.3f}")
    # The sharp check: group neurons with m = L at T = 1 equal the quantized ANN to
    # float64 rounding (heads, upsampling and image pooling included).
    assert_snn_equals_quantized_ann(q, x, LEVELS, variants=(True,))
    if name == "deeplabv3_resnet50":
        assert y_ann["out"].shape == (batch, 3, side, side)
    elif name == "small_deeplab":
        assert y_ann.shape == (batch, 3, side, side)
    else:
        grid = side // 2 ** kwargs.get("num_downsamples", 5)
        assert y_ann.shape == (batch, len(DEFAULT_ANCHORS) * (5 + 3), grid, grid)


@pytest.mark.parametrize("name", ["small_deeplab", "deeplabv3_resnet50"])
@torch.no_grad()
def test_deeplab_image_pooling_and_upsampling_survive_conversion(name):
    q, s, x = _convert(*next(d for d in DENSE if d[0] == name))
    pools = [n for n in s.graph.nodes if n.op == "call_module"
             and isinstance(s.get_submodule(n.target), nn.AdaptiveAvgPool2d)]
    interps = [n for n in s.graph.nodes if n.op == "call_function" and n.target is F.interpolate]
    assert len(pools) == 1  # the ASPP image-pooling branch
    assert len(interps) == 2  # its upsample back, and the final one to the input size
    for node in interps:
        assert node.kwargs.get("mode") == "bilinear" and node.kwargs.get("align_corners") is False
    neurons = [m for m in s.modules() if isinstance(m, SpikingNeuron)]
    quants = [m for m in q.modules() if isinstance(m, QuantReLU)]
    assert len(neurons) == len(quants) > 0
    # The pooled branch's ReLU is a neuron too: the pool feeds (via conv) a spiking layer.
    users = list(pools[0].users)
    assert users and users[0].op == "call_module"


# ---------------------------------------------------------------------------
# decode_yolo


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _encode(out: torch.Tensor, anchors, num_classes: int, b: int, a: int, j: int, i: int,
            box: Tuple[float, float, float, float], label: int, stride: float, conf: float = 10.0) -> None:
    """Writes into the raw map the parameters that decode to ``box`` (xyxy pixels)."""
    x0, y0, x1, y1 = box
    cx, cy, w, h = (x0 + x1) / 2 / stride, (y0 + y1) / 2 / stride, (x1 - x0) / stride, (y1 - y0) / stride
    k = 5 + num_classes
    out[b, a * k + 0, j, i] = _logit(cx - i)
    out[b, a * k + 1, j, i] = _logit(cy - j)
    out[b, a * k + 2, j, i] = math.log(w / anchors[a][0])
    out[b, a * k + 3, j, i] = math.log(h / anchors[a][1])
    out[b, a * k + 4, j, i] = conf
    out[b, a * k + 5 + label, j, i] = 12.0


def _empty_map(batch: int, num_anchors: int, num_classes: int, grid: int) -> torch.Tensor:
    out = torch.zeros(batch, num_anchors * (5 + num_classes), grid, grid)
    out.view(batch, num_anchors, 5 + num_classes, grid, grid)[:, :, 4] = -20.0  # no object anywhere
    return out


def test_decode_yolo_returns_the_encoded_box():
    anchors, C, grid, image = DEFAULT_ANCHORS, 3, 4, 128
    out = _empty_map(2, len(anchors), C, grid)
    box = (40.0, 50.0, 60.0, 80.0)  # centre (50, 65): cell (i=1, j=2) of stride 32
    _encode(out, anchors, C, b=1, a=2, j=2, i=1, box=box, label=2, stride=32.0)
    dets = decode_yolo(out, anchors, C, image)
    assert len(dets) == 2
    assert dets[0]["boxes"].shape == (0, 4)
    assert dets[1]["boxes"].shape == (1, 4)
    torch.testing.assert_close(dets[1]["boxes"][0], torch.tensor(box), atol=1e-4, rtol=0)
    assert dets[1]["labels"].tolist() == [2]
    assert dets[1]["labels"].dtype == torch.int64
    assert dets[1]["scores"][0] == pytest.approx(torch.sigmoid(torch.tensor(10.0)).item(), abs=1e-4)


def test_decode_yolo_nms_removes_a_duplicate():
    anchors, C, grid, image = DEFAULT_ANCHORS, 3, 4, 128
    out = _empty_map(1, len(anchors), C, grid)
    _encode(out, anchors, C, 0, 1, 2, 1, (40.0, 50.0, 60.0, 80.0), label=0, stride=32.0, conf=10.0)
    _encode(out, anchors, C, 0, 3, 2, 1, (41.0, 51.0, 61.0, 80.0), label=0, stride=32.0, conf=5.0)
    # The same place with another class is not a duplicate.
    _encode(out, anchors, C, 0, 4, 2, 1, (40.0, 50.0, 60.0, 80.0), label=1, stride=32.0, conf=3.0)
    (det,) = decode_yolo(out, anchors, C, image)
    assert det["labels"].tolist() == [0, 1]
    torch.testing.assert_close(det["boxes"][0], torch.tensor([40.0, 50.0, 60.0, 80.0]), atol=1e-4, rtol=0)
    (det,) = decode_yolo(out, anchors, C, image, nms_iou=0.99)
    assert det["labels"].tolist() == [0, 0, 1]


def test_decode_yolo_names_a_wrong_shape():
    with pytest.raises(ValueError, match="output must be"):
        decode_yolo(torch.zeros(1, 7, 2, 2), DEFAULT_ANCHORS, 3, 64)


# ---------------------------------------------------------------------------
# yolo_loss


def test_yolo_loss_trains_tiny_yolov2():
    torch.manual_seed(0)
    C, side = 3, 64
    net = get_model("tiny_yolov2", num_classes=C, width=0.25)
    x = torch.rand(2, 3, side, side)
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 16.0, 18.0], [30.0, 34.0, 50.0, 58.0]]),
         "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[20.0, 10.0, 40.0, 24.0]]), "labels": torch.tensor([1])},
    ]
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    losses = []
    for _ in range(30):
        loss = yolo_loss(net(x), targets, DEFAULT_ANCHORS, C, side)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"yolo_loss: {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]


def test_yolo_loss_accepts_an_image_without_boxes_and_checks_labels():
    out = torch.zeros(2, len(DEFAULT_ANCHORS) * 8, 2, 2, requires_grad=True)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    loss = yolo_loss(out, [empty, empty], DEFAULT_ANCHORS, 3, 64)
    loss.backward()
    assert torch.isfinite(loss)
    bad = {"boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0]]), "labels": torch.tensor([3])}
    with pytest.raises(ValueError, match="labels"):
        yolo_loss(out, [bad, empty], DEFAULT_ANCHORS, 3, 64)


# ---------------------------------------------------------------------------
# Briefly trained on synthetic scenes, the SNN keeps its quantized ANN's metric

SCENE_SIZE = 32
TRAIN_SCENES, TEST_SCENES, BATCH = 1024, 64, 32
# A 4x4 grid (stride 8) on 32 px scenes, whose shapes span 4..11 px: anchors of
# 0.6..1.2 cells (w, h) cover them, square and elongated.
SCENE_ANCHORS = ((0.6, 0.6), (0.8, 1.1), (1.1, 0.8), (1.15, 1.15))


@pytest.fixture
def one_thread():
    """One intra-op thread while training: the suite shares two cores with other work, and
    OpenMP workers spinning on busy cores made a detector training step ~9x slower
    (measured at load 12: 4.3 s with two threads, 0.47 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scenes():
    """(train images, train targets, test images, test targets) at SCENE_SIZE, shared by both tasks."""
    from fastspike.data import SyntheticScenes, collate_scenes

    def make(num_images: int, seed: int):
        ds = SyntheticScenes(num_images, SCENE_SIZE, seed=seed)
        return collate_scenes([ds[i] for i in range(num_images)])

    return (*make(TRAIN_SCENES, 0), *make(TEST_SCENES, 1))


def _train(model: nn.Module, images: torch.Tensor, targets, loss_fn, steps: int, lr: float, seed: int) -> nn.Module:
    """Adam with a cosine schedule on seeded random minibatches of BATCH scenes."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(images), (BATCH,), generator=g).tolist()
        loss = loss_fn(model(images[idx]), [targets[i] for i in idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def _detection_task():
    from fastspike.metrics import mean_average_precision

    def loss(out, targets):
        return yolo_loss(out, targets, SCENE_ANCHORS, 3, SCENE_SIZE)

    @torch.no_grad()
    def metric(model, images, targets):
        return mean_average_precision(decode_yolo(model(images), SCENE_ANCHORS, 3, SCENE_SIZE), targets, 3)["map"]

    net = get_model("tiny_yolov2", 3, width=0.125, num_downsamples=3, anchors=SCENE_ANCHORS)
    return net, loss, metric


def _segmentation_task():
    from fastspike.metrics import SegmentationMeter

    def masks(targets):
        return torch.stack([t["mask"] for t in targets])

    def loss(out, targets):
        return F.cross_entropy(out, masks(targets))

    @torch.no_grad()
    def metric(model, images, targets):
        meter = SegmentationMeter(4)
        meter.update(model(images).argmax(1), masks(targets))
        return meter.compute()["miou"]

    return get_model("small_deeplab", 4, width=8), loss, metric


# task: (builder, levels L (the SNN runs T = L), training steps, fine-tuning steps, floor for
# the quantized ANN's metric, margin for |SNN - quantized ANN|); see the test's docstring.
TRAINED = {
    "detection": (_detection_task, 8, 300, 50, 0.3, 0.15),
    "segmentation": (_segmentation_task, 4, 300, 50, None, 0.05),
}


@pytest.mark.parametrize("task", list(TRAINED))
def test_briefly_trained_snn_keeps_the_quantized_metric(task, scenes, one_thread):
    """Train briefly on synthetic scenes (1024 scenes of 32 px, 300 Adam steps), quantize (QCFS),
    calibrate (99.9th percentile), fine-tune 50 steps, convert with signed neurons at T = L, and
    compare mAP@0.5 / mIoU on 64 held-out scenes.

    Measured with these seeds, one thread (ANN / quantized / signed SNN at T = 1, 2, 4, 8, 16):
      detection, Tiny-YOLOv2 width 1/8, 4x4 grid, L = 8:
          0.511 / 0.447 / 0.037, 0.178, 0.274, 0.427, 0.466   (IF at T = 8: 0.354)
      segmentation, SmallDeepLab width 8, L = 4:
          0.439 / 0.420 / 0.336, 0.378, 0.418, 0.416, -      (IF at T = 4: 0.398)
    Predicting background everywhere scores mIoU 0.23; an untrained detector mAP ~0.

    Asserted: the quantized ANN learned (mAP > 0.3; mIoU > background-only + 0.1), and
    |SNN at T = L - quantized ANN| <= 0.15 mAP / 0.05 mIoU. The gap is 0.020 / 0.001 with
    these seeds; over initialisation and data-order seeds 0-3 it was 0.020-0.100 (mAP,
    the detector's boxes go through exp() and its ranking through sigmoid(), so a few moved
    spikes move it) and 0.001-0.020 (mIoU): the margins are 1.5x and 2.5x the worst seed, so
    other CPUs' rounding passes while a broken conversion (T = 1 lands 0.2-0.4 lower) fails.
    """
    build, levels, steps, finetune_steps, floor, margin = TRAINED[task]
    train_x, train_t, test_x, test_t = scenes
    torch.manual_seed(0)
    net, loss, metric = build()
    _train(net, train_x, train_t, loss, steps, lr=3e-3, seed=0)
    qnet = fastspike.quantize(net, levels=levels)
    fastspike.calibrate(qnet, [train_x[i:i + BATCH] for i in range(0, 8 * BATCH, BATCH)], percentile=99.9)
    _train(qnet, train_x, train_t, loss, finetune_steps, lr=1e-3, seed=1)
    snn = fastspike.to_snn(qnet, levels, "signed")
    ann_value, q_value, snn_value = (metric(m, test_x, test_t) for m in (net, qnet, snn))
    print(f"{task}: ANN {ann_value:.4f} quantized {q_value:.4f} SNN signed T={levels} {snn_value:.4f}")
    if floor is None:  # mIoU of predicting background everywhere
        from fastspike.metrics import SegmentationMeter

        meter = SegmentationMeter(4)
        meter.update(torch.zeros_like(torch.stack([t["mask"] for t in test_t])),
                     torch.stack([t["mask"] for t in test_t]))
        floor = meter.compute()["miou"] + 0.1
    assert q_value > floor
    assert abs(snn_value - q_value) <= margin
