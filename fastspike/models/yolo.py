"""YOLOv2-style detectors for conversion, with their decoder and a simple loss.

Both networks output the raw YOLOv2 map ``[B, A*(5+C), S, S]``: for each of the
A anchors, channels ``tx, ty, tw, th, to`` then C class logits. Everything
non-linear beyond ReLU (sigmoid, exp, softmax) lives in :func:`decode_yolo` and
:func:`yolo_loss`, outside the network, so the whole network converts.

Anchors are ``(w, h)`` pairs in grid-cell units of the output map.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DEFAULT_ANCHORS", "TinyYOLOv2", "YOLOv2ResNet34", "decode_yolo", "yolo_loss", "objectness_weight",
           "detection_readout_weight"]

# (w, h) in grid cells of a stride-32 map: a 64 px image has 2x2 cells of 32 px, so
# these span objects of 8..21 px, 1/8..1/3 of the image, square and elongated.
DEFAULT_ANCHORS: Tuple[Tuple[float, float], ...] = (
    (0.25, 0.25), (0.35, 0.5), (0.5, 0.35), (0.5, 0.5), (0.66, 0.66),
)

ImageSize = Union[int, Tuple[int, int], Sequence[int]]


def _anchor_tensor(anchors: Sequence[Sequence[float]]) -> torch.Tensor:
    a = torch.as_tensor(anchors, dtype=torch.float32)
    if a.dim() != 2 or a.shape[1] != 2 or a.shape[0] == 0 or not bool((a > 0).all()):
        raise ValueError(f"anchors must be a non-empty sequence of positive (w, h) pairs, got {anchors!r}")
    return a


def _image_hw(image_size: ImageSize) -> Tuple[float, float]:
    if isinstance(image_size, int):
        return float(image_size), float(image_size)
    if len(image_size) == 2:
        return float(image_size[0]), float(image_size[1])
    raise ValueError(f"image_size must be an int or an (H, W) pair, got {image_size!r}")


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class TinyYOLOv2(nn.Module):
    """Tiny-YOLOv2 as a conversion-friendly conv-BN-ReLU stack.

    Eight 3x3 conv-BN-ReLU layers with 16, 32, 64, 128, 256, 512, 1024, 1024
    channels (times ``width``, rounded, at least 4), then a 1x1 head to
    ``A*(5+C)`` channels. Two changes from the original make it convertible:
    its 2x2 max-pools are replaced by striding the 3x3 conv that follows each
    of them (stride 2), and its LeakyReLU is a plain ``nn.ReLU`` (which
    :func:`fastspike.quantize` replaces by a quantized ReLU before conversion).

    Args:
        num_classes: C.
        anchors: (w, h) pairs in grid cells; A = len(anchors).
        width: channel multiplier.
        in_channels: image channels.
        num_downsamples: stride-2 stages (5, the original stride 32, by
            default; fewer keep a larger grid on small test images).
    """

    def __init__(
        self,
        num_classes: int = 3,
        anchors: Sequence[Sequence[float]] = DEFAULT_ANCHORS,
        width: float = 1.0,
        in_channels: int = 3,
        num_downsamples: int = 5,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0 <= num_downsamples <= 5:
            raise ValueError(f"num_downsamples must be in 0..5 (the original has 5 pools), got {num_downsamples}")
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.num_classes = num_classes
        self.anchors = tuple(tuple(float(v) for v in a) for a in _anchor_tensor(anchors).tolist())
        channels = [max(4, round(c * width)) for c in (16, 32, 64, 128, 256, 512, 1024, 1024)]
        layers, cin = [], in_channels
        for i, cout in enumerate(channels):
            # Layers 1..num_downsamples follow a max-pool in the original: they stride instead.
            layers.append(_conv_bn_relu(cin, cout, stride=2 if 1 <= i <= num_downsamples else 1))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(cin, len(self.anchors) * (5 + num_classes), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class YOLOv2ResNet34(nn.Module):
    """YOLOv2 head on a torchvision ResNet-34 backbone (random init, stride 32).

    The backbone is ResNet-34 up to ``layer4``; the head is two 3x3
    conv-BN-ReLU layers with ``round(1024 * width)`` channels and a 1x1 conv to
    ``A*(5+C)`` channels. The passthrough (reorg) layer of YOLOv2 is left out.
    """

    def __init__(
        self,
        num_classes: int = 3,
        anchors: Sequence[Sequence[float]] = DEFAULT_ANCHORS,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        import torchvision  # optional dependency: only this model needs it

        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.num_classes = num_classes
        self.anchors = tuple(tuple(float(v) for v in a) for a in _anchor_tensor(anchors).tolist())
        r = torchvision.models.resnet34(weights=None)
        self.backbone = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3, r.layer4)
        hidden = max(4, round(1024 * width))
        self.neck = nn.Sequential(_conv_bn_relu(512, hidden), _conv_bn_relu(hidden, hidden))
        self.head = nn.Conv2d(hidden, len(self.anchors) * (5 + num_classes), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(self.backbone(x)))


def _split(output: torch.Tensor, num_anchors: int, num_classes: int) -> torch.Tensor:
    """[B, A*(5+C), H, W] -> [B, A, H, W, 5+C]."""
    if output.dim() != 4 or output.shape[1] != num_anchors * (5 + num_classes):
        raise ValueError(f"output must be [B, A*(5+C), H, W] = [B, {num_anchors * (5 + num_classes)}, H, W] "
                         f"for {num_anchors} anchors and {num_classes} classes, got {tuple(output.shape)}")
    b, _, h, w = output.shape
    return output.view(b, num_anchors, 5 + num_classes, h, w).permute(0, 1, 3, 4, 2)


def objectness_weight(output: torch.Tensor, num_anchors: int, num_classes: int, hard: bool = False) -> torch.Tensor:
    """sigmoid(to) of each anchor and cell, repeated over that anchor's 5 + C channels: weights
    of a raw map ``[B, A*(5+C), H, W]`` by how likely it says an object is there (for
    :func:`fastspike.finetune.finetune_layerwise`'s ``readout_weight``, with the quantized ANN's
    map: the box and class channels of the anchors that make the detections). ``hard``: 1 where
    sigmoid(to) > 0.5 (the map says "object"), else 0."""
    p = _split(output, num_anchors, num_classes)  # [B, A, H, W, 5+C]
    score = p[..., 4:5]
    weight = ((score > 0).to(output.dtype) if hard else torch.sigmoid(score)).expand_as(p)
    return weight.permute(0, 1, 4, 2, 3).reshape(output.shape)


def detection_readout_weight(num_anchors: int, num_classes: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``readout_weight`` the demo and ``fastspike finetune --readout-bias`` use for a YOLO map:
    the hard objectness weights (the anchors where the quantized ANN sees an object). Chosen over
    the soft ones on the demo detector's dev split (README, issue 20)."""
    return lambda output: objectness_weight(output, num_anchors, num_classes, hard=True)


