"""Evaluation metrics: VOC-style detection mAP and segmentation mIoU.

* :func:`mean_average_precision` / :class:`DetectionMeter` -- mAP at one IoU threshold with
  all-point interpolation (PASCAL VOC 2010+).
* :class:`SegmentationMeter` -- confusion-matrix based mIoU and pixel accuracy.
* :func:`accuracy` -- top-1 classification accuracy.

Meters keep plain tensors / Python lists so results can be combined across
``torch.distributed`` ranks (``all_reduce`` the confusion matrix, ``all_gather_object``
the detection state).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torchvision.ops import box_iou

__all__ = [
    "box_average_precision", "mean_average_precision", "DetectionMeter",
    "SegmentationMeter", "accuracy",
]


def _check_num_classes(num_classes: int) -> int:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes: expected an int >= 1, got {num_classes!r}")
    return num_classes


def _boxes(d: Mapping[str, Any], name: str, i: int) -> torch.Tensor:
    boxes = torch.as_tensor(d["boxes"], dtype=torch.float32).detach().cpu()
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name}[{i}]['boxes']: expected shape [N, 4], got {tuple(boxes.shape)}")
    return boxes


def _vector(d: Mapping[str, Any], key: str, n: int, name: str, i: int, dtype: torch.dtype) -> torch.Tensor:
    v = torch.as_tensor(d[key], dtype=dtype).detach().cpu().reshape(-1)
    if v.numel() != n:
        raise ValueError(f"{name}[{i}]['{key}']: expected {n} values (one per box), got {v.numel()}")
    return v


def box_average_precision(recall: torch.Tensor, precision: torch.Tensor) -> float:
    """All-point interpolated AP (VOC 2010+) from recall/precision at each ranked detection.

    The precision curve is replaced by its monotone upper envelope and integrated over
    recall: ``sum_i (r_i - r_{i-1}) * max_{j >= i} p_j``.
    """
    recall = torch.as_tensor(recall, dtype=torch.float64).reshape(-1)
    precision = torch.as_tensor(precision, dtype=torch.float64).reshape(-1)
    if recall.shape != precision.shape:
        raise ValueError(f"precision: expected the shape of recall {tuple(recall.shape)}, "
                         f"got {tuple(precision.shape)}")
    r = torch.cat([recall.new_zeros(1), recall, recall.new_ones(1)])
    p = torch.cat([precision.new_zeros(1), precision, precision.new_zeros(1)])
    # Upper envelope: precision at recall r is the best precision at any recall >= r.
    p = p.flip(0).cummax(0).values.flip(0)
    return float(((r[1:] - r[:-1]) * p[1:]).sum())


def mean_average_precision(predictions: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]],
                           num_classes: int, iou_threshold: float = 0.5) -> Dict[str, Any]:
    """VOC-style mAP at ``iou_threshold`` with all-point interpolation.

    ``predictions``: one dict per image with ``boxes`` [N, 4] (xyxy), ``scores`` [N], ``labels`` [N].
    ``targets``: one dict per image with ``boxes`` [M, 4] and ``labels`` [M], and optionally
    ``difficult`` [M] (bool, as in VOC annotations; absent means none is).

    Per class, detections from all images are ranked by descending score; each one is a
    true positive when its highest-IoU ground truth of the same class in the same image has
    IoU >= ``iou_threshold`` and was not matched by a higher-scored detection (VOC rule:
    a duplicate of a matched ground truth is a false positive). As in the VOC devkit,
    difficult objects do not count towards recall, and a detection whose best match is a
    difficult object is ignored (neither true nor false positive). Returns
    ``{"map": float, "ap_per_class": list[float]}``; classes without ground truth get
    ``nan`` and are left out of the mean (``map`` is ``nan`` if no class has any).
    """
    _check_num_classes(num_classes)
    if len(predictions) != len(targets):
        raise ValueError(f"predictions: expected one entry per target image ({len(targets)}), "
                         f"got {len(predictions)}")
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise ValueError(f"iou_threshold: expected a float in [0, 1], got {iou_threshold!r}")

    preds, gts = [], []
    for i, (p, t) in enumerate(zip(predictions, targets)):
        pb = _boxes(p, "predictions", i)
        ps = _vector(p, "scores", len(pb), "predictions", i, torch.float64)
        pl = _vector(p, "labels", len(pb), "predictions", i, torch.int64)
        tb = _boxes(t, "targets", i)
        tl = _vector(t, "labels", len(tb), "targets", i, torch.int64)
        td = (_vector(t, "difficult", len(tb), "targets", i, torch.bool) if "difficult" in t
              else torch.zeros(len(tb), dtype=torch.bool))
        for name, lab in (("predictions", pl), ("targets", tl)):
            if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
                raise ValueError(f"{name}[{i}]['labels']: expected values in 0..{num_classes - 1}, "
                                 f"got range {int(lab.min())}..{int(lab.max())}")
        preds.append((pb, ps, pl))
        gts.append((tb, tl, td))

    ap_per_class: List[float] = []
    for c in range(num_classes):
        gt_c = [tb[tl == c] for tb, tl, _ in gts]
        difficult_c = [td[tl == c] for _, tl, td in gts]
        n_gt = sum(int((~d).sum()) for d in difficult_c)
        if n_gt == 0:
            ap_per_class.append(math.nan)
            continue
        # Gather (score, image, box) for every detection of class c.
        # The IoUs of an image's detections with its ground truths come from one box_iou call per
        # image (elementwise, so the same numbers as one call per detection, at a fraction of the cost).
        scores, images, rows, ious_per_image = [], [], [], []
        for i, (pb, ps, pl) in enumerate(preds):
            keep = pl == c
            scores.append(ps[keep])
            n = int(keep.sum())
            images.extend([i] * n)
            rows.extend(range(n))
            ious_per_image.append(box_iou(pb[keep], gt_c[i]) if n and len(gt_c[i]) else None)
        scores_t = torch.cat(scores)
        if scores_t.numel() == 0:
            ap_per_class.append(0.0)
            continue
        order = torch.argsort(scores_t, descending=True, stable=True)
        matched = [torch.zeros(len(b), dtype=torch.bool) for b in gt_c]
        tp = torch.zeros(len(order), dtype=torch.float64)
        counted = torch.ones(len(order), dtype=torch.bool)
        for rank, j in enumerate(order.tolist()):
            img = images[j]
            if len(gt_c[img]) == 0:
                continue
            ious = ious_per_image[img][rows[j]]
            best = int(ious.argmax())
            if float(ious[best]) >= iou_threshold:
                if difficult_c[img][best]:
                    counted[rank] = False
                elif not matched[img][best]:
                    matched[img][best] = True
                    tp[rank] = 1.0
        tp = tp[counted]
        if tp.numel() == 0:  # every detection landed on a difficult object
            ap_per_class.append(0.0)
            continue
        ctp = tp.cumsum(0)
        recall = ctp / n_gt
        precision = ctp / torch.arange(1, len(tp) + 1, dtype=torch.float64)
        ap_per_class.append(box_average_precision(recall, precision))

    valid = [a for a in ap_per_class if not math.isnan(a)]
    return {"map": sum(valid) / len(valid) if valid else math.nan, "ap_per_class": ap_per_class}


class DetectionMeter:
    """Accumulates detection predictions and targets over batches for :func:`mean_average_precision`.

    Inputs are stored detached on the CPU. For distributed evaluation gather ``state()``
    from every rank (``torch.distributed.all_gather_object``) and combine with
    :meth:`from_states`, or :meth:`merge` meters directly.
    """

    def __init__(self, num_classes: int, iou_threshold: float = 0.5) -> None:
        self.num_classes = _check_num_classes(num_classes)
        self.iou_threshold = float(iou_threshold)
        self.predictions: List[Dict[str, torch.Tensor]] = []
        self.targets: List[Dict[str, torch.Tensor]] = []

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.predictions.clear()
        self.targets.clear()

    def update(self, preds: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]]) -> None:
        """Add one batch: lists of per-image prediction and target dicts (same length)."""
        if len(preds) != len(targets):
            raise ValueError(f"preds: expected one entry per target image ({len(targets)}), got {len(preds)}")
        for p in preds:
            self.predictions.append({k: torch.as_tensor(p[k]).detach().cpu() for k in ("boxes", "scores", "labels")})
        for t in targets:
            self.targets.append({k: torch.as_tensor(t[k]).detach().cpu() for k in ("boxes", "labels", "difficult")
                                 if k in t})

    def compute(self) -> Dict[str, Any]:
        """``mean_average_precision`` over everything accumulated."""
        return mean_average_precision(self.predictions, self.targets, self.num_classes, self.iou_threshold)

    def state(self) -> Dict[str, Any]:
        """Picklable snapshot (for ``all_gather_object``)."""
        return {"num_classes": self.num_classes, "iou_threshold": self.iou_threshold,
                "predictions": list(self.predictions), "targets": list(self.targets)}

    def merge(self, other: "DetectionMeter") -> "DetectionMeter":
        """Append ``other``'s images to this meter (in place); returns ``self``."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"other.num_classes: expected {self.num_classes}, got {other.num_classes}")
        self.predictions.extend(other.predictions)
        self.targets.extend(other.targets)
        return self

    @classmethod
    def from_states(cls, states: Iterable[Mapping[str, Any]]) -> "DetectionMeter":
        """Rebuild one meter from the :meth:`state` of several ranks."""
        states = list(states)
        if not states:
            raise ValueError("states: expected at least one state, got none")
        meter = cls(states[0]["num_classes"], states[0]["iou_threshold"])
        for s in states:
            if s["num_classes"] != meter.num_classes:
                raise ValueError(f"states[...]['num_classes']: expected {meter.num_classes}, got {s['num_classes']}")
            meter.predictions.extend(s["predictions"])
            meter.targets.extend(s["targets"])
        return meter


