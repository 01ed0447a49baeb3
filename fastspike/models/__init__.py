"""Model zoo of the conversion papers fastspike follows (QCFS, Fast-SNN, CS-QCFS, group neurons).

Plain PyTorch modules with ``nn.ReLU`` activations, traceable by
``torch.fx.symbolic_trace``, ready for :func:`fastspike.quantize`::

    from fastspike.models import get_model
    net = get_model("cifar_resnet20", num_classes=10)
    net = get_model("cifar_vgg16", num_classes=100, pool="max", width=0.5)
    net = get_model("resnet18", num_classes=1000)      # torchvision, random init
    net = get_model("tiny_yolov2", num_classes=3, width=0.25)   # detection: decode_yolo, yolo_loss
    net = get_model("small_deeplab", num_classes=4, width=8)    # segmentation

Nothing is downloaded: pretrained weights are loaded from a local file with
``net.load_state_dict(torch.load(path, weights_only=True))``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

from torch import nn

from .cifar_resnet import BasicBlock, CifarResNet, cifar_resnet18, cifar_resnet20
from .cifar_vgg import VGG16_CFG, CifarVGG, cifar_vgg16
from .digits import DigitsCNN
from .deeplab import ASPP, SmallDeepLab, deeplabv3_resnet50
from .yolo import DEFAULT_ANCHORS, TinyYOLOv2, YOLOv2ResNet34, decode_yolo, yolo_loss

__all__ = [
    "get_model", "available_models", "model_task", "TASKS",
    "CifarResNet", "BasicBlock", "cifar_resnet18", "cifar_resnet20",
    "CifarVGG", "VGG16_CFG", "cifar_vgg16",
    "TinyYOLOv2", "YOLOv2ResNet34", "DEFAULT_ANCHORS", "decode_yolo", "yolo_loss",
    "SmallDeepLab", "ASPP", "deeplabv3_resnet50", "DigitsCNN",
]

_CIFAR_MODELS: Dict[str, Callable[..., nn.Module]] = {
    "cifar_resnet18": cifar_resnet18,
    "cifar_resnet20": cifar_resnet20,
    "cifar_vgg16": cifar_vgg16,
    "digits_cnn": DigitsCNN,  # the 8x8 digits classifier of `fastspike demo`
}

# Detection and segmentation models (fastspike.models.yolo / .deeplab).
_DENSE_MODELS: Dict[str, Callable[..., nn.Module]] = {
    "tiny_yolov2": TinyYOLOv2,
    "yolov2_resnet34": YOLOv2ResNet34,
    "small_deeplab": SmallDeepLab,
    "deeplabv3_resnet50": deeplabv3_resnet50,
}

# torchvision entry points, built as torchvision.models.<name>(weights=None, num_classes=...).
_TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50", "vgg11_bn", "vgg16_bn")


# The task of every registered model: what the CLI trains, evaluates and
# fine-tunes it on (data, loss, metric). A new model is one entry above plus its task here.
_TASKS: Dict[str, str] = {
    **{name: "classification" for name in (*_CIFAR_MODELS, *_TORCHVISION_MODELS)},
    "tiny_yolov2": "detection", "yolov2_resnet34": "detection",
    "small_deeplab": "segmentation", "deeplabv3_resnet50": "segmentation",
}
TASKS = ("classification", "detection", "segmentation")


def model_task(name: str) -> str:
    """'classification', 'detection' or 'segmentation' for a name of :func:`available_models`."""
    if name not in _TASKS:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(available_models())}")
    return _TASKS[name]


def available_models() -> List[str]:
    """Names accepted by :func:`get_model`, sorted."""
    return sorted([*_CIFAR_MODELS, *_DENSE_MODELS, *_TORCHVISION_MODELS])


def get_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Builds the model ``name`` with randomly initialised weights.

    Args:
        name: one of :func:`available_models`. ``cifar_*`` models take 32x32
            inputs; the torchvision ones are the ImageNet architectures.
        num_classes: size of the classifier output.
        **kwargs: passed to the builder: for ``cifar_resnet18/20``
            ``base_width``, ``in_channels``; for ``cifar_vgg16`` ``in_channels``,
            ``pool``, ``width``, ``hidden``, ``dropout``; for torchvision names,
            any keyword of ``torchvision.models.<name>``; for ``tiny_yolov2``
            ``anchors``, ``width``, ``in_channels``, ``num_downsamples``; for
            ``yolov2_resnet34`` ``anchors``, ``width``; for ``small_deeplab``
            ``width``, ``in_channels``, ``rates``; ``deeplabv3_resnet50`` takes
            none (torchvision's model, unchanged, returning ``{"out": ...}``).

    Raises:
        ValueError: unknown ``name``, or pretrained weights requested
            (``weights=`` other than None, or ``pretrained=True``): nothing is
            downloaded, load a local checkpoint instead.
    """
    if kwargs.get("weights") is not None or kwargs.get("pretrained"):
        key = "weights" if kwargs.get("weights") is not None else "pretrained"
        raise ValueError(
            f"get_model({name!r}): {key}={kwargs[key]!r} is not supported; fastspike never downloads "
            "weights. Build the model without them and load pretrained weights from a local file: "
            "model = get_model(name, num_classes); model.load_state_dict(torch.load(path, weights_only=True))."
        )
    kwargs.pop("weights", None)
    kwargs.pop("pretrained", None)
    if name in _CIFAR_MODELS:
        return _CIFAR_MODELS[name](num_classes=num_classes, **kwargs)
    if name in _DENSE_MODELS:
        return _DENSE_MODELS[name](num_classes=num_classes, **kwargs)
    if name in _TORCHVISION_MODELS:
        try:
            import torchvision
        except ImportError as e:  # torchvision is optional: only these names need it
            raise ImportError(f"get_model({name!r}) needs torchvision (pip install torchvision)") from e
        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes, **kwargs)
    raise ValueError(f"unknown model {name!r}; available models: {', '.join(available_models())}")
