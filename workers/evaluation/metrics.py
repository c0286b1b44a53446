"""Segmentation scores of the evaluation protocols (docs/methods.md section 4).

numpy + scipy only. Label maps are integer arrays of shape (H, W); ground-truth pixels equal to
`ignore_index` are left out everywhere. Accuracies and IoUs are fractions in [0, 1]; a class
with nothing to score is NaN in the per-class arrays and left out of the means.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def _valid_pixels(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Flat (pred, gt) of the pixels whose ground truth is not ignored; checks gt's range."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    valid = gt != ignore_index
    pred, gt = pred[valid].astype(np.int64), gt[valid].astype(np.int64)
    if gt.size and (gt.min() < 0 or gt.max() >= num_classes):
        raise ValueError(f"ground-truth labels outside [0, {num_classes}) other than {ignore_index}")
    return pred, gt


def _iou(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """TP / (TP + FP + FN) per class, NaN where the denominator is 0."""
    denominator = tp + fp + fn
    return np.where(denominator > 0, tp / np.maximum(denominator, 1), np.nan)


def _nanmean(values: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN if there are none (no warning)."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else float("nan")


def hungarian_match(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = 255) -> dict[int, int]:
    """Matches an image's predicted segments one-to-one to its ground-truth classes.

    The assignment maximises the total overlap (pixels, ignored ones excluded), solved with
    scipy's linear_sum_assignment. Only classes present in this image's ground truth take part,
    and pairs with zero overlap are dropped: a segment left over (more segments than classes)
    stays unmatched rather than being given an absent class.

    Args:
        pred: (H, W) int segment ids (any integers).
        gt: (H, W) int classes in [0, num_classes), or ignore_index.

    Returns:
        {segment id: class} for the matched segments.
    """
    pred, gt = _valid_pixels(pred, gt, num_classes, ignore_index)
    segments, segment_index = np.unique(pred, return_inverse=True)
    classes, class_index = np.unique(gt, return_inverse=True)
    overlap = np.bincount(segment_index * len(classes) + class_index, minlength=len(segments) * len(classes)).reshape(
        len(segments), len(classes)
    )
    rows, cols = linear_sum_assignment(overlap, maximize=True)
    return {int(segments[r]): int(classes[c]) for r, c in zip(rows, cols) if overlap[r, c] > 0}


class UnsupervisedScore:
    """Pixel accuracy and mIoU of class-agnostic segmentations (DiffSeg protocol).

    Per image, segments are matched to classes by `hungarian_match`; TP, FP and FN per class are
    accumulated over the dataset. A pixel of class c in a segment matched to c is a TP of c; in a
    segment matched to another class c' it is an FN of c and an FP of c'; in an unmatched
    segment it is an FN of c only.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.tp = np.zeros(num_classes, dtype=np.int64)
        self.fp = np.zeros(num_classes, dtype=np.int64)
        self.fn = np.zeros(num_classes, dtype=np.int64)
        self.valid_pixels = 0

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Scores one image: pred (H, W) segment ids, gt (H, W) classes."""
        matching = hungarian_match(pred, gt, self.num_classes, self.ignore_index)
        pred, gt = _valid_pixels(pred, gt, self.num_classes, self.ignore_index)
        matched = np.full(pred.shape, -1, dtype=np.int64)  # -1: unmatched segment
        for segment, cls in matching.items():
            matched[pred == segment] = cls
        hit = matched == gt
        self.tp += np.bincount(gt[hit], minlength=self.num_classes)
        self.fn += np.bincount(gt[~hit], minlength=self.num_classes)
        self.fp += np.bincount(matched[~hit & (matched >= 0)], minlength=self.num_classes)
        self.valid_pixels += gt.size

    def result(self) -> dict:
        """{"pixel_accuracy": TP / valid pixels, "miou": mean IoU, "per_class_iou": (C,) array}.

        Classes that never occur, neither in the ground truth nor as a match, have no TP, FP or
        FN: their IoU is NaN and they are excluded from the mean.
        """
        per_class = _iou(self.tp, self.fp, self.fn)
        accuracy = self.tp.sum() / self.valid_pixels if self.valid_pixels else float("nan")
        return {"pixel_accuracy": float(accuracy), "miou": _nanmean(per_class), "per_class_iou": per_class}


class ConfusionScore:
    """Confusion matrix, per-class IoU, mIoU and pixel accuracy of semantic predictions."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Scores one image: pred and gt (H, W) classes in [0, num_classes)."""
        pred, gt = _valid_pixels(pred, gt, self.num_classes, self.ignore_index)
        if pred.size and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"predicted labels outside [0, {self.num_classes})")
        self.confusion += np.bincount(gt * self.num_classes + pred, minlength=self.num_classes**2).reshape(
            self.num_classes, self.num_classes
        )

    def result(self) -> dict:
        """{"confusion": (C, C) rows = ground truth, columns = prediction, "per_class_iou": (C,),
        "miou", "pixel_accuracy"}. Classes absent from both ground truth and predictions have
        IoU NaN and are excluded from the mean."""
        tp = np.diag(self.confusion)
        per_class = _iou(tp, self.confusion.sum(0) - tp, self.confusion.sum(1) - tp)
        total = self.confusion.sum()
        return {
            "confusion": self.confusion.copy(),
            "per_class_iou": per_class,
            "miou": _nanmean(per_class),
            "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
        }