class SegmentationMeter:
    """Confusion-matrix segmentation metrics (mIoU, per-class IoU, pixel accuracy).

    ``confusion[t, p]`` counts pixels of true class ``t`` predicted as ``p``; it is a plain
    int64 tensor so a caller can ``torch.distributed.all_reduce`` it before :meth:`compute`.
    Pixels whose true label equals ``ignore_index`` are skipped.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = _check_num_classes(num_classes)
        self.ignore_index = int(ignore_index)
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        """Zero the confusion matrix."""
        self.confusion.zero_()

    def update(self, pred_labels: torch.Tensor, true_labels: torch.Tensor) -> None:
        """Add a batch of predicted and true label maps (same shape, e.g. ``[B, H, W]``)."""
        pred = torch.as_tensor(pred_labels)
        true = torch.as_tensor(true_labels)
        if pred.shape != true.shape:
            raise ValueError(f"pred_labels: expected the shape of true_labels {tuple(true.shape)}, "
                             f"got {tuple(pred.shape)}")
        if pred.is_floating_point() or true.is_floating_point():
            raise ValueError(f"pred_labels/true_labels: expected integer label maps, got {pred.dtype}/{true.dtype}")
        pred = pred.reshape(-1).long()
        true = true.reshape(-1).long().to(pred.device)
        keep = true != self.ignore_index
        pred, true = pred[keep], true[keep]
        C = self.num_classes
        for name, lab in (("pred_labels", pred), ("true_labels", true)):
            if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= C):
                raise ValueError(f"{name}: expected values in 0..{C - 1} (or ignore_index "
                                 f"{self.ignore_index} for truth), got range {int(lab.min())}..{int(lab.max())}")
        if self.confusion.device != pred.device:
            self.confusion = self.confusion.to(pred.device)
        self.confusion += torch.bincount(true * C + pred, minlength=C * C).reshape(C, C)

    def compute(self) -> Dict[str, Any]:
        """``{"miou", "iou_per_class", "pixel_accuracy"}``; classes absent from both
        prediction and truth get ``nan`` IoU and are left out of the mean."""
        cm = self.confusion.double().cpu()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        present = union > 0
        iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
        total = cm.sum()
        return {
            "miou": float(iou[present].mean()) if bool(present.any()) else math.nan,
            "iou_per_class": iou.tolist(),
            "pixel_accuracy": float(tp.sum() / total) if total > 0 else math.nan,
        }


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``logits`` [N, C] against ``labels`` [N]."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits/labels: expected shapes [N, C] and [N], got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    if labels.numel() == 0:
        return math.nan
    return float((logits.argmax(1) == labels).double().mean())
