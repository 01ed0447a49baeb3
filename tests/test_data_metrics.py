"""Tests for fastspike.data (download-free datasets) and fastspike.metrics (mAP, mIoU)."""

import math

import pytest
import torch
from torch.utils.data import DataLoader

from fastspike.data import (
    VOC_CLASSES, DatasetError, SyntheticScenes, VOCBoxes, VOCMasks, collate_scenes, digits, find_voc,
    image_folder, voc_detection, voc_segmentation,
)
from fastspike.metrics import (
    DetectionMeter, SegmentationMeter, accuracy, box_average_precision, mean_average_precision,
)


# ----------------------------------------------------------------------------- digits

def test_digits_shapes_ranges_and_split():
    train, test = digits("train"), digits("test")
    xtr, ytr = train.tensors
    xte, yte = test.tensors
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert xtr.shape[1:] == (1, 8, 8) and xte.shape[1:] == (1, 8, 8)
    assert len(train) + len(test) == 1797  # sklearn's digits size
    assert abs(len(test) / 1797 - 0.25) < 0.01
    for x in (xtr, xte):
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert set(ytr.tolist()) == set(range(10)) and set(yte.tolist()) == set(range(10))
    # Disjoint and complete: train + test is exactly the full set as a multiset of
    # (image, label) rows, so no index is used twice or left out.
    from collections import Counter

    from sklearn.datasets import load_digits

    full = load_digits()
    rows = lambda x, y: Counter(zip(map(tuple, x.reshape(len(x), -1).tolist()), y.tolist()))
    expected = rows(torch.as_tensor(full.images, dtype=torch.float32) / 16.0, torch.as_tensor(full.target))
    assert rows(xtr, ytr) + rows(xte, yte) == expected


def test_digits_deterministic_and_seeded():
    a, b = digits("test", seed=3), digits("test", seed=3)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    c = digits("test", seed=4)
    assert not torch.equal(a.tensors[0], c.tensors[0])


def test_digits_bad_split():
    with pytest.raises(ValueError, match="split"):
        digits("val")
    with pytest.raises(ValueError, match="test_fraction"):
        digits("train", test_fraction=1.5)


# ----------------------------------------------------------------------------- scenes

def test_scenes_deterministic_and_types():
    ds = SyntheticScenes(8, image_size=48, seed=1)
    for i in range(len(ds)):
        im1, t1 = ds[i]
        im2, t2 = ds[i]
        assert torch.equal(im1, im2)
        for k in ("boxes", "labels", "mask"):
            assert torch.equal(t1[k], t2[k])
        assert im1.shape == (3, 48, 48) and im1.dtype == torch.float32
        assert float(im1.min()) >= 0.0 and float(im1.max()) <= 1.0
        assert t1["boxes"].dtype == torch.float32 and t1["boxes"].shape[1:] == (4,)
        assert t1["labels"].dtype == torch.int64 and len(t1["labels"]) == len(t1["boxes"])
        assert t1["mask"].shape == (48, 48) and t1["mask"].dtype == torch.int64
    # Generated on its own: a fresh dataset object gives the same scene for index 5.
    assert torch.equal(SyntheticScenes(8, image_size=48, seed=1)[5][0], ds[5][0])


def test_scenes_boxes_consistent_with_mask():
    ds = SyntheticScenes(40, image_size=64, num_classes=3, max_objects=4, seed=0)
    H = W = 64
    seen = set()
    for i in range(len(ds)):
        _, t = ds[i]
        boxes, labels, mask = t["boxes"], t["labels"], t["mask"]
        assert int(mask.min()) >= 0 and int(mask.max()) <= 3
        if len(boxes):
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
            assert (boxes[:, 2] <= W).all() and (boxes[:, 3] <= H).all()
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        for c in range(3):
            union = torch.zeros(H, W, dtype=torch.bool)
            for b in boxes[labels == c]:
                x1, y1, x2, y2 = b.long().tolist()
                inside = (xx >= x1) & (xx < x2) & (yy >= y1) & (yy < y2)
                # Each box is tight: it touches class-c pixels on all four sides.
                hit = inside & (mask == c + 1)
                ys, xs = hit.nonzero(as_tuple=True)
                assert int(xs.min()) == x1 and int(xs.max()) == x2 - 1
                assert int(ys.min()) == y1 and int(ys.max()) == y2 - 1
                union |= inside
            assert not ((mask == c + 1) & ~union).any(), "class pixels outside every box of that class"
            assert (mask == c + 1).any() == bool((labels == c).any())
        seen.update(labels.tolist())
    assert seen == {0, 1, 2}


