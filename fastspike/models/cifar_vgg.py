"""VGG-16 for CIFAR (32x32 inputs), as converted in the QCFS paper.

Conv-BN-ReLU layers with 2x2 pooling; after five pools a 32x32 image is 1x1,
so the classifier is Flatten + three linear layers (QCFS's CIFAR head) with no
adaptive pooling. Pooling is average by default (QCFS converts average pools:
they are linear, so they pass spikes through exactly); ``pool="max"`` builds
the max-pool variant to exercise the converter's max-pool handling.
"""

from __future__ import annotations

from typing import List, Sequence, Union

import torch
from torch import nn

from .cifar_resnet import init_weights

__all__ = ["VGG16_CFG", "CifarVGG", "cifar_vgg16"]

# Channel counts of the conv layers, "M" a 2x2 pool.
VGG16_CFG: List[Union[int, str]] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
]


class CifarVGG(nn.Module):
    """VGG with BatchNorm for 32x32 inputs: ``features`` then ``classifier``.

    Args:
        cfg: conv channel counts and ``"M"`` for a 2x2 pool, e.g. :data:`VGG16_CFG`.
        num_classes: size of the last linear layer.
        in_channels: channels of the input image.
        pool: ``"avg"`` (default) or ``"max"``.
        width: multiplier on every conv's channel count (e.g. ``0.125`` for a
            tiny test model); counts are rounded, at least 1.
        hidden: size of the two hidden linear layers (4096 in QCFS).
        dropout: dropout probability after each hidden layer.

    The classifier expects a 1x1 feature map, i.e. an input side of
    ``2 ** (number of pools)`` (32 for VGG-16).
    """

    def __init__(
        self,
        cfg: Sequence[Union[int, str]] = VGG16_CFG,
        num_classes: int = 10,
        in_channels: int = 3,
        pool: str = "avg",
        width: float = 1.0,
        hidden: int = 4096,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f'pool must be "avg" or "max", got {pool!r}')
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        layers: List[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.AvgPool2d(2, 2) if pool == "avg" else nn.MaxPool2d(2, 2))
                continue
            out = max(1, int(round(int(v) * width)))
            # Conv without bias: the BN after it carries the shift (and folds into it).
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(channels, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def cifar_vgg16(
    num_classes: int = 10,
    in_channels: int = 3,
    pool: str = "avg",
    width: float = 1.0,
    hidden: int = 4096,
    dropout: float = 0.5,
) -> CifarVGG:
    """CIFAR VGG-16 with BatchNorm (13 conv + 3 linear layers, 15 ReLU call sites); see :class:`CifarVGG`."""
    return CifarVGG(
        VGG16_CFG, num_classes=num_classes, in_channels=in_channels,
        pool=pool, width=width, hidden=hidden, dropout=dropout,
    )