class PartIoUScore:
    """Per-part IoU per image, averaged over the images where the part occurs (SLiMe protocol).

    "Occurs" means the part has ground-truth pixels in that image; images where it is only
    predicted do not count for it. Label 0 (background) is a part like the others.
    """

    def __init__(self, num_parts: int, ignore_index: int = 255):
        self.num_parts = num_parts
        self.ignore_index = ignore_index
        self.iou_sum = np.zeros(num_parts)
        self.images = np.zeros(num_parts, dtype=np.int64)

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Scores one image: pred and gt (H, W) part labels."""
        pred, gt = _valid_pixels(pred, gt, self.num_parts, self.ignore_index)
        for part in np.unique(gt):
            truth, predicted = gt == part, pred == part
            self.iou_sum[part] += (truth & predicted).sum() / (truth | predicted).sum()
            self.images[part] += 1

    def result(self) -> dict:
        """{"per_part_iou": (P,) NaN for parts that never occur, "miou": their mean,
        "images_per_part": (P,) counts}."""
        per_part = np.where(self.images > 0, self.iou_sum / np.maximum(self.images, 1), np.nan)
        return {"per_part_iou": per_part, "miou": _nanmean(per_part), "images_per_part": self.images.copy()}


def instance_centres(instance_map: np.ndarray, ids) -> dict[int, np.ndarray]:
    """(row, col) centre of each id's pixels in an (H, W) map; ids without pixels are left out."""
    centres = {}
    for identity in ids:
        rows, cols = np.nonzero(instance_map == identity)
        if rows.size:
            centres[int(identity)] = np.array([rows.mean(), cols.mean()])
    return centres


class ReferringScore:
    """Personalized referring segmentation (From Text to Mask 5.3, Mug19 protocol).

    Per scene: the predicted instances, each query's best instance alone (bf) and the joint
    assignment (af), the ground-truth instance map (0 = background, 1..N instances) and each query's
    ground-truth instance. As in the paper, a predicted instance stands for the ground-truth instance
    whose centre is nearest its centre; a query is right when that is its instance. bf_acc and
    af_acc are the fractions of queries right; miou is the mean over queries of the IoU of the
    jointly assigned instance's mask with the query's instance (0 when none was assigned), bf_miou
    the same for the best-alone instance. unfound counts the queries whose instance no predicted
    instance stands for: those no choice of instance could get right.
    """

    def __init__(self):
        self.right = {"bf": 0, "af": 0}
        self.ious: dict[str, list[float]] = {"bf": [], "af": []}
        self.unfound = 0

    def add(
        self, instance_map: np.ndarray, best: list[int], assigned: list[int | None], gt: np.ndarray, targets: list[int]
    ) -> None:
        """instance_map: (H, W) -1 background, 0..K-1; best, assigned: per query, an instance or None;
        gt: (H, W) 0 background, 1..N; targets: per query, its ground-truth instance id."""
        if instance_map.shape != gt.shape:
            raise ValueError(f"prediction {instance_map.shape} and ground truth {gt.shape} differ in shape")
        predicted = instance_centres(instance_map, np.unique(instance_map[instance_map >= 0]))
        truth = instance_centres(gt, np.unique(gt[gt > 0]))
        stands_for = (
            {k: min(truth, key=lambda t: np.linalg.norm(truth[t] - centre)) for k, centre in predicted.items()}
            if truth
            else {}
        )
        self.unfound += sum(target not in stands_for.values() for target in targets)
        for setting, choice in (("bf", best), ("af", assigned)):
            for instance, target in zip(choice, targets, strict=True):
                self.right[setting] += int(instance is not None and stands_for.get(instance) == target)
                mask, wanted = instance_map == instance, gt == target
                union = np.logical_or(mask, wanted).sum()
                self.ious[setting].append(float(np.logical_and(mask, wanted).sum() / union) if union else 0.0)

    def result(self) -> dict:
        queries = len(self.ious["af"])
        return {
            "miou": _nanmean(np.array(self.ious["af"])),
            "bf_miou": _nanmean(np.array(self.ious["bf"])),
            "bf_acc": self.right["bf"] / queries if queries else float("nan"),
            "af_acc": self.right["af"] / queries if queries else float("nan"),
            "queries": queries,
            "unfound": self.unfound,
        }