@torch.no_grad()
def decode_yolo(
    output: torch.Tensor,
    anchors: Sequence[Sequence[float]],
    num_classes: int,
    image_size: ImageSize,
    conf_threshold: float = 0.05,
    nms_iou: float = 0.45,
    max_detections: int = 100,
) -> List[Dict[str, torch.Tensor]]:
    """Turns a raw YOLOv2 map into detections, one dict per image.

    Box centre = (sigmoid(tx, ty) + cell) * stride, size = exp(tw, th) * anchor
    * stride; score of class c = sigmoid(to) * softmax(class logits)[c]. Every
    (box, class) pair above ``conf_threshold`` is a candidate; per-class NMS
    at ``nms_iou`` then keeps at most ``max_detections``.

    Args:
        output: [B, A*(5+C), S_h, S_w].
        anchors: the model's (w, h) anchors in grid cells.
        num_classes: C.
        image_size: input side in pixels, or (H, W).

    Returns:
        ``[{"boxes": [N, 4] xyxy pixels (clipped to the image), "scores": [N],
        "labels": [N] int64}, ...]``.
    """
    from torchvision.ops import batched_nms

    a = _anchor_tensor(anchors).to(output.device, output.dtype)
    img_h, img_w = _image_hw(image_size)
    p = _split(output, a.shape[0], num_classes)
    _, _, grid_h, grid_w, _ = p.shape
    stride_y, stride_x = img_h / grid_h, img_w / grid_w
    gy, gx = torch.meshgrid(torch.arange(grid_h, device=output.device, dtype=output.dtype),
                            torch.arange(grid_w, device=output.device, dtype=output.dtype), indexing="ij")
    cx = (torch.sigmoid(p[..., 0]) + gx) * stride_x
    cy = (torch.sigmoid(p[..., 1]) + gy) * stride_y
    bw = torch.exp(p[..., 2]) * a[:, 0].view(1, -1, 1, 1) * stride_x
    bh = torch.exp(p[..., 3]) * a[:, 1].view(1, -1, 1, 1) * stride_y
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
    boxes[..., 0::2] = boxes[..., 0::2].clamp(0, img_w)
    boxes[..., 1::2] = boxes[..., 1::2].clamp(0, img_h)
    scores = torch.sigmoid(p[..., 4:5]) * torch.softmax(p[..., 5:], -1)  # [B, A, H, W, C]

    results = []
    for i in range(p.shape[0]):
        s = scores[i].reshape(-1, num_classes)
        box_idx, labels = (s > conf_threshold).nonzero(as_tuple=True)
        cand_boxes = boxes[i].reshape(-1, 4)[box_idx]
        cand_scores = s[box_idx, labels]
        keep = batched_nms(cand_boxes, cand_scores, labels, nms_iou)[:max_detections]
        results.append({"boxes": cand_boxes[keep], "scores": cand_scores[keep], "labels": labels[keep]})
    return results


