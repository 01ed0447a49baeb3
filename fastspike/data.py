"""Datasets for examples and tests that need no download.

* :func:`digits` -- scikit-learn's bundled 8x8 handwritten digits as a TensorDataset.
* :class:`SyntheticScenes` -- procedurally generated detection / segmentation scenes
  (coloured circles, squares and triangles on a textured background), deterministic per index.
* :func:`image_folder`, :func:`voc_detection`, :func:`voc_segmentation` -- thin wrappers
  over torchvision datasets that are already on disk (never downloaded);
  :class:`VOCBoxes` and :class:`VOCMasks` turn VOC samples into the ``(image, target)``
  form of :class:`SyntheticScenes`, so the same models, metrics and
  :func:`collate_scenes` apply to both.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = [
    "digits", "SyntheticScenes", "collate_scenes",
    "image_folder", "voc_detection", "voc_segmentation", "find_voc", "VOCBoxes", "VOCMasks",
    "VOC_CLASSES", "DatasetError",
]

# PASCAL VOC's 20 object classes in the devkit's order (label c is VOC_CLASSES[c];
# segmentation masks use c + 1, with 0 for background and 255 for "void").
VOC_CLASSES: Tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)


class DatasetError(ValueError):
    """Data on disk that cannot be used as asked (layout, class names, label values);
    the message names the file or folder and the problem."""


def digits(split: str = "train", test_fraction: float = 0.25, seed: int = 0) -> TensorDataset:
    """scikit-learn's ``load_digits`` as a :class:`~torch.utils.data.TensorDataset`.

    Images are float32 ``[N, 1, 8, 8]`` in ``[0, 1]`` (raw values 0..16 divided by 16),
    labels int64 ``[N]`` in 0..9. The train/test split is stratified by class and
    depends only on ``seed`` and ``test_fraction``, so "train" and "test" with the same
    arguments are disjoint and together cover the whole set.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction: expected a float in (0, 1), got {test_fraction!r}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    index = list(range(len(bunch.target)))
    train_idx, test_idx = train_test_split(
        index, test_size=test_fraction, random_state=seed, stratify=bunch.target)
    idx = torch.as_tensor(sorted(train_idx if split == "train" else test_idx), dtype=torch.long)
    images = torch.as_tensor(bunch.images, dtype=torch.float32)[idx].unsqueeze(1) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)[idx]
    return TensorDataset(images, labels)


# Base colours per shape class (circle, square, triangle): far apart so the class is
# recoverable from colour as well as from shape.
_CLASS_COLOURS = torch.tensor([[0.90, 0.20, 0.15], [0.15, 0.75, 0.20], [0.20, 0.30, 0.90]])
_MIN_VISIBLE_PIXELS = 20


