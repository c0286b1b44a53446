"""The synthetic world: seeded, its ground truth consistent with its pictures, EXIF-rotated JPEGs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from attnseg.images import decode_rgb
from workers.evaluation.synthetic import CLASS_NAMES, MIN_VISIBLE, SIZE_RANGE, make_scene, shape_mask
from workers.models.tiny_colour import COLOURS

SEEDS = range(8)
# EXIF orientation -> how the stored pixels relate to the displayed picture (the EXIF 2.3 table).
STORED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, 1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, -1),
}


def test_same_seed_same_scene_and_other_seeds_differ():
    first, again, other = make_scene(3, 300, 400), make_scene(3, 300, 400), make_scene(4, 300, 400)
    for name in ("image", "classes", "instances"):
        assert np.array_equal(getattr(first, name), getattr(again, name))
    assert first.objects == again.objects
    assert not np.array_equal(first.image, other.image)


@pytest.mark.parametrize("seed", SEEDS)
def test_maps_agree_with_objects_and_picture(seed):
    scene = make_scene(seed, 240, 320)
    short = 240
    ids = np.unique(scene.instances)
    assert ids.tolist() == list(range(len(scene.objects) + 1)), "every object keeps visible pixels"
    for i, obj in enumerate(scene.objects, start=1):
        pixels = scene.instances == i
        assert np.all(scene.classes[pixels] == CLASS_NAMES.index(obj.colour) + 1)
        # painted in its colour: jitter +-6 and noise +-3 around the palette value
        assert np.abs(scene.image[pixels].astype(int) - COLOURS[obj.colour]).max() <= 9 + 1
        assert SIZE_RANGE[0] <= obj.size <= SIZE_RANGE[1]
        full = shape_mask(obj, short, (0, 0, 320, 240))
        assert pixels.sum() >= MIN_VISIBLE * full.sum() and not np.any(pixels & ~full)
    assert np.array_equal(scene.classes == 0, scene.instances == 0)
    background = scene.image[scene.classes == 0].astype(int)
    assert np.abs(background - background.mean(1, keepdims=True)).max() <= 12, "background stays neutral grey"
    assert scene.present == [n for n in CLASS_NAMES if any(o.colour == n for o in scene.objects)]


def test_instances_of_one_colour_never_touch_and_other_colours_do():
    touching_pairs = 0
    for seed in SEEDS:
        scene = make_scene(seed, 240, 320)
        for i, a in enumerate(scene.objects, start=1):
            grown = ndimage.binary_dilation(scene.instances == i, iterations=2)
            for j, b in enumerate(scene.objects, start=1):
                if j != i and np.any(grown & (scene.instances == j)):
                    assert a.colour != b.colour, f"seed {seed}: two {a.colour} objects touch"
                    touching_pairs += 1
    assert touching_pairs > 0
    repeated = [s for s in SEEDS if len(make_scene(s, 240, 320).present) < len(make_scene(s, 240, 320).objects)]
    assert repeated, "some scenes hold several instances of one class"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_with_exif_orientation_reads_back_as_the_scene(orientation):
    scene = make_scene(11, 96, 160)
    data = scene.jpeg(orientation)
    upright = decode_rgb(data)
    assert upright.shape == scene.image.shape
    assert np.abs(upright.astype(int) - scene.image).mean() < 4
    stored = np.asarray(Image.open(io.BytesIO(data)))  # the pixels as written, EXIF not applied
    expected = STORED[orientation](scene.image)
    assert stored.shape == expected.shape and np.abs(stored.astype(int) - expected).mean() < 4


def test_large_non_square_picture():
    scene = make_scene(5, 3000, 4000)  # 12 MP
    assert scene.image.shape == (3000, 4000, 3) and scene.classes.shape == (3000, 4000)
    assert scene.present