def test_scenes_seeds_differ_and_validation():
    a, b = SyntheticScenes(2, seed=0), SyntheticScenes(2, seed=1)
    assert not torch.equal(a[0][0], b[0][0])
    assert not torch.equal(a[0][0], a[1][0])
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticScenes(2, num_classes=4)
    with pytest.raises(IndexError):
        a[2]
    # Fewer classes: labels stay in range.
    ds = SyntheticScenes(10, num_classes=2, seed=2)
    for i in range(len(ds)):
        assert all(0 <= c <= 1 for c in ds[i][1]["labels"].tolist())


def test_scenes_dataloader_collate():
    ds = SyntheticScenes(6, image_size=32, seed=0)
    images, targets = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_scenes)))
    assert images.shape == (4, 3, 32, 32)
    assert isinstance(targets, list) and len(targets) == 4
    assert torch.equal(targets[2]["mask"], ds[2][1]["mask"])


def test_wrappers_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        image_folder(missing, 32)
    with pytest.raises(FileNotFoundError, match="VOC2012"):
        voc_detection(tmp_path)


# ----------------------------------------------------------------------------- mAP

def _pred(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels)}


def _gt(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels)}


def test_map_perfect():
    targets = [_gt([[0, 0, 10, 10], [20, 20, 30, 35]], [0, 1]), _gt([[5, 5, 15, 15]], [1])]
    preds = [_pred(t["boxes"].tolist(), [0.9] * len(t["labels"]), t["labels"].tolist()) for t in targets]
    out = mean_average_precision(preds, targets, num_classes=3)
    assert out["map"] == pytest.approx(1.0)
    assert out["ap_per_class"][:2] == pytest.approx([1.0, 1.0])
    assert math.isnan(out["ap_per_class"][2])  # class 2 has no ground truth: excluded