class SyntheticScenes(Dataset):
    """Procedural scenes for detection and semantic segmentation.

    Image ``i`` is generated from ``(seed, i)`` with its own :class:`torch.Generator`, so any
    index can be produced on its own (safe with DataLoader workers, no state kept).
    Each scene has a textured background and 1..``max_objects`` shapes; class 0 is a filled
    circle, 1 a filled square/rectangle, 2 a filled triangle. Later shapes occlude earlier ones.

    ``__getitem__`` returns ``(image, target)``: ``image`` float32 ``[3, H, W]`` in ``[0, 1]``;
    ``target`` a dict with ``"boxes"`` float32 ``[K, 4]`` (pixel xyxy, tight around each
    object's *visible* pixels, x2/y2 exclusive), ``"labels"`` int64 ``[K]`` and ``"mask"``
    int64 ``[H, W]`` (0 background, ``c + 1`` for class ``c``). Objects with fewer than 20
    visible pixels are dropped and their pixels repainted as background, so image, mask
    and boxes always agree.
    """

    def __init__(self, num_images: int, image_size: int = 64, num_classes: int = 3,
                 max_objects: int = 3, seed: int = 0) -> None:
        if int(num_images) < 0:
            raise ValueError(f"num_images: expected an int >= 0, got {num_images!r}")
        if int(image_size) < 16:
            raise ValueError(f"image_size: expected an int >= 16, got {image_size!r}")
        if not 1 <= int(num_classes) <= 3:
            raise ValueError(f"num_classes: expected an int in 1..3, got {num_classes!r}")
        if int(max_objects) < 1:
            raise ValueError(f"max_objects: expected an int >= 1, got {max_objects!r}")
        self.num_images = int(num_images)
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        self.max_objects = int(max_objects)
        self.seed = int(seed)
        coords = torch.arange(self.image_size, dtype=torch.float32) + 0.5  # pixel centres
        self._yy, self._xx = torch.meshgrid(coords, coords, indexing="ij")

    def __len__(self) -> int:
        return self.num_images

    def _generator(self, index: int) -> torch.Generator:
        # Mix seed and index into one 63-bit value so neighbouring (seed, index) pairs
        # do not share streams.
        mixed = (self.seed * 1_000_003 + index * 7919 + 0x9E3779B9) % (2 ** 63 - 1)
        return torch.Generator().manual_seed(mixed)

    def _background(self, g: torch.Generator) -> torch.Tensor:
        size, xx, yy = self.image_size, self._xx, self._yy
        base = 0.35 + 0.3 * torch.rand(3, 1, 1, generator=g)
        theta = float(torch.rand((), generator=g)) * 2 * math.pi
        ramp = (xx * math.cos(theta) + yy * math.sin(theta)) / size  # smooth gradient
        period = 4.0 + 8.0 * float(torch.rand((), generator=g))
        phi = float(torch.rand((), generator=g)) * 2 * math.pi
        stripes = torch.sin(2 * math.pi * (xx * math.sin(theta) - yy * math.cos(theta)) / period + phi)
        tint = torch.rand(3, 1, 1, generator=g) - 0.5
        noise = 0.04 * torch.randn(3, size, size, generator=g)
        return base + 0.2 * tint * ramp + 0.05 * stripes + noise

    def _shape(self, cls: int, g: torch.Generator) -> torch.Tensor:
        size, xx, yy = self.image_size, self._xx, self._yy
        lo, hi = size / 8.0, size / 3.0
        extent = lo + (hi - lo) * float(torch.rand((), generator=g))
        half = extent / 2.0
        # Keep the shape's bounding square inside the image.
        cx = half + (size - extent) * float(torch.rand((), generator=g))
        cy = half + (size - extent) * float(torch.rand((), generator=g))
        if cls == 0:
            return (xx - cx) ** 2 + (yy - cy) ** 2 <= half ** 2
        if cls == 1:
            aspect = 0.6 + 0.4 * float(torch.rand((), generator=g))  # rectangle of ratio 0.6..1
            hw, hh = (half, half * aspect) if float(torch.rand((), generator=g)) < 0.5 else (half * aspect, half)
            return ((xx - cx).abs() <= hw) & ((yy - cy).abs() <= hh)
        # Triangle: apex up or down, tested with three half-planes (edge functions).
        flip = -1.0 if float(torch.rand((), generator=g)) < 0.5 else 1.0
        verts = [(cx, cy - flip * half), (cx - half, cy + flip * half), (cx + half, cy + flip * half)]
        signs = []
        for (x0, y0), (x1, y1) in zip(verts, verts[1:] + verts[:1]):
            signs.append((x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0))
        e0, e1, e2 = signs
        return ((e0 >= 0) & (e1 >= 0) & (e2 >= 0)) | ((e0 <= 0) & (e1 <= 0) & (e2 <= 0))

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if index < 0:
            index += self.num_images
        if not 0 <= index < self.num_images:
            raise IndexError(f"index: expected 0 <= index < {self.num_images}, got {index}")
        g = self._generator(index)
        size = self.image_size
        image = self._background(g)

        count = 1 + int(torch.randint(self.max_objects, (), generator=g))
        owner = torch.zeros(size, size, dtype=torch.long)  # 0 = background, k + 1 = object k
        classes, colours = [], []
        for k in range(count):
            cls = int(torch.randint(self.num_classes, (), generator=g))
            colour = (_CLASS_COLOURS[cls] + 0.08 * (2 * torch.rand(3, generator=g) - 1)).clamp(0, 1)
            owner[self._shape(cls, g)] = k + 1  # later shapes occlude earlier ones
            classes.append(cls)
            colours.append(colour)

        boxes, labels = [], []
        mask = torch.zeros(size, size, dtype=torch.long)
        for k, (cls, colour) in enumerate(zip(classes, colours)):
            visible = owner == k + 1
            if int(visible.sum()) < _MIN_VISIBLE_PIXELS:
                continue  # left as background in both image and mask
            ys, xs = visible.nonzero(as_tuple=True)
            boxes.append([float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1])
            labels.append(cls)
            mask[visible] = cls + 1
            image = torch.where(visible, colour.view(3, 1, 1), image)

        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "mask": mask,
        }
        return image.clamp_(0.0, 1.0).contiguous(), target


def collate_scenes(batch: Sequence[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]
                   ) -> Tuple[torch.Tensor, List[Dict[str, torch.Tensor]]]:
    """DataLoader ``collate_fn`` for :class:`SyntheticScenes`: stacks the images into
    ``[B, 3, H, W]`` and keeps the per-image targets as a list (box counts differ)."""
    images = torch.stack([item[0] for item in batch])
    return images, [item[1] for item in batch]


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: expected an existing directory, got {path!r} (nothing is downloaded)")


