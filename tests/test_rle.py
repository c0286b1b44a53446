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


@pytest.mark.parametrize("seed", range(12))
def test_label_map_segments_match_pycocotools(seed):
    """All segments from one pass over the map == pycocotools on each label's mask."""
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 60, size=2)
    labels = rng.integers(0, rng.integers(1, 7), size=(h, w)) * 5
    if seed % 3 == 0:
        labels = np.repeat(labels[:, :1], w, axis=1)  # runs spanning columns
    if seed % 4 == 1:
        labels[:] = labels[0, 0]
    expected = []
    for value in np.unique(labels):
        mask_rle = coco_encode(labels == value)
        box = coco.toBbox({"size": mask_rle["size"], "counts": mask_rle["counts"].encode()}).astype(int).tolist()
        expected.append((int(value), mask_rle, int((labels == value).sum()), box))
    assert rle.label_map_to_segments(labels) == expected


def test_label_map_segments_of_a_12_megapixel_map():
    """A phone photo's label map (4000 x 3000, smooth regions): byte-identical to pycocotools."""
    yy, xx = np.mgrid[0:3000, 0:4000]
    labels = ((yy // 700) * 3 + (xx + yy // 3) // 1100).astype(np.int64)
    labels[1000:1200, 500:3900] = 17
    segments = rle.label_map_to_segments(labels)
    assert [s[0] for s in segments] == np.unique(labels).tolist()
    for value, mask_rle, area, box in segments:
        mask = labels == value
        assert mask_rle == coco_encode(mask)
        assert area == int(mask.sum())
        assert (
            box == coco.toBbox({"size": mask_rle["size"], "counts": mask_rle["counts"].encode()}).astype(int).tolist()
        )


def test_decode_rejects_inconsistent_size():
    with pytest.raises(ValueError):
        rle.decode({"size": [3, 3], "counts": [2, 2]})


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.int64])
def test_label_map_segments_across_chunks(monkeypatch, chunk, dtype):
    """Runs that cross the encoder's chunk boundaries, labels first seen in a later chunk."""
    monkeypatch.setattr(rle, "CHUNK_PIXELS", chunk)
    rng = np.random.default_rng(chunk)
    maps = [
        rng.integers(0, 3, size=(9, 13)),
        np.repeat(rng.integers(0, 4, size=(1, 17)), 6, axis=0),  # runs spanning columns and chunks
        np.indices((8, 11)).sum(axis=0) % 2,  # one-pixel checkerboard
        np.zeros((5, 7), int),
        np.pad(np.ones((1, 1), int), ((3, 2), (5, 1))) * 7,
    ]
    maps[0][:, 9:] = 5  # a label that appears only late
    for labels in maps:
        labels = labels.astype(dtype)
        expected = []
        for value in np.unique(labels):
            mask_rle = coco_encode(labels == value)
            coded = {"size": mask_rle["size"], "counts": mask_rle["counts"].encode()}
            box = coco.toBbox(coded).astype(int).tolist()
            expected.append((int(value), mask_rle, int((labels == value).sum()), box))
        assert rle.label_map_to_segments(labels) == expected


def test_negative_labels():
    labels = np.array([[-3, 0], [2, -3]])
    assert [s[0] for s in rle.label_map_to_segments(labels)] == [-3, 0, 2]


def test_compress_counts_matches_counts_to_string():
    """Every delta size, negative ones too, as the one-by-one reference writes them."""
    rng = np.random.default_rng(7)
    values = np.concatenate(([0, 1, -1, 15, 16, -16, -17, 511, 512], rng.integers(-(2**40), 2**40, 200)))
    data, used = rle.compress_counts(values.astype(np.int64))
    pieces = np.split(data, np.cumsum(used)[:-1])
    for value, piece in zip(values.tolist(), pieces):
        assert piece.tobytes().decode() == rle.counts_to_string([value])
