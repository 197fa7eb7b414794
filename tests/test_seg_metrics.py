"""The segmentation metrics against mmseg's `mean_iou` written out in NumPy from its definition.

mmseg (`intersect_and_union`, `total_intersect_and_union`, `total_area_to_metrics`): per image, drop the pixels
whose *label* is the ignore index; count per class the intersection (pixels where prediction == label), the
predicted area and the labelled area (histograms over [0, K)); sum the four areas over the images; IoU = intersect /
union, Acc = intersect / labelled area, aAcc = all intersections / all labelled pixels; mIoU and mAcc are `nanmean`s,
so a class absent from labels *and* predictions (IoU 0 / 0) and a class absent from the labels (Acc 0 / 0) are left
out of the respective mean, while a class predicted but never labelled has IoU 0 and counts.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from beitv2.eval.segmentation import all_reduce_confusion, confusion_matrix, metrics_from_confusion


def _mmseg_mean_iou(preds: list[np.ndarray], labels: list[np.ndarray], k: int, ignore: int) -> dict:
    inter, union, pred_area, label_area = (np.zeros(k) for _ in range(4))
    for pred, label in zip(preds, labels):
        keep = label != ignore
        p, lab = pred[keep], label[keep]
        hit = p[p == lab]
        ai = np.histogram(hit, bins=k, range=(0, k))[0]
        ap = np.histogram(p, bins=k, range=(0, k))[0]
        al = np.histogram(lab, bins=k, range=(0, k))[0]
        inter += ai
        pred_area += ap
        label_area += al
        union += ap + al - ai
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
        acc = inter / label_area
    return {"IoU": 100 * iou, "Acc": 100 * acc, "mIoU": 100 * np.nanmean(iou), "mAcc": 100 * np.nanmean(acc),
            "aAcc": 100 * inter.sum() / label_area.sum()}


def _ours(preds, labels, k, ignore):
    cm = sum(confusion_matrix(torch.from_numpy(p), torch.from_numpy(lab), k, ignore_index=ignore)
             for p, lab in zip(preds, labels))
    return metrics_from_confusion(cm), cm


def _images(seed: int, k: int, ignore: int, shapes=((5, 7), (4, 9), (6, 3))):
    """Random label / prediction maps with: class 1 labelled but never predicted, class k-2 predicted but never
    labelled, class k-1 neither, ignored label pixels, and predictions of an ignored value under ignored labels."""
    rng = np.random.default_rng(seed)
    present = [c for c in range(k - 2) if c != 1]
    preds, labels = [], []
    for h, w in shapes:
        lab = rng.choice([0, 1, *present], size=(h, w))
        pred = np.where(rng.random((h, w)) < 0.6, lab, rng.choice([*present, k - 2], size=(h, w)))
        pred[pred == 1] = 0
        ign = rng.random((h, w)) < 0.25
        lab[ign] = ignore
        pred[ign & (rng.random((h, w)) < 0.5)] = ignore
        preds.append(pred.astype(np.int64))
        labels.append(lab.astype(np.int64))
    return preds, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k, ignore", [(6, 255), (7, 3)])
def test_miou_macc_aacc_equal_mmseg_with_absent_classes_and_ignored_pixels(seed, k, ignore):
    """Summed over images (as over validation batches); `ignore = 3` lies inside the class range, where only the
    ignore mask (not a range check) keeps those pixels out."""
    preds, labels = _images(seed, k, ignore)
    ref = _mmseg_mean_iou(preds, labels, k, ignore)
    got, cm = _ours(preds, labels, k, ignore)
    # the cases the data was built to contain
    assert np.isnan(ref["IoU"][k - 1]) and np.isnan(ref["Acc"][k - 1])  # neither labelled nor predicted
    assert ref["IoU"][k - 2] == 0 and np.isnan(ref["Acc"][k - 2])  # predicted, never labelled
    assert ref["IoU"][1] == 0 and ref["Acc"][1] == 0  # labelled, never predicted
    assert int(cm.sum()) == sum(int((lab != ignore).sum()) for lab in labels)
    np.testing.assert_allclose(np.array(got["IoU"]), ref["IoU"], rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(np.array(got["Acc"]), ref["Acc"], rtol=1e-12, equal_nan=True)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert got[key] == pytest.approx(ref[key], rel=1e-12), key


def test_miou_by_hand_with_each_kind_of_absent_class():
    """4 classes, one image: class 0 labelled 3x and hit 2x, class 1 labelled 1x never predicted, class 2 predicted
    1x never labelled, class 3 nowhere; two ignored pixels whose predictions (one of them 255) must not count."""
    label = torch.tensor([[0, 0, 0, 1], [255, 255, 0, 0]])
    pred = torch.tensor([[0, 0, 2, 0], [255, 1, 0, 0]])
    # valid pixels (label, pred): (0,0) (0,0) (0,2) (1,0) (0,0) (0,0)
    cm = confusion_matrix(pred, label, 4)
    assert cm.tolist() == [[4, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    m = metrics_from_confusion(cm)
    iou0 = 4 / (5 + 5 - 4)  # labelled 5, predicted 5, intersect 4
    assert m["IoU"][:3] == pytest.approx([100 * iou0, 0.0, 0.0]) and math.isnan(m["IoU"][3])
    assert m["mIoU"] == pytest.approx(100 * iou0 / 3)  # class 3 left out, classes 1 and 2 count as 0
    assert m["Acc"][:2] == pytest.approx([80.0, 0.0]) and math.isnan(m["Acc"][2]) and math.isnan(m["Acc"][3])
    assert m["mAcc"] == pytest.approx(40.0)  # classes 2 and 3 were never labelled: left out
    assert m["aAcc"] == pytest.approx(100 * 4 / 6)  # ignored pixels are in neither numerator nor denominator


def test_everything_ignored_gives_undefined_metrics():
    cm = confusion_matrix(torch.tensor([1, 2, 0]), torch.tensor([255, 255, 255]), 3)
    assert int(cm.sum()) == 0
    m = metrics_from_confusion(cm)
    assert all(math.isnan(m[key]) for key in ("mIoU", "mAcc", "aAcc"))


def test_confusion_all_reduce_on_one_process_is_the_identity():
    cm = torch.tensor([[3, 1], [0, 7]])
    out = all_reduce_confusion(cm)
    assert out.dtype == torch.int64 and torch.equal(out, cm)


def test_prediction_figure_with_an_image_smaller_than_its_label_map(tmp_path):
    """The image is resized to the label map's size for display (evaluation at another resolution)."""
    from PIL import Image

    from beitv2.eval.segmentation import save_prediction_figure

    labels = [torch.tensor([[0, 1] * 4] * 8)]
    labels[0][0, 0] = 255
    path = save_prediction_figure(tmp_path / "pred.png", [torch.rand(3, 4, 4)], labels, [labels[0].clamp(max=1)],
                                  num_classes=2, mean=[0.5] * 3, std=[0.25] * 3)
    with Image.open(path) as im:
        assert im.size[0] > 0 and im.format == "PNG"