def image_folder(root: str, image_size: int, transform: Optional[Callable[..., Any]] = None):
    """``torchvision.datasets.ImageFolder`` at ``root`` (one sub-folder per class).

    By default images are resized (short side) and centre-cropped to ``image_size`` and
    converted to float tensors in ``[0, 1]``.
    """
    from torchvision import datasets, transforms

    _require_dir(os.fspath(root), "root")
    if transform is None:
        transform = transforms.Compose([
            transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor()])
    return datasets.ImageFolder(os.fspath(root), transform=transform)


_VOC_YEAR = re.compile(r"VOC(\d{4})")


def _voc_years(devkit: str) -> List[str]:
    return sorted(m.group(1) for d in os.listdir(devkit)
                  if (m := _VOC_YEAR.fullmatch(d)) and os.path.isdir(os.path.join(devkit, d)))


def find_voc(root: str, year: Optional[str] = None) -> Tuple[str, str]:
    """``(torchvision_root, year)`` for a PASCAL VOC copy on disk.

    ``root`` may be the folder holding ``VOCdevkit``, the ``VOCdevkit`` folder, or a
    ``VOCdevkit/VOC<year>`` folder itself (the one with ``JPEGImages``, ``Annotations``,
    ``SegmentationClass``, ``ImageSets``). ``year`` is read from the folder name when not
    given (an error when ``VOCdevkit`` holds several years). torchvision's VOC classes
    want the folder above ``VOCdevkit`` and the year; that is what is returned.

    Raises FileNotFoundError when nothing VOC-like is there, :class:`DatasetError` when
    the layout is ambiguous or not the one torchvision reads.
    """
    root = os.path.abspath(os.fspath(root))
    _require_dir(root, "root")
    if year is not None:
        year = str(year)
    name, parent = os.path.basename(root), os.path.dirname(root)
    m = _VOC_YEAR.fullmatch(name)
    if m and os.path.basename(parent) == "VOCdevkit":
        if year is not None and year != m.group(1):
            raise DatasetError(f"root: {root!r} is the VOC{m.group(1)} folder, but year={year!r} was asked for")
        return os.path.dirname(parent), m.group(1)
    devkit = root if name == "VOCdevkit" else os.path.join(root, "VOCdevkit")
    if os.path.isdir(devkit):
        years = _voc_years(devkit)
        if year is not None and year in years:
            return os.path.dirname(devkit), year
        if year is None and len(years) == 1:
            return os.path.dirname(devkit), years[0]
        if year is None and len(years) > 1:
            raise DatasetError(f"root: {devkit!r} holds VOC{', VOC'.join(years)}; point at one of those "
                               "folders (or pass year=)")
    if os.path.isdir(os.path.join(root, "JPEGImages")):
        raise DatasetError(f"root: {root!r} looks like a VOC folder, but torchvision reads VOC only as "
                           "<root>/VOCdevkit/VOC<year>/ (e.g. VOCdevkit/VOC2012/JPEGImages): move or link it there")
    wanted = f"VOC{year}" if year is not None else "VOC<year>, e.g. VOC2012"
    raise FileNotFoundError(f"root: expected a PASCAL VOC copy at {root!r} (<root>/VOCdevkit/{wanted}/ with "
                            "JPEGImages, Annotations, SegmentationClass and ImageSets, or that folder itself); "
                            "nothing is downloaded")


def _torchvision_voc(kind: str, root: str, year: Optional[str], image_set: str, kwargs: Dict[str, Any]):
    from torchvision import datasets

    root, year = find_voc(root, year)
    return getattr(datasets, kind)(root, year=year, image_set=image_set, download=False, **kwargs)


def voc_detection(root: str, year: Optional[str] = None, image_set: str = "val", **kwargs: Any):
    """``torchvision.datasets.VOCDetection`` on an existing copy (``download=False``).

    ``root`` and ``year`` are resolved by :func:`find_voc`. Extra keyword arguments
    (``transform``, ``target_transform``, ``transforms``, e.g. :class:`VOCBoxes`) are
    passed on.
    """
    return _torchvision_voc("VOCDetection", root, year, image_set, kwargs)


def voc_segmentation(root: str, year: Optional[str] = None, image_set: str = "val", **kwargs: Any):
    """``torchvision.datasets.VOCSegmentation`` on an existing copy (``download=False``).

    ``root`` and ``year`` are resolved by :func:`find_voc`. Extra keyword arguments
    (``transform``, ``target_transform``, ``transforms``, e.g. :class:`VOCMasks`) are
    passed on.
    """
    return _torchvision_voc("VOCSegmentation", root, year, image_set, kwargs)