def _wh_iou(wh: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """IoU of boxes [K, 2] and anchors [A, 2] sharing a centre: [K, A]."""
    inter = torch.min(wh[:, None, 0], anchors[None, :, 0]) * torch.min(wh[:, None, 1], anchors[None, :, 1])
    return inter / (wh[:, None].prod(-1) + anchors[None].prod(-1) - inter)


def yolo_loss(
    output: torch.Tensor,
    targets: Sequence[Dict[str, torch.Tensor]],
    anchors: Sequence[Sequence[float]],
    num_classes: int,
    image_size: ImageSize,
    *,
    coord_weight: float = 1.0,
    noobj_weight: float = 0.5,
) -> torch.Tensor:
    """A simple YOLOv2 loss, summed over the batch and divided by its size.

    Each ground-truth box goes to the grid cell of its centre and the anchor
    of best shape IoU (a later box on the same slot replaces an earlier one).
    On those slots: MSE of sigmoid(tx, ty) against the centre offset, MSE of
    tw, th against log(size / anchor), BCE objectness towards 1 and class
    cross-entropy; on every other slot, BCE objectness towards 0 weighted by
    ``noobj_weight``. (YOLOv2's ignore-IoU rule is left out.)

    Args:
        output: [B, A*(5+C), S_h, S_w] raw map.
        targets: per image, ``{"boxes": float [K, 4] xyxy pixels, "labels":
            int64 [K] in 0..C-1}``; K may be 0.
    """
    a = _anchor_tensor(anchors).to(output.device, output.dtype)
    img_h, img_w = _image_hw(image_size)
    p = _split(output, a.shape[0], num_classes)
    batch, num_anchors, grid_h, grid_w, _ = p.shape
    if len(targets) != batch:
        raise ValueError(f"targets must have one entry per image: {batch} expected, got {len(targets)}")
    stride_y, stride_x = img_h / grid_h, img_w / grid_w

    obj = torch.zeros(p.shape[:4], device=output.device, dtype=output.dtype)
    txy = torch.zeros(p.shape[:4] + (2,), device=output.device, dtype=output.dtype)
    twh = torch.zeros_like(txy)
    cls = torch.zeros(p.shape[:4], device=output.device, dtype=torch.long)
    for b, t in enumerate(targets):
        boxes = t["boxes"].to(output.device, output.dtype).reshape(-1, 4)
        labels = t["labels"].to(output.device).reshape(-1)
        if boxes.shape[0] != labels.shape[0]:
            raise ValueError(f"targets[{b}]: boxes {tuple(boxes.shape)} and labels {tuple(labels.shape)} "
                             "must have the same number of rows")
        if boxes.shape[0] == 0:
            continue
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"targets[{b}]['labels'] must be in 0..{num_classes - 1}, got {labels.tolist()}")
        # Centre and size in grid cells.
        gx = (boxes[:, 0] + boxes[:, 2]) / 2 / stride_x
        gy = (boxes[:, 1] + boxes[:, 3]) / 2 / stride_y
        wh = torch.stack([(boxes[:, 2] - boxes[:, 0]) / stride_x,
                          (boxes[:, 3] - boxes[:, 1]) / stride_y], -1).clamp(min=1e-6)
        i = gx.floor().long().clamp(0, grid_w - 1)
        j = gy.floor().long().clamp(0, grid_h - 1)
        best = _wh_iou(wh, a).argmax(1)
        obj[b, best, j, i] = 1
        txy[b, best, j, i] = torch.stack([gx - i, gy - j], -1).clamp(0, 1)
        twh[b, best, j, i] = torch.log(wh / a[best])
        cls[b, best, j, i] = labels

    pos = obj > 0
    obj_loss = F.binary_cross_entropy_with_logits(p[..., 4], obj, reduction="none")
    loss = (obj_loss * torch.where(pos, torch.ones_like(obj), torch.full_like(obj, noobj_weight))).sum()
    if bool(pos.any()):
        pp = p[pos]
        loss = loss + coord_weight * (
            F.mse_loss(torch.sigmoid(pp[:, 0:2]), txy[pos], reduction="sum")
            + F.mse_loss(pp[:, 2:4], twh[pos], reduction="sum"))
        loss = loss + F.cross_entropy(pp[:, 5:], cls[pos], reduction="sum")
    return loss / batch
