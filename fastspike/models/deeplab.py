"""DeepLabv3 segmentation networks for conversion: a small one for tests and
torchvision's ResNet-50 one, unchanged.

The image-pooling branch (global average pool, 1x1 conv, BN, ReLU, bilinear
upsample back) and the final bilinear upsample are linear in their input, so
they stay as they are in the converted network; every ReLU becomes a neuron.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ASPP", "SmallDeepLab", "deeplabv3_resnet50"]


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, one dilated 3x3 branch per
    rate and the image-pooling branch, concatenated and projected by a 1x1
    conv-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int] = (2, 4)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, out_channels, kernel=1)]
            + [_conv_bn_relu(in_channels, out_channels, dilation=r) for r in rates])
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )
        self.project = _conv_bn_relu(out_channels * (len(rates) + 2), out_channels, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        # Size from the input's shape: fx records it as a node, so it follows the merged T*B batch.
        outs.append(F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False))
        return self.project(torch.cat(outs, 1))


class SmallDeepLab(nn.Module):
    """A small DeepLabv3: output-stride-8 conv-BN-ReLU backbone, ASPP, 1x1
    classifier and a bilinear upsample to the input size.

    The backbone is three stride-2 3x3 convs (``width``, ``2*width``,
    ``4*width`` channels) followed by two 3x3 convs dilated by 2 and 4 at
    stride 8; the ASPP has ``4*width`` channels and dilation ``rates``.

    Args:
        num_classes: C; the output is [B, C, H, W].
        width: base channel count.
        in_channels: image channels.
        rates: dilations of the ASPP's 3x3 branches (small, for small images).
    """

    def __init__(self, num_classes: int = 4, width: int = 16, in_channels: int = 3,
                 rates: Sequence[int] = (2, 4)) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        c = 4 * width
        self.backbone = nn.Sequential(
            _conv_bn_relu(in_channels, width, stride=2),
            _conv_bn_relu(width, 2 * width, stride=2),
            _conv_bn_relu(2 * width, c, stride=2),
            # Output stride stays 8: dilation grows the receptive field instead.
            _conv_bn_relu(c, c, dilation=2),
            _conv_bn_relu(c, c, dilation=4),
        )
        self.aspp = ASPP(c, c, rates)
        self.classifier = nn.Conv2d(c, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.classifier(self.aspp(self.backbone(x)))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def deeplabv3_resnet50(num_classes: int = 21) -> nn.Module:
    """torchvision's DeepLabv3-ResNet-50, random init, no auxiliary head.

    Its forward returns ``OrderedDict(out=[B, C, H, W])``; :func:`fastspike.to_snn`
    reads dict outputs out over time the same way.
    """
    from torchvision.models.segmentation import deeplabv3_resnet50 as build

    return build(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
