"""Evaluation scores on hand-computed tiny examples."""

import numpy as np
import pytest

from workers.evaluation.metrics import ConfusionScore, PartIoUScore, UnsupervisedScore, hungarian_match

IGNORE = 255


def test_hungarian_picks_the_overlap_maximising_assignment():
    # Segment 7 overlaps class 0 by 5 and class 1 by 4; segment 9 overlaps class 0 by 4.
    # Greedy (largest overlap first) would give 7 -> 0 and 9 nothing (total 5);
    # the optimum is 7 -> 1, 9 -> 0 (total 8).
    gt = np.array([[0] * 5 + [1] * 4 + [0] * 4])
    pred = np.array([[7] * 9 + [9] * 4])
    assert hungarian_match(pred, gt, num_classes=2) == {7: 1, 9: 0}


def test_hungarian_ignores_ignored_pixels_and_absent_classes():
    gt = np.array([[2, 2, IGNORE, IGNORE]])
    pred = np.array([[1, 1, 0, 0]])  # segment 0 only covers ignored pixels
    assert hungarian_match(pred, gt, num_classes=5) == {1: 2}
    # More segments than present classes: the extra one stays unmatched (no absent class).
    assert hungarian_match(np.array([[0, 1, 2, 2]]), np.array([[3, 3, 3, 3]]), 5) == {2: 3}


def test_unsupervised_score_hand_computed():
    score = UnsupervisedScore(num_classes=3)
    # Image 1: segments a(=10) and b(=20) match classes 0 and 1; segment c(=30) is unmatched.
    gt1 = np.array([[0, 0, 0, 1], [1, 1, 0, IGNORE]])
    pred1 = np.array([[10, 10, 20, 20], [20, 30, 10, 10]])
    # overlaps (valid pixels): 10: c0 3; 20: c0 1, c1 2; 30: c1 1 -> match {10: 0, 20: 1}
    # TP: c0 3 (10 on 0), c1 2 (20 on 1); FN: c0 1 (20 on 0), c1 1 (30, unmatched)
    # FP: c1 1 (segment 20 on a class-0 pixel)
    score.add(pred1, gt1)
    # Image 2: one segment over classes 2 (3 px) and 0 (1 px) -> matched to 2.
    score.add(np.array([[5, 5, 5, 5]]), np.array([[2, 2, 2, 0]]))
    # TP c2 3; FN c0 1; FP c2 1
    result = score.result()
    tp, fp, fn = np.array([3, 2, 3]), np.array([0, 1, 1]), np.array([2, 1, 0])
    np.testing.assert_array_equal(score.tp, tp)
    np.testing.assert_array_equal(score.fp, fp)
    np.testing.assert_array_equal(score.fn, fn)
    assert result["pixel_accuracy"] == pytest.approx(8 / 11)
    np.testing.assert_allclose(result["per_class_iou"], [3 / 5, 2 / 4, 3 / 4])
    assert result["miou"] == pytest.approx((3 / 5 + 2 / 4 + 3 / 4) / 3)


def test_unsupervised_score_excludes_classes_never_seen():
    score = UnsupervisedScore(num_classes=4)
    score.add(np.array([[1, 1, 2, 2]]), np.array([[0, 0, 3, 3]]))
    result = score.result()
    assert result["pixel_accuracy"] == 1.0
    assert np.isnan(result["per_class_iou"][[1, 2]]).all()
    assert result["miou"] == 1.0


def test_confusion_score_hand_computed():
    score = ConfusionScore(num_classes=3)
    score.add(np.array([[0, 0, 1, 2]]), np.array([[0, 1, 1, IGNORE]]))
    score.add(np.array([[2, 2]]), np.array([[2, 0]]))
    result = score.result()
    np.testing.assert_array_equal(result["confusion"], [[1, 0, 1], [1, 1, 0], [0, 0, 1]])
    # IoU: c0 1/(1+1+1), c1 1/(1+0+1), c2 1/(1+1+0)
    np.testing.assert_allclose(result["per_class_iou"], [1 / 3, 1 / 2, 1 / 2])
    assert result["miou"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)
    assert result["pixel_accuracy"] == pytest.approx(3 / 5)


def test_confusion_score_rejects_out_of_range_prediction():
    with pytest.raises(ValueError):
        ConfusionScore(num_classes=2).add(np.array([[2]]), np.array([[0]]))


def test_part_iou_averages_over_images_where_the_part_occurs():
    score = PartIoUScore(num_parts=3)
    # Image 1: part 0: gt {0,1,2}, pred {0,1} -> 2/3; part 1: gt {3}, pred {2} -> 0;
    # part 2 is only predicted, not in gt: this image does not count for it.
    score.add(np.array([[0, 0, 1, 2]]), np.array([[0, 0, 0, 1]]))
    score.add(np.array([[1, 2, 1]]), np.array([[1, 2, 2]]))
    # part 1: gt {0}, pred {0,2} -> 1/2; part 2: gt {1,2}, pred {1} -> 1/2
    result = score.result()
    np.testing.assert_allclose(result["per_part_iou"], [2 / 3, (0 + 1 / 2) / 2, 1 / 2])
    np.testing.assert_array_equal(result["images_per_part"], [1, 2, 1])
    assert result["miou"] == pytest.approx((2 / 3 + 1 / 4 + 1 / 2) / 3)


def test_referring_score_bf_af_and_miou():
    from workers.evaluation.metrics import ReferringScore

    gt = np.zeros((4, 6), np.int64)
    gt[:, :2], gt[:, 4:] = 1, 2  # two instances, left and right
    predicted = np.full((4, 6), -1)
    predicted[:, :2], predicted[:, 3:] = 0, 1  # the right one a column too wide
    score = ReferringScore()
    # Query A wants instance 1, query B instance 2; alone both pick predicted 0 (left); jointly right.
    score.add(predicted, best=[0, 0], assigned=[0, 1], gt=gt, targets=[1, 2])
    result = score.result()
    assert result["queries"] == 2
    assert result["bf_acc"] == 0.5 and result["af_acc"] == 1.0
    assert result["miou"] == pytest.approx((1.0 + 8 / 12) / 2)
    assert result["bf_miou"] == pytest.approx((1.0 + 0.0) / 2)
    assert result["unfound"] == 0  # each ground-truth instance has a predicted one standing for it
    score.add(predicted, best=[1], assigned=[None], gt=gt, targets=[1])  # nothing assigned: wrong, IoU 0
    assert score.result()["af_acc"] == 2 / 3 and score.result()["queries"] == 3
    only_left = np.where(gt == 1, 0, -1)  # the right instance was never found
    score.add(only_left, best=[0], assigned=[0], gt=gt, targets=[2])
    assert score.result()["unfound"] == 1 and score.result()["af_acc"] == 2 / 4
