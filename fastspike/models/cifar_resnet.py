"""CIFAR-style ResNets, as converted in the QCFS and Fast-SNN papers.

Unlike the ImageNet ResNets of torchvision, the stem is a single 3x3 conv with
stride 1 and no max-pool, so a 32x32 image keeps its resolution in the first
stage. Every ReLU call site is its own ``nn.ReLU`` module, so a converter can
give each one its own quantizer / spiking neuron, and ``forward`` has no
data-dependent control flow, so ``torch.fx.symbolic_trace`` sees the whole net.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["BasicBlock", "CifarResNet", "cifar_resnet18", "cifar_resnet20"]


class BasicBlock(nn.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, residual add, then ReLU.

    The shortcut is the identity when shape is unchanged, otherwise a 1x1
    conv + BN projection (option B): it keeps every path made of layers the
    converter folds (conv+BN), with no zero-padding trick.
    """

    expansion: int = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # A distinct module after the add (torchvision reuses one): one module per call site.
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stem, stages of :class:`BasicBlock`, global avg pool, linear.

    Args:
        blocks: number of blocks per stage, e.g. ``[2, 2, 2, 2]`` (ResNet-18)
            or ``[3, 3, 3]`` (ResNet-20).
        widths: output channels of each stage (same length as ``blocks``); the
            stem has ``widths[0]`` channels. Every stage after the first
            halves the resolution.
        num_classes: size of the linear head.
        in_channels: channels of the input image.
    """

    def __init__(
        self,
        blocks: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(blocks) != len(widths) or not blocks:
            raise ValueError(f"blocks {list(blocks)} and widths {list(widths)} need the same, non-zero length")
        # 3x3 stem without max-pool: the CIFAR variant the papers convert.
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages = []
        in_planes = widths[0]
        for i, (n, planes) in enumerate(zip(blocks, widths)):
            layers = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        # Named layer1..layerN like torchvision, so state dicts and qualnames read alike.
        for i, stage in enumerate(stages, start=1):
            self.add_module(f"layer{i}", stage)
        self.num_stages = len(stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        # num_stages is fixed at construction, so FX unrolls this loop.
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(self.flatten(self.avgpool(x)))


def init_weights(model: nn.Module) -> None:
    """torchvision's ResNet init, shared by the CIFAR models: He-normal convs, BN as identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def cifar_resnet18(num_classes: int = 10, base_width: int = 64, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-18: blocks [2, 2, 2, 2], widths ``base_width`` x [1, 2, 4, 8] (64-128-256-512).

    17 ReLU call sites (stem + 2 per block).
    """
    widths = [base_width * m for m in (1, 2, 4, 8)]
    return CifarResNet([2, 2, 2, 2], widths, num_classes=num_classes, in_channels=in_channels)


def cifar_resnet20(num_classes: int = 10, base_width: int = 16, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-20: blocks [3, 3, 3], widths ``base_width`` x [1, 2, 4] (16-32-64).

    19 ReLU call sites (stem + 2 per block).
    """
    widths = [base_width * m for m in (1, 2, 4)]
    return CifarResNet([3, 3, 3], widths, num_classes=num_classes, in_channels=in_channels)
