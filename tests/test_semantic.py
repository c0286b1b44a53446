"""Masks that mean something, end to end (issue 14): Redis, the API over real HTTP and a tiny-colour
worker, driven through raw HTTP and through the Python client.

tiny-colour's attention follows colour by construction (workers/models/tiny_colour.py), so on the
scenes of the synthetic world (workers/evaluation/synthetic.py) every method has a right answer.
These tests check that the whole chain (upload, EXIF orientation, working size, model, method,
labels at picture size, RLE, overlay, client) puts each mask on its region, and that a geometry bug
(transposed labels, swapped channels, an offset, a rotation applied twice) fails the same checks.
The floors sit a little under what these scenes reach; the N=100 table is in bench/RESULTS.md.
Pictures are small and non-square (a transposition cannot hide) and run at resolution 256.
"""

import io
import json
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from attnseg import rle
from attnseg.client import Client
from service.overlay import ALPHA, palette
from tests import test_ui as ui
from tests.support import Stack
from workers.evaluation import quality
from workers.evaluation.metrics import UnsupervisedScore
from workers.evaluation.synthetic import CLASS_NAMES, make_scene
from workers.models.tiny_colour import NOTE

pytestmark = pytest.mark.slow

RESOLUTION = 256
HEIGHT, WIDTH = 192, 256
SCENE = make_scene(12, HEIGHT, WIDTH)
# Floors, a little under what these scenes reach at resolution 256 (measured: each mask's IoU with its
# region 0.49 to 0.91, their mean per picture 0.64 to 0.85; DiffSeg's Hungarian mIoU 0.60 to 0.70).
CLASS_FLOOR = 0.45
MEAN_FLOOR = 0.6
UNSUPERVISED_FLOOR = 0.55


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("colour-stack"), model="tiny-colour").start_ready()
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def client(stack):
    with Client(stack.base_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def http(stack):
    with httpx.Client(base_url=stack.base_url, timeout=120) as http:
        yield http


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def iou(mask: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(mask, truth).sum()
    return float(np.logical_and(mask, truth).sum() / union) if union else 1.0


def check_classes(labels: np.ndarray, classes: np.ndarray, names: list[str]) -> None:
    """Each name's mask (labels == i for names[i - 1]) covers its colour's region: IoU >= CLASS_FLOOR,
    and >= MEAN_FLOOR on average. classes: the scene's class map (0 background, k = CLASS_NAMES[k - 1])."""
    assert labels.shape == classes.shape, f"labels {labels.shape}, picture {classes.shape}"
    ious = {name: iou(labels == i, classes == CLASS_NAMES.index(name) + 1) for i, name in enumerate(names, start=1)}
    low = {name: round(value, 3) for name, value in ious.items() if value < CLASS_FLOOR}
    mean = float(np.mean(list(ious.values())))
    assert not low and mean >= MEAN_FLOOR, (
        f"masks off their regions (IoU under {CLASS_FLOOR}: {low}; mean {mean:.3f}, floor {MEAN_FLOOR})"
    )


def check_segments(labels: np.ndarray, classes: np.ndarray, floor: float = UNSUPERVISED_FLOOR) -> None:
    """Class-agnostic segments match the colour regions: Hungarian-matched mIoU >= floor."""
    assert labels.shape == classes.shape, f"labels {labels.shape}, picture {classes.shape}"
    score = UnsupervisedScore(len(CLASS_NAMES) + 1)
    score.add(labels, classes)
    miou = score.result()["miou"]
    assert miou >= floor, f"segments off the regions: Hungarian mIoU {miou:.3f} under {floor}"


def text_labels(http: httpx.Client, image: bytes, classes: list[str], **fields) -> np.ndarray:
    """selfcross over raw HTTP (multipart, as curl sends it): the label map decoded from the RLE masks."""
    response = http.post(
        "/segment/text",
        files={"image": ("scene", image, "application/octet-stream")},
        data={"classes": json.dumps(classes), "resolution": str(RESOLUTION), "seed": "0", **fields},
    )
    assert response.status_code == 202, response.text
    job = http.get(f"/jobs/{response.json()['id']}", params={"wait": 60}).json()
    assert job["status"] == "succeeded", job
    result = job["result"]
    labels = np.zeros((result["image"]["height"], result["image"]["width"]), np.int64)
    for segment in result["segments"]:
        labels[rle.decode(segment["segmentation"])] = segment["label_id"]
    return labels


@pytest.fixture(scope="module")
def unsupervised_job(client):
    return client.segment_unsupervised(SCENE.image, resolution=RESOLUTION, seed=0).wait()


def test_unsupervised_segments_are_the_colour_regions(unsupervised_job):
    result = unsupervised_job.result()
    assert (result.width, result.height) == (WIDTH, HEIGHT)
    check_segments(result.label_map(), SCENE.classes)


def test_each_colour_word_masks_its_region(http):
    check_classes(text_labels(http, png_bytes(SCENE.image), SCENE.present), SCENE.classes, SCENE.present)


@pytest.mark.parametrize("orientation", [6, 3])
def test_a_rotated_jpeg_comes_back_upright_with_its_masks_in_place(http, orientation):
    """The JPEG's pixels are stored rotated and its EXIF tag turns them back: the masks are at the
    upright size and on the upright regions (a rotation applied twice, or not at all, fails)."""
    scene = make_scene(12, 900, 1200)  # 1.1 MP, landscape; orientation 6 stores it as portrait
    labels = text_labels(http, scene.jpeg(orientation), scene.present)
    check_classes(labels, scene.classes, scene.present)


def test_the_overlay_is_drawn_over_the_picture_at_its_place(unsupervised_job):
    """Undoing the overlay's blend (picture * (1 - ALPHA) + colour * ALPHA) gives each segment's palette
    colour on its own pixels: the drawing and the masks sit on the picture, not beside or across it."""
    overlay = np.asarray(Image.open(io.BytesIO(unsupervised_job.overlay())).convert("RGB")).astype(float)
    assert overlay.shape == SCENE.image.shape
    tint = (overlay - (1 - ALPHA) * SCENE.image) / ALPHA
    segments = unsupervised_job.result().segments
    text = np.zeros(SCENE.classes.shape, bool)  # each label is drawn at its box's corner, over any segment
    for segment in segments:
        x, y, _, _ = segment.bbox
        text[y : y + 20, x : x + 10 * len(segment.label or f"#{segment.id}") + 10] = True
    for colour, segment in zip(palette(len(segments)), segments):
        inner = np.zeros_like(segment.mask)  # away from the white outlines (the picture's border included)
        inner[1:-1, 1:-1] = segment.mask[1:-1, 1:-1]
        for axis, shift in ((0, 1), (0, -1), (1, 1), (1, -1)):
            inner &= np.roll(segment.mask, shift, axis)
        close = np.abs(tint[inner & ~text] - colour).max(axis=-1) <= 3
        if close.size < 20:
            continue  # a sliver: all outline and text
        assert close.mean() > 0.99, f"segment {segment.id}: its colour on {close.mean():.0%} of its pixels"


PART_COLOURS = ("red", "blue", "green")


@pytest.fixture(scope="module")
def part_model(client):
    """A one-shot model of three colours, trained on one scene's parts."""
    scene = make_scene(21, HEIGHT, WIDTH, objects=(3, 3), repeat=0.0, palette=PART_COLOURS)
    return quality.train_parts(client, scene, RESOLUTION, epochs=15)


@pytest.mark.parametrize("crops_per_side", [1, 2])
def test_oneshot_parts_learned_on_one_scene_segment_another(client, part_model, crops_per_side):
    parts = part_model.labels[1:]
    scene = make_scene(22, HEIGHT, WIDTH, palette=PART_COLOURS)
    labels = part_model.segment(scene.image, crops_per_side=crops_per_side, seed=0).result().label_map()
    check_classes(labels, scene.classes, parts)


def test_imported_concepts_pick_their_colour_among_the_shapes(http, client):
    """Two concepts whose vectors are colour words' embeddings (under names that say nothing of the
    colour), imported as diffusers files through /concepts/import; each query's segment is its
    colour's object, among the scene's other shapes."""
    scene = make_scene(32, HEIGHT, WIDTH, objects=(4, 4), repeat=0.0)
    queries = []
    for identifier, target in (("my-thing", 1), ("her-thing", 2)):
        response = http.post(
            "/concepts/import",
            data={"identifier": identifier, "class_word": quality.CLASS_WORD},
            files={
                "embeddings": (
                    "learned_embeds.safetensors",
                    quality.concept_file(identifier, scene.objects[target - 1].colour),
                )
            },
        )
        assert response.status_code == 202, response.text
        concept = client.concept(response.json()["concept_id"]).wait()
        assert concept.status == "ready" and concept.state.method == "textual_inversion"
        # Without the class word: in tiny-colour "shape" covers every colour (quality.referring_queries).
        queries.append(f"a <{concept.state.identifier}>")
    result = client.segment_referring(scene.image, quality.CLASS_WORD, queries, resolution=RESOLUTION, seed=0).result()
    labels = result.label_map()
    for label, target in ((1, 1), (2, 2)):
        assert iou(labels == label, scene.instances == target) >= CLASS_FLOOR, (label, result.raw["instance_scores"])


SQUARE = make_scene(13, 224, 224)  # square: a transposed label map keeps its shape
BUGS = {
    "transposed labels": np.transpose,
    "a rotation applied twice": lambda labels: np.rot90(labels, 2),
    "an offset of a tenth of the side": lambda labels: np.roll(labels, labels.shape[1] // 10, axis=1),
}


def test_a_geometry_bug_fails_the_checks(http, client):
    """The checks above catch what the issue names: the right labels pass, the same labels transposed,
    rotated or shifted fail, and so do the labels of the picture sent with red and blue swapped."""
    labels = text_labels(http, png_bytes(SQUARE.image), SQUARE.present)
    check_classes(labels, SQUARE.classes, SQUARE.present)
    segments = client.segment_unsupervised(SQUARE.image, resolution=RESOLUTION, seed=0).result().label_map()
    check_segments(segments, SQUARE.classes)
    for bug in BUGS.values():
        with pytest.raises(AssertionError, match="off their regions"):
            check_classes(bug(labels), SQUARE.classes, SQUARE.present)
        with pytest.raises(AssertionError, match="off the regions"):
            check_segments(bug(segments), SQUARE.classes)
    swapped = text_labels(http, png_bytes(np.ascontiguousarray(SQUARE.image[..., ::-1])), SQUARE.present)
    with pytest.raises(AssertionError, match="off their regions"):
        check_classes(swapped, SQUARE.classes, SQUARE.present)


# Regression floors of the quality table (bench/RESULTS.md, N=100 at 384x512, tiny-colour v1), checked on its first
# 4 held-out scenes. At 256 with objects of 12-50 % of the shorter side (the 100 scenes: DiffSeg 0.716, selfcross
# 0.791, referring af_acc 0.655; these 4: 0.668, 0.717, 0.75). At 512 with objects of 22-50 %, where the issue's
# targets are met (the 100 scenes: 0.867, 0.914, 0.990; these 4: 0.840, 0.903, 1.0). One-shot's floor is the
# per-part test above (training on eight colours takes minutes).
FLOORS = {
    (256, (0.12, 0.5)): {"unsupervised": 0.62, "selfcross": 0.66, "referring": 0.62},
    (512, (0.22, 0.5)): {"unsupervised": 0.80, "selfcross": 0.86, "referring": 0.87},
}


@pytest.mark.parametrize(("resolution", "sizes"), list(FLOORS), ids=["256-small-objects", "512-large-objects"])
def test_quality_floors_on_held_out_scenes(client, resolution, sizes):
    world = quality.scenes(4, seed=1000, height=384, width=512, sizes=sizes)
    reached = {
        "unsupervised": quality.score_unsupervised(client, world, resolution)["miou"],
        "selfcross": quality.score_text(client, world, resolution)["miou"],
    }
    distinct = quality.scenes(4, seed=1000, height=384, width=512, repeat=0.0, sizes=sizes)
    identifiers = quality.colour_concepts(client, seed=1000)
    referring = quality.score_referring(client, distinct, identifiers, resolution)
    reached["referring"] = referring["af_acc"]
    assert sum(band["queries"] for band in referring["by_size"].values()) == referring["queries"] == 8
    floors = FLOORS[resolution, sizes]
    low = {name: round(value, 3) for name, value in reached.items() if value < floors[name]}
    assert not low, f"under the floors {floors}: {low}"


def test_the_playground_says_what_tiny_colour_is_and_draws_its_masks(stack, tmp_path):
    """The first thing a new user sees: what the model is, then a scene's colour words drawn in place.
    The screenshot lands in /tmp/ui-screens/ui-tiny-colour.png (docs/playground-tiny-colour.jpg is one)."""
    scene = make_scene(41, 360, 540)  # at resolution 512: finer masks for the eye
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=shutil.which("chromium") or "/usr/bin/chromium", args=["--no-sandbox"]
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900}, base_url=stack.base_url)
        page.goto("/ui")
        expect(page.locator("#model-note")).to_contain_text(f"tiny-colour: {NOTE}")
        page.click("label[for=method-text]")
        page.set_input_files("#picture", files=[ui.png(png_bytes(scene.image), "shapes.png")])
        page.fill("#classes", ", ".join(scene.present))
        job = ui.segment(page, "#segment-submit")
        names = page.locator("#legend li .name").all_text_contents()
        ui.screenshot(page, tmp_path, "ui-tiny-colour")
        browser.close()
    assert set(names) == {"background", *scene.present}
    labels = np.zeros(scene.classes.shape, np.int64)
    for segment in job["result"]["segments"]:
        labels[rle.decode(segment["segmentation"])] = segment["label_id"]
    check_classes(labels, scene.classes, scene.present)


def test_attnseg_evaluate_synthetic_prints_the_table_and_writes_json(stack, capsys, tmp_path):
    from cli.main import main

    output = tmp_path / "quality.json"
    main(
        ["evaluate", "synthetic", "--url", stack.base_url, "--scenes", "2", "--size", "192x256"]
        + ["--resolution", "256", "--methods", "unsupervised", "selfcross", "--output", str(output)]
    )
    printed = capsys.readouterr().out
    assert "unsupervised" in printed and "selfcross" in printed and "objects:" in printed
    scores = json.loads(output.read_text())
    assert scores["size"] == [192, 256] and set(scores["methods"]) == {"unsupervised", "selfcross"}
    assert all(s["scenes"] == 2 and 0 <= s["miou"] <= 1 for s in scores["methods"].values())