def test_map_hand_computed_false_positive_in_between():
    # Two GT of class 0 (one per image); three detections ranked by score:
    #   0.9 -> hits GT A (TP)   precision 1/1, recall 1/2
    #   0.8 -> nothing   (FP)   precision 1/2, recall 1/2
    #   0.7 -> hits GT B (TP)   precision 2/3, recall 2/2
    # Envelope: p(r<=0.5) = max(1, 1/2, 2/3) = 1, p(0.5<r<=1) = 2/3.
    # All-point AP = 0.5 * 1 + 0.5 * 2/3 = 0.8333...
    targets = [_gt([[0, 0, 10, 10]], [0]), _gt([[10, 10, 20, 20]], [0])]
    preds = [_pred([[0, 0, 10, 10], [40, 40, 50, 50]], [0.9, 0.8], [0, 0]),
             _pred([[10, 10, 20, 21]], [0.7], [0])]
    out = mean_average_precision(preds, targets, num_classes=1)
    assert out["map"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_map_wrong_class_and_duplicates():
    targets = [_gt([[0, 0, 10, 10]], [0])]
    # Right box, wrong class: class 0 has no detection (AP 0); class 1 has no GT (nan).
    out = mean_average_precision([_pred([[0, 0, 10, 10]], [0.9], [1])], targets, num_classes=2)
    assert out["ap_per_class"][0] == 0.0 and math.isnan(out["ap_per_class"][1])
    assert out["map"] == 0.0
    # A second detection of an already matched GT is a FP. Ranks: TP (p=1, r=1),
    # FP (p=1/2, r=1); the envelope keeps p=1 up to r=1 -> AP = 1.
    out = mean_average_precision([_pred([[0, 0, 10, 10], [0, 0, 10, 11]], [0.9, 0.8], [0, 0])],
                                 targets, num_classes=1)
    assert out["map"] == pytest.approx(1.0)
    # With a second GT found only after the duplicate: TP, FP(dup), TP ->
    # precisions 1, 1/2, 2/3 at recalls 1/2, 1/2, 1 -> AP = 0.5 + 0.5 * 2/3.
    targets2 = [_gt([[0, 0, 10, 10], [30, 30, 40, 40]], [0, 0])]
    preds2 = [_pred([[0, 0, 10, 10], [0, 0, 10, 11], [30, 30, 40, 40]], [0.9, 0.8, 0.7], [0, 0, 0])]
    out = mean_average_precision(preds2, targets2, num_classes=1)
    assert out["map"] == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_map_iou_threshold_and_empty():
    targets = [_gt([[0, 0, 10, 10]], [0])]
    half = [_pred([[0, 0, 10, 4]], [0.9], [0])]  # IoU = 40/100 = 0.4
    assert mean_average_precision(half, targets, 1)["map"] == 0.0
    assert mean_average_precision(half, targets, 1, iou_threshold=0.3)["map"] == pytest.approx(1.0)
    empty = mean_average_precision([_pred([], [], [])], [_gt([], [])], num_classes=2)
    assert math.isnan(empty["map"])


def test_map_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        mean_average_precision([], [], num_classes=0)
    with pytest.raises(ValueError, match="predictions"):
        mean_average_precision([], [_gt([], [])], num_classes=1)
    with pytest.raises(ValueError, match="boxes"):
        mean_average_precision([_pred([], [], [])], [{"boxes": torch.zeros(2, 3), "labels": torch.zeros(2)}], 1)
    with pytest.raises(ValueError, match="scores"):
        mean_average_precision([{"boxes": torch.zeros(2, 4), "scores": torch.zeros(1), "labels": torch.zeros(2)}],
                               [_gt([], [])], 1)


def test_box_average_precision_direct():
    assert box_average_precision(torch.tensor([0.5, 0.5, 1.0]), torch.tensor([1.0, 0.5, 2 / 3])) \
        == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_detection_meter_batches_and_merge():
    targets = [_gt([[0, 0, 10, 10]], [0]), _gt([[10, 10, 20, 20]], [0])]
    preds = [_pred([[0, 0, 10, 10], [40, 40, 50, 50]], [0.9, 0.8], [0, 0]), _pred([[10, 10, 20, 21]], [0.7], [0])]
    expected = mean_average_precision(preds, targets, 1)["map"]
    m = DetectionMeter(1)
    m.update(preds[:1], targets[:1])
    m.update(preds[1:], targets[1:])
    assert m.compute()["map"] == pytest.approx(expected)
    # Two "ranks", each with half the images.
    r0, r1 = DetectionMeter(1), DetectionMeter(1)
    r0.update(preds[:1], targets[:1])
    r1.update(preds[1:], targets[1:])
    assert DetectionMeter.from_states([r0.state(), r1.state()]).compute()["map"] == pytest.approx(expected)
    assert r0.merge(r1).compute()["map"] == pytest.approx(expected)


def test_detection_meter_on_synthetic_ground_truth():
    ds = SyntheticScenes(5, seed=0)
    m = DetectionMeter(3)
    for i in range(len(ds)):
        _, t = ds[i]
        m.update([{"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]}], [t])
    assert m.compute()["map"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- mIoU

def test_segmentation_meter_hand_computed():
    # truth      pred
    # 0 0 1      0 1 1
    # 1 2 2      1 2 0
    # class 0: TP=1 (pos 0), FP=1 (pos 5), FN=1 (pos 1) -> IoU 1/3
    # class 1: TP=2 (pos 2, 3), FP=1 (pos 1), FN=0      -> IoU 2/3
    # class 2: TP=1 (pos 4), FP=0, FN=1 (pos 5)         -> IoU 1/2
    # class 3: absent from both -> nan, excluded.  pixel accuracy = 4/6.
    true = torch.tensor([[[0, 0, 1], [1, 2, 2]]])
    pred = torch.tensor([[[0, 1, 1], [1, 2, 0]]])
    m = SegmentationMeter(4)
    m.update(pred, true)
    out = m.compute()
    assert out["iou_per_class"][:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(out["iou_per_class"][3])
    assert out["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert out["pixel_accuracy"] == pytest.approx(4 / 6)
    assert m.confusion.dtype == torch.int64 and int(m.confusion.sum()) == 6


def test_segmentation_meter_ignore_index_and_accumulate():
    true = torch.tensor([[[0, 255, 1], [1, 255, 0]]])
    pred = torch.tensor([[[0, 1, 1], [1, 0, 0]]])  # wrong only where truth is ignored
    m = SegmentationMeter(2, ignore_index=255)
    m.update(pred, true)
    m.update(pred, true)
    out = m.compute()
    assert out["miou"] == pytest.approx(1.0) and out["pixel_accuracy"] == pytest.approx(1.0)
    assert int(m.confusion.sum()) == 8  # 4 counted pixels per update
    m.reset()
    assert int(m.confusion.sum()) == 0


def test_segmentation_meter_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationMeter(0)
    m = SegmentationMeter(3)
    with pytest.raises(ValueError, match="pred_labels"):
        m.update(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="true_labels"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 7))


def test_accuracy_helper():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- VOC folders

SCENE_CLASSES = ("circle", "square", "triangle")  # SyntheticScenes' labels 0, 1, 2


def write_tiny_voc(root, num_images=5, image_size=48, seed=3, year="2012"):
    """Writes synthetic scenes as a PASCAL VOC folder under ``root``: JPEG images,
    XML annotations (1-based inclusive boxes, object 0 of image 0 marked difficult),
    palette-PNG masks (row 0 of image 1 painted 255, VOC's "void") and ImageSets
    listing every image for the "val" split. Returns the scenes' ``(image, target)``
    pairs, with each target's ``mask`` and ``difficult`` as written."""
    from PIL import Image

    base = root / "VOCdevkit" / f"VOC{year}"
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0, 0, 0] * 251 + [224, 224, 192]
    ds = SyntheticScenes(num_images, image_size, seed=seed)
    names, samples = [], []
    for i in range(num_images):
        image, t = ds[i]
        name = f"2012_{i:06d}"
        pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(base / "JPEGImages" / f"{name}.jpg", quality=95, subsampling=0)
        mask = t["mask"].clone()
        if i == 1:
            mask[0] = 255
        png = Image.fromarray(mask.to(torch.uint8).numpy(), mode="P")
        png.putpalette(palette)
        png.save(base / "SegmentationClass" / f"{name}.png")
        difficult = torch.zeros(len(t["labels"]), dtype=torch.bool)
        if i == 0:
            difficult[0] = True
        objects = "".join(
            f"<object><name>{SCENE_CLASSES[int(c)]}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{int(d)}</difficult><bndbox><xmin>{int(b[0]) + 1}</xmin><ymin>{int(b[1]) + 1}</ymin>"
            f"<xmax>{int(b[2])}</xmax><ymax>{int(b[3])}</ymax></bndbox></object>"
            for b, c, d in zip(t["boxes"].tolist(), t["labels"].tolist(), difficult.tolist()))
        (base / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><folder>VOC{year}</folder><filename>{name}.jpg</filename><size><width>{image_size}"
            f"</width><height>{image_size}</height><depth>3</depth></size><segmented>1</segmented>{objects}"
            "</annotation>")
        names.append(name)
        samples.append((image, dict(t, mask=mask, difficult=difficult)))
    for split in ("Main", "Segmentation"):
        (base / "ImageSets" / split / "val.txt").write_text("\n".join(names) + "\n")
    return samples


def test_find_voc_accepts_the_three_usual_roots(tmp_path):
    write_tiny_voc(tmp_path, num_images=1)
    devkit = tmp_path / "VOCdevkit"
    for root in (tmp_path, devkit, devkit / "VOC2012"):
        assert find_voc(root) == (str(tmp_path), "2012")
    assert find_voc(devkit / "VOC2012", year=2012) == (str(tmp_path), "2012")
    with pytest.raises(DatasetError, match="year='2007'"):
        find_voc(devkit / "VOC2012", year="2007")
    (devkit / "VOC2007").mkdir()
    with pytest.raises(DatasetError, match="VOC2007, VOC2012"):
        find_voc(tmp_path)
    assert find_voc(tmp_path, year="2007") == (str(tmp_path), "2007")
    # A VOC-looking folder outside VOCdevkit/VOC<year>, and a folder with nothing VOC in it.
    (tmp_path / "mine" / "JPEGImages").mkdir(parents=True)
    with pytest.raises(DatasetError, match="VOCdevkit/VOC<year>"):
        find_voc(tmp_path / "mine")
    with pytest.raises(FileNotFoundError, match="VOC2012"):
        find_voc(tmp_path / "mine" / "JPEGImages")


def test_voc_folder_round_trip_boxes_masks_and_difficult(tmp_path):
    samples = write_tiny_voc(tmp_path)
    boxes_set = voc_detection(tmp_path, transforms=VOCBoxes(48, SCENE_CLASSES))
    masks_set = voc_segmentation(tmp_path / "VOCdevkit", transforms=VOCMasks(48, num_classes=4))
    assert len(boxes_set) == len(masks_set) == len(samples)
    for i, (image, t) in enumerate(samples):
        x, target = boxes_set[i]
        assert x.shape == (3, 48, 48) and x.dtype == torch.float32
        assert (x - image).abs().mean() < 0.03  # JPEG at quality 95, no chroma subsampling
        # VOC's 1-based inclusive corners come back as the scenes' 0-based exclusive ones.
        assert torch.equal(target["boxes"], t["boxes"])
        assert torch.equal(target["labels"], t["labels"])
        assert torch.equal(target["difficult"], t["difficult"])
        x2, mask_target = masks_set[i]
        assert torch.equal(x2, x)
        assert torch.equal(mask_target["mask"], t["mask"])  # palette indices, 255 kept
    assert int(samples[1][1]["mask"][0].unique().item()) == 255
    # At half the size: boxes halve and masks take every second pixel (PIL's nearest
    # neighbour samples the source pixel under each target pixel's centre: 2i + 1).
    half = voc_detection(tmp_path, transforms=VOCBoxes(24, SCENE_CLASSES))[2][1]
    assert torch.equal(half["boxes"], samples[2][1]["boxes"] / 2)
    mask = voc_segmentation(tmp_path, transforms=VOCMasks(24))[2][1]["mask"]
    assert torch.equal(mask, samples[2][1]["mask"][1::2, 1::2])


def test_voc_transforms_scale_each_axis_and_name_bad_labels():
    from PIL import Image

    image = Image.new("RGB", (40, 20), (10, 20, 30))  # width 40, height 20
    annotation = {"annotation": {"filename": "a.jpg", "object": {
        "name": "dog", "difficult": "1", "bndbox": {"xmin": "5", "ymin": "3", "xmax": "24", "ymax": "12"}}}}
    x, t = VOCBoxes(10)(image, annotation)
    assert x.shape == (3, 10, 10)
    assert torch.allclose(x[:, 0, 0], torch.tensor([10, 20, 30]) / 255)
    # x scaled by 10/40, y by 10/20; one object given as a dict, not a list.
    assert t["boxes"].tolist() == [[1.0, 1.0, 6.0, 6.0]]
    assert t["labels"].tolist() == [VOC_CLASSES.index("dog")] and t["difficult"].tolist() == [True]
    empty = VOCBoxes(10)(image, {"annotation": {"filename": "b.jpg"}})[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].dtype == torch.int64
    with pytest.raises(DatasetError, match="a.jpg: object class 'dog'"):
        VOCBoxes(10, ("cat", "bird"))(image, annotation)
    mask = Image.fromarray(torch.tensor([[0, 5], [255, 1]], dtype=torch.uint8).numpy(), mode="P")
    assert VOCMasks(2, num_classes=6)(image, mask)[1]["mask"].tolist() == [[0, 5], [255, 1]]
    with pytest.raises(DatasetError, match=r"label values \[5\] do not fit a model with 4 classes"):
        VOCMasks(2, num_classes=4)(image, mask)
    with pytest.raises(DatasetError, match="mode 'RGB'"):
        VOCMasks(2)(image, image)
    with pytest.raises(ValueError, match="classes"):
        VOCBoxes(10, ("cat", "cat"))


def test_map_difficult_objects_are_neither_counted_nor_penalised():
    # Image 0: GT A (class 0) and a difficult GT D; image 1: GT B. Detections by score:
    #   0.9 on D   -> ignored (neither TP nor FP)
    #   0.8 on A   -> TP    precision 1/1, recall 1/2
    #   0.7 empty  -> FP    precision 1/2, recall 1/2
    #   0.6 on B   -> TP    precision 2/3, recall 2/2
    # AP = 0.5 * 1 + 0.5 * 2/3; without the difficult flag D counts: 0.9 is a TP and recall
    # has three objects: precisions 1, 1, 2/3, 3/4 at recalls 1/3, 2/3, 2/3, 1 -> AP = 2/3 + 1/3 * 3/4.
    a, d, b = [0, 0, 10, 10], [20, 20, 30, 30], [10, 10, 20, 20]
    targets = [dict(_gt([a, d], [0, 0]), difficult=torch.tensor([False, True])), _gt([b], [0])]
    preds = [_pred([d, a, [40, 40, 50, 50]], [0.9, 0.8, 0.7], [0, 0, 0]), _pred([b], [0.6], [0])]
    assert mean_average_precision(preds, targets, 1)["map"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    plain = [{k: v for k, v in t.items() if k != "difficult"} for t in targets]
    assert mean_average_precision(preds, plain, 1)["map"] == pytest.approx(2 / 3 + 1 / 3 * 3 / 4)
    meter = DetectionMeter(1)
    meter.update(preds, targets)
    assert meter.compute()["map"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    # Only difficult objects of a class: the class has no ground truth to count (nan, left out).
    only = [dict(_gt([d], [0]), difficult=torch.tensor([True]))]
    assert math.isnan(mean_average_precision([_pred([d], [0.9], [0])], only, 1)["map"])
    with pytest.raises(ValueError, match="difficult"):
        mean_average_precision(preds, [dict(targets[0], difficult=torch.tensor([True])), targets[1]], 1)
