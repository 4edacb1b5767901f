"""Segmentation scores from a confusion matrix (the PASCAL VOC protocol).

``M[t, p]`` counts pixels of true class t predicted as p; void pixels (255) are not counted.
With TP = diag(M), the IoU of class c is TP_c / (row_c + column_c − TP_c); mIoU averages it
over the classes that occur in the ground truth or the predictions.
"""
import numpy as np

from .backend import to_device


class ConfusionMatrix:
    def __init__(self, num_classes, ignore_index=255, class_names=None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names or [str(c) for c in range(num_classes)])
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred, target):
        """Add a batch: ``pred`` and ``target`` are integer label maps of one shape."""
        pred = np.asarray(to_device(getattr(pred, "data", pred), "cpu"))
        target = np.asarray(to_device(getattr(target, "data", target), "cpu"))
        if pred.shape != target.shape:
            raise ValueError(f"pred has shape {pred.shape} but target has shape {target.shape}")
        valid = target != self.ignore_index
        t, p = target[valid].astype(np.int64), pred[valid].astype(np.int64)
        C = self.num_classes
        for name, a in (("target", t), ("pred", p)):
            if a.size and (a.min() < 0 or a.max() >= C):
                raise ValueError(f"{name} holds labels outside 0..{C - 1} (and not "
                                 f"{self.ignore_index}): {np.unique(a[(a < 0) | (a >= C)])[:10]}")
        self.matrix += np.bincount(t * C + p, minlength=C * C).reshape(C, C)
        return self

    def scores(self):
        """pixel_acc, mean_acc, miou, fwiou and the per-class IoU (NaN for absent classes)."""
        M = self.matrix.astype(np.float64)
        tp, gt, predicted = np.diag(M), M.sum(1), M.sum(0)
        union = gt + predicted - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            acc = np.where(gt > 0, tp / gt, np.nan)
        total = M.sum()
        present = union > 0
        return {
            "pixel_acc": float(tp.sum() / total) if total else float("nan"),
            "mean_acc": float(np.nanmean(acc)) if (gt > 0).any() else float("nan"),
            "miou": float(np.nanmean(iou)) if present.any() else float("nan"),
            "fwiou": float((gt[present] / total * iou[present]).sum()) if total else float("nan"),
            "per_class_iou": {n: float(v) for n, v in zip(self.class_names, iou)},
        }
