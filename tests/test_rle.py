"""Our COCO RLE codec against pycocotools, the reference decoder clients use."""

import numpy as np
import pytest
from pycocotools import mask as coco

from attnseg import rle


def coco_encode(mask: np.ndarray) -> dict:
    out = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(out["size"]), "counts": out["counts"].decode("ascii")}


CASES = {
    "empty": np.zeros((7, 5), bool),
    "full": np.ones((7, 5), bool),
    "first_pixel": np.pad(np.ones((1, 1), bool), ((0, 6), (0, 4))),
    "last_pixel": np.pad(np.ones((1, 1), bool), ((6, 0), (4, 0))),
    "row": np.ones((1, 40), bool),
    "column_stripes": np.tile(np.array([True, False]), (9, 6)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_edge_cases_match_pycocotools(name):
    mask = CASES[name]
    ours = rle.encode(mask)
    assert ours == coco_encode(mask)
    np.testing.assert_array_equal(coco.decode({"size": ours["size"], "counts": ours["counts"].encode()}), mask)
    np.testing.assert_array_equal(rle.decode(ours), mask)


@pytest.mark.parametrize("seed", range(20))
def test_random_masks_match_pycocotools(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 120, size=2)
    # Mix of long and short runs, so large deltas (negative too) appear in the compressed form.
    mask = rng.random((h, w)) < rng.uniform(0.05, 0.95)
    if seed % 2:
        mask[: h // 2] = True
    ours = rle.encode(mask)
    assert ours == coco_encode(mask)
    np.testing.assert_array_equal(rle.decode(ours), mask)
    assert int(mask.sum()) == int(coco.area({"size": ours["size"], "counts": ours["counts"].encode()}))
    expected_box = coco.toBbox({"size": ours["size"], "counts": ours["counts"].encode()}).astype(int).tolist()
    assert rle.bbox(mask) == (expected_box if mask.any() else [0, 0, 0, 0])


def test_decoding_pycocotools_output():
    mask = np.random.default_rng(3).random((50, 33)) < 0.3
    np.testing.assert_array_equal(rle.decode(coco_encode(mask)), mask)


def test_label_map_segments_partition():
    labels = np.random.default_rng(4).integers(0, 4, size=(30, 20))
    segments = rle.label_map_to_segments(labels)
    assert [s[0] for s in segments] == [0, 1, 2, 3]
    total = sum(rle.decode(r).astype(int) for _, r, _, _ in segments)
    np.testing.assert_array_equal(total, np.ones_like(labels))
    assert sum(area for _, _, area, _ in segments) == labels.size


def test_decode_rejects_inconsistent_size():
    with pytest.raises(ValueError):
        rle.decode({"size": [3, 3], "counts": [2, 2]})