def _resized_image(image: Any, image_size: int) -> torch.Tensor:
    from torchvision.transforms import functional as TF

    # A square input, as the models are evaluated on: the aspect ratio is not kept.
    return TF.to_tensor(TF.resize(image.convert("RGB"), [image_size, image_size], antialias=True))


class VOCBoxes:
    """``transforms=`` for :func:`voc_detection`: a VOC sample as ``(image, target)``.

    ``image`` is float32 ``[3, S, S]`` in ``[0, 1]`` (resized to ``image_size``, aspect
    ratio not kept); ``target`` holds ``"boxes"`` float32 ``[K, 4]`` (pixel xyxy in the
    resized image, x2/y2 exclusive: VOC's 1-based inclusive ``xmin..xmax`` becomes
    ``xmin - 1 .. xmax``), ``"labels"`` int64 ``[K]`` (index of the object's name in
    ``classes``) and ``"difficult"`` bool ``[K]``. An object name not in ``classes``
    raises :class:`DatasetError` naming the image.
    """

    def __init__(self, image_size: int, classes: Sequence[str] = VOC_CLASSES) -> None:
        if int(image_size) < 1:
            raise ValueError(f"image_size: expected an int >= 1, got {image_size!r}")
        if not classes or len(set(classes)) != len(classes):
            raise ValueError(f"classes: expected distinct class names, got {list(classes)!r}")
        self.image_size = int(image_size)
        self.classes = tuple(classes)
        self._index = {name: i for i, name in enumerate(self.classes)}

    def __call__(self, image: Any, annotation: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        ann = annotation["annotation"]
        objects = ann.get("object", [])
        objects = objects if isinstance(objects, list) else [objects]
        width, height = image.size
        sx, sy = self.image_size / width, self.image_size / height
        boxes, labels, difficult = [], [], []
        for obj in objects:
            name = obj["name"].strip()
            if name not in self._index:
                raise DatasetError(f"{ann.get('filename', '?')}: object class {name!r} is not among the classes "
                                   f"{list(self.classes)}")
            b = obj["bndbox"]
            boxes.append([(float(b["xmin"]) - 1) * sx, (float(b["ymin"]) - 1) * sy,
                          float(b["xmax"]) * sx, float(b["ymax"]) * sy])
            labels.append(self._index[name])
            difficult.append(str(obj.get("difficult", "0")).strip() == "1")
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "difficult": torch.tensor(difficult, dtype=torch.bool),
        }
        return _resized_image(image, self.image_size), target


class VOCMasks:
    """``transforms=`` for :func:`voc_segmentation`: a VOC sample as ``(image, target)``.

    ``image`` as in :class:`VOCBoxes`; ``target["mask"]`` is int64 ``[S, S]``, the palette
    indices of the ``SegmentationClass`` PNG resized with nearest neighbours (0 background,
    ``c + 1`` for class ``c``, 255 "void", which :class:`~fastspike.metrics.SegmentationMeter`
    ignores). With ``num_classes`` given, any other value ``>= num_classes`` raises
    :class:`DatasetError`.
    """

    def __init__(self, image_size: int, num_classes: Optional[int] = None, ignore_index: int = 255) -> None:
        if int(image_size) < 1:
            raise ValueError(f"image_size: expected an int >= 1, got {image_size!r}")
        if num_classes is not None and int(num_classes) < 1:
            raise ValueError(f"num_classes: expected an int >= 1 or None, got {num_classes!r}")
        self.image_size = int(image_size)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.ignore_index = int(ignore_index)

    def __call__(self, image: Any, mask: Any) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        import numpy as np
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        where = getattr(mask, "filename", "") or "a mask"  # PIL keeps the path of an opened file
        if mask.mode not in ("P", "L"):
            raise DatasetError(f"{where}: expected a palette (P) or grey (L) PNG of "
                               f"class indices, got mode {mask.mode!r}")
        mask = TF.resize(mask, [self.image_size, self.image_size], interpolation=InterpolationMode.NEAREST)
        labels = torch.as_tensor(np.array(mask), dtype=torch.int64)
        if self.num_classes is not None:
            bad = (labels >= self.num_classes) & (labels != self.ignore_index)
            if bool(bad.any()):
                raise DatasetError(f"{where}: label values "
                                   f"{sorted(set(labels[bad].tolist()))} do not fit a model with {self.num_classes} "
                                   f"classes (0..{self.num_classes - 1}, {self.ignore_index} = ignored)")
        return _resized_image(image, self.image_size), {"mask": labels}
