"""Segmentation evaluation: confusion matrix, mIoU / mAcc / aAcc, whole-image and sliding-window inference.

Metrics follow mmseg's ``mean_iou`` from one confusion matrix ``cm[gt, pred]`` over all labelled pixels (the ignore
index excluded), summed over ranks: IoU_c = cm[c,c] / (row_c + col_c - cm[c,c]), Acc_c = cm[c,c] / row_c, aAcc =
trace / total. Classes absent from the ground truth *and* the predictions have an undefined IoU (NaN) and are left
out of the means, as mmseg's ``nanmean``; a class absent from the ground truth but predicted has IoU 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..utils.distributed import all_reduce_sum
from ..utils.figures import figure, save_figure


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255
                     ) -> torch.Tensor:
    """int64 [num_classes, num_classes], rows = ground truth, columns = prediction."""
    keep = label != ignore_index
    gt, pr = label[keep].long(), pred[keep].long()
    ok = (gt >= 0) & (gt < num_classes)
    idx = gt[ok] * num_classes + pr[ok].clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: torch.Tensor) -> dict[str, object]:
    """mIoU, mAcc, aAcc (percent) and per-class IoU / Acc (percent, NaN where undefined)."""
    cm = cm.double()
    tp = cm.diag()
    gt, pr = cm.sum(1), cm.sum(0)
    union = gt + pr - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, math.nan))
    total = float(cm.sum())
    return {"mIoU": 100 * float(iou.nanmean()) if (~iou.isnan()).any() else math.nan,
            "mAcc": 100 * float(acc.nanmean()) if (~acc.isnan()).any() else math.nan,
            "aAcc": 100 * float(tp.sum()) / total if total else math.nan,
            "IoU": (100 * iou).tolist(), "Acc": (100 * acc).tolist()}


def all_reduce_confusion(cm: torch.Tensor) -> torch.Tensor:
    """The confusion matrix summed over all ranks (every rank calls this)."""
    return all_reduce_sum(cm.double()).round().long()


# ------------------------------------------------------------------------------------------------ inference

Forward = Callable[[torch.Tensor], torch.Tensor]


def _logits_at(forward: Forward, x: torch.Tensor) -> torch.Tensor:
    """Model logits upsampled to the input's size (bilinear, align_corners=False, as mmseg)."""
    out = forward(x)
    if out.shape[-2:] != x.shape[-2:]:
        out = F.interpolate(out.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
    return out.float()


def whole_inference(forward: Forward, x: torch.Tensor, model_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Logits [B, K, H, W] for images [B, C, H, W]. With ``model_size`` (a model built for one input size) the image
    is resized to it and the logits back to H x W; mmseg runs the network at the image's own size instead."""
    h, w = x.shape[-2:]
    if model_size is not None and tuple(model_size) != (h, w):
        xs = F.interpolate(x, size=tuple(model_size), mode="bilinear", align_corners=False)
        out = _logits_at(forward, xs)
        return F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
    return _logits_at(forward, x)


def slide_inference(forward: Forward, x: torch.Tensor, num_classes: int, window: tuple[int, int],
                    stride: tuple[int, int]) -> torch.Tensor:
    """mmseg's ``slide_inference``: windows every ``stride`` (the last one flush with the border), logits of
    overlapping windows averaged. An image smaller than the window is padded (bottom/right, zeros = the mean
    colour after normalisation) so that every window has the model's size; mmseg would run a smaller window."""
    b, _, h, w = x.shape
    wh, ww = window
    sh, sw = stride
    ph, pw = max(wh - h, 0), max(ww - w, 0)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    H, W = x.shape[-2:]
    rows = max(H - wh + sh - 1, 0) // sh + 1
    cols = max(W - ww + sw - 1, 0) // sw + 1
    logits = x.new_zeros((b, num_classes, H, W), dtype=torch.float32)
    count = x.new_zeros((1, 1, H, W), dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + wh, H), min(c * sw + ww, W)
            y1, x1 = max(y2 - wh, 0), max(x2 - ww, 0)
            logits[:, :, y1:y2, x1:x2] += _logits_at(forward, x[:, :, y1:y2, x1:x2])
            count[:, :, y1:y2, x1:x2] += 1
    return (logits / count)[:, :, :h, :w]


# --------------------------------------------------------------------------------------------------- outputs

def write_table(path: str | Path, metrics: dict, class_names: list[str]) -> Path:
    """A Markdown table: per-class IoU / Acc, then the summary line (mmseg's layout)."""
    lines = ["| class | IoU | Acc |", "|---|---:|---:|"]
    for name, iou, acc in zip(class_names, metrics["IoU"], metrics["Acc"]):
        f = lambda v: "n/a" if v != v else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {name} | {f(iou)} | {f(acc)} |")
    lines += ["", "| aAcc | mIoU | mAcc |", "|---:|---:|---:|",
              f"| {metrics['aAcc']:.2f} | {metrics['mIoU']:.2f} | {metrics['mAcc']:.2f} |", ""]
    path = Path(path)
    path.write_text("\n".join(lines))
    return path


def palette(num_classes: int) -> torch.Tensor:
    """A fixed colour per class (uint8 [K, 3]); class 0 black when it is a background class."""
    g = torch.Generator().manual_seed(0)
    pal = torch.randint(40, 256, (max(num_classes, 1), 3), generator=g, dtype=torch.uint8)
    return pal


def save_prediction_figure(path: str | Path, images: list[torch.Tensor], labels: list[torch.Tensor],
                           preds: list[torch.Tensor], num_classes: int, mean: list[float], std: list[float],
                           ignore_index: int = 255) -> Path:
    """A PNG with one row per sample: image, ground truth, prediction (ignored pixels white)."""
    pal = palette(num_classes)

    def colour(lab: torch.Tensor) -> torch.Tensor:
        out = pal[lab.clamp(0, num_classes - 1).long()]
        out[lab == ignore_index] = 255
        return out

    n = len(images)
    fig, axes = figure(n, 3, figsize=(6, 2 * n), squeeze=False)
    for i in range(n):
        img = images[i].float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
        img = img.clamp(0, 1).permute(1, 2, 0)
        lab, pr = labels[i].cpu(), preds[i].cpu()
        if img.shape[:2] != lab.shape:
            img = F.interpolate(img.permute(2, 0, 1)[None], size=tuple(lab.shape), mode="bilinear",
                                align_corners=False)[0].permute(1, 2, 0)
        for ax, im, title in zip(axes[i], (img.squeeze(-1) if img.shape[-1] == 1 else img, colour(lab), colour(pr)),
                                 ("image", "ground truth", "prediction")):
            ax.imshow(im.numpy(), cmap="gray" if im.dim() == 2 else None)
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
