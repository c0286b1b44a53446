"""The web playground at /ui in a real headless browser (Debian's chromium through Playwright) against
the real stack: Redis, the API with a key, and a tiny-random worker.

The masks of random weights mean nothing: these tests check what a person sees and does (overlay,
legend, toggles, downloads, progress, error messages) and that the page draws exactly the API's masks.
"""

import base64
import io
import json
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright
from pycocotools import mask as coco

from attnseg import rle
from attnseg.wording import count
from tests.support import Stack, image_bytes
from tests.test_e2e import two_part_example

pytestmark = pytest.mark.slow

API_KEY = "ui-test-key"
SCREENS = Path("/tmp/ui-screens")  # a copy of each screenshot, for people to look at
JOB_TIMEOUT_MS = 180_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # The page holds a tenant's key; the operator's key is the test's, to see the worker come up.
    stack = Stack(
        tmp_path_factory.mktemp("ui-stack"), ATTNSEG_API_KEY=API_KEY, ATTNSEG_ADMIN_KEYS="ui-operator-key"
    ).start_ready()
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def browser():
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(executable).exists(), "chromium is not installed (.ci/run installs it from Debian)"
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, stack):
    context = browser.new_context(
        viewport={"width": 1280, "height": 900}, accept_downloads=True, base_url=stack.base_url
    )
    page = context.new_page()
    problems = []
    # CSP violations and script errors surface here; failed requests (our 401s) are expected.
    page.on(
        "console",
        lambda m: m.type == "error" and not m.text.startswith("Failed to load resource") and problems.append(m.text),
    )
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto("/ui")
    expect(page.locator("html[data-ready=true]")).to_have_count(1)
    yield page
    context.close()
    assert not problems, problems


def use_key(page, key=API_KEY):
    page.fill("#api-key", key)
    page.click("#key-form button")


def png(image: bytes, name: str) -> dict:
    return {"name": name, "mimeType": "image/png", "buffer": image}


def screenshot(page, tmp_path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    SCREENS.mkdir(exist_ok=True)
    shutil.copy(path, SCREENS / path.name)
    return path


def canvas_pixels(page) -> np.ndarray:
    """The canvas as drawn, (H, W, 3) uint8."""
    url = page.eval_on_selector("#canvas", "canvas => canvas.toDataURL('image/png')")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def download_json(page) -> dict:
    with page.expect_download() as download:
        page.click("#download-json")
    return json.loads(Path(download.value.path()).read_text())


def expect_error_at(page, form: str, field: str, *messages: str) -> None:
    """The form's alert says each message and points at the field: marked invalid, and focused."""
    for message in messages:
        expect(page.locator(f"{form} .error")).to_contain_text(message)
    expect(page.locator(field)).to_have_attribute("aria-invalid", "true")
    expect(page.locator(field)).to_be_focused()


def segment(page, submit: str) -> dict:
    """Presses a form's Segment button, waits for the result's legend; the job, as the page downloads it."""
    page.click(submit)
    expect(page.locator("#legend li").first).to_be_visible(timeout=JOB_TIMEOUT_MS)
    return download_json(page)


def check_drawn_mask(page, picture: bytes, segment: dict, index: int):
    """The page draws the API's masks: segment `index` (legend order) is tinted, and hiding it restores the
    picture on exactly its pixels. Returns the picture, the canvas before hiding and the mask."""
    original = np.asarray(Image.open(io.BytesIO(picture)).convert("RGB")).astype(int)
    shown = canvas_pixels(page).astype(int)
    assert shown.shape == original.shape
    mask = coco.decode(
        {"size": segment["segmentation"]["size"], "counts": segment["segmentation"]["counts"].encode()}
    ).astype(bool)
    assert (np.abs(shown - original).max(axis=-1)[mask] > 2).mean() > 0.9  # tinted
    page.click(f"#segment-toggle-{index}")
    expect(page.locator("#legend li").nth(index)).to_have_class(re.compile(r"\boff\b"))
    hidden = canvas_pixels(page).astype(int)
    assert np.abs(hidden - original)[mask].max() <= 2
    np.testing.assert_array_equal(hidden[~mask], shown[~mask])
    return original, shown, mask


def test_the_page_is_served_with_its_assets_under_a_strict_policy(stack):
    with httpx.Client(base_url=stack.base_url) as http:
        redirect = http.get("/ui")
        assert redirect.status_code in (307, 308) and redirect.headers["location"].endswith("/ui/")
        index = http.get("/ui/")
        assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in index.headers["content-security-policy"]
        assert index.headers["x-content-type-options"] == "nosniff"
        assert index.headers["referrer-policy"] == "no-referrer"
        for asset in re.findall(r'(?:src|href)="((?:js/)?[\w.]+\.(?:js|css|svg))"', index.text):
            assert http.get(f"/ui/{asset}").status_code == 200, asset
        script = http.get("/ui/js/app.js")
        assert script.headers["content-type"].startswith("text/javascript")
        assert "<script>" not in index.text and "style=" not in index.text  # nothing inline: CSP-safe
        assert http.get("/ui/nope.js").status_code == 404


def test_rle_decoder_matches_the_python_encoder(page):
    rng = np.random.default_rng(0)
    masks = [
        np.zeros((1, 1), bool),
        np.ones((1, 1), bool),
        np.ones((7, 1), bool),
        np.zeros((1, 9), bool),
        rng.random((23, 37)) > 0.5,
        rng.random((64, 48)) > 0.9,
        np.ones((40, 30), bool),
    ]
    stripes = np.zeros((50, 80), bool)
    stripes[:, ::3] = True
    masks.append(stripes)
    encoded = [rle.encode(mask) for mask in masks]
    decoded = page.evaluate(
        """async (rles) => {
        const { labelMap } = await import("./js/rle.js");
        return rles.map((r) => Array.from(labelMap([{ id: 1, segmentation: r }], ...r.size)));
    }""",
        encoded,
    )
    for mask, flat in zip(masks, decoded):  # segment index 0 where the mask is set, -1 elsewhere
        np.testing.assert_array_equal(np.array(flat).reshape(mask.shape), np.where(mask, 0, -1))
    # Several segments: each pixel gets the index of the segment covering it.
    labels = rng.integers(0, 5, (30, 20))
    segments = [{"id": i + 1, "segmentation": rle.encode(labels == i)} for i in range(5)]
    painted = page.evaluate(
        """async (segments) => Array.from(
        (await import("./js/rle.js")).labelMap(segments, 30, 20))""",
        segments,
    )
    np.testing.assert_array_equal(np.array(painted).reshape(30, 20), labels)
    # Counts past 2^31 (pictures over 2 Gpx are refused, but the string format allows them) and deltas < 0.
    counts = [0, 5, 2**31 + 7, 3, 2**40, 1, 2]
    assert (
        page.evaluate(
            """async (text) => (await import("./js/rle.js")).stringToCounts(text)""", rle.counts_to_string(counts)
        )
        == counts
    )
    message = page.evaluate("""async () => {
        const { labelMap } = await import("./js/rle.js");
        try { labelMap([{ id: 1, segmentation: { size: [2, 2], counts: [1, 2] } }], 2, 2); return null; }
        catch (e) { return e.message; }
    }""")
    assert message == "RLE covers 3 pixels, its size says 4"


def test_every_control_is_labelled_and_reachable_by_keyboard(page):
    unlabelled = page.evaluate("""() => [...document.querySelectorAll("input, select, textarea, button")]
        .filter((el) => !(el.labels?.length || el.getAttribute("aria-label") || el.getAttribute("aria-labelledby")
                          || (el.tagName === "BUTTON" && el.textContent.trim())))
        .map((el) => el.outerHTML)""")
    assert unlabelled == []
    page.keyboard.press("Tab")
    expect(page.locator(".skip")).to_be_focused()
    page.focus("#method-unsupervised")
    page.keyboard.press("ArrowRight")  # a radio group: arrows change the method
    expect(page.locator("#method-text")).to_be_checked()
    expect(page.locator("#classes")).to_be_visible()
    page.keyboard.press("Tab")
    expect(page.locator("#picture")).to_be_focused()  # the drop zone's file input, next in order
    outline = page.eval_on_selector(".drop-zone", "el => getComputedStyle(el).boxShadow")
    assert outline != "none"  # its focus ring shows on the zone


def test_unsupervised_overlay_legend_toggle_and_download(page, stack, tmp_path):
    use_key(page)
    expect(page.locator("#service-status")).to_contain_text("Service ready")  # a tenant: no worker details
    picture = image_bytes(300, 200, seed=1)
    page.set_input_files("#picture", files=[png(picture, "regions.png")])
    expect(page.locator("#segment-form .drop-text")).to_have_text("regions.png")
    page.click("#segment-form summary")
    page.select_option("#resolution", "256")
    page.fill("#grid", "8")
    page.fill("#kl_threshold", "0.0003")  # random weights: near-uniform attention, one segment at the default
    page.fill("#seed", "3")
    job = segment(page, "#segment-submit")
    legend = page.locator("#legend li")
    expect(page.locator("#segment-progress .progress-text")).to_have_text("Done.")
    assert job["status"] == "succeeded" and job["params"]["seed"] == 3 and job["params"]["resolution"] == 256
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        assert http.get(f"/jobs/{job['id']}").json()["result"] == job["result"]
    segments = job["result"]["segments"]
    assert len(segments) >= 2
    expect(legend).to_have_count(len(segments))
    expect(page.locator("#canvas")).to_have_attribute(
        "aria-label", f"The picture with {len(segments)} segments drawn over it"
    )
    expect(legend.nth(1).locator(".name")).to_have_text("segment 2")

    original, shown, second = check_drawn_mask(page, picture, segments[1], 1)
    screenshot(page, tmp_path, "ui-unsupervised")

    # Pointing at the segment names it; clicking it shows it again.
    ys, xs = np.nonzero(second)
    box = page.locator("#canvas").bounding_box()
    scale = box["width"] / second.shape[1]
    where = {"x": (xs[len(xs) // 2] + 0.5) * scale, "y": (ys[len(ys) // 2] + 0.5) * scale}
    page.hover("#canvas", position=where)
    expect(page.locator("#hover-label")).to_have_text("segment 2 (hidden) · click to toggle")
    page.click("#canvas", position=where)
    expect(legend.nth(1)).not_to_have_class(re.compile(r"\boff\b"))
    expect(page.locator("#segment-toggle-1")).to_be_checked()

    page.click("#show-none")
    assert np.abs(canvas_pixels(page).astype(int) - original).max() <= 2
    page.click("#show-all")
    np.testing.assert_array_equal(canvas_pixels(page), shown)

    # An error after a success: the error alone, not the last job's "Done." and full bar above an empty result.
    text_file = {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a picture"}
    page.set_input_files("#picture", files=[text_file])
    page.click("#segment-submit")
    expect_error_at(page, "#segment-form", "#picture", "415")
    expect(page.locator("#segment-progress")).to_be_hidden()
    expect(page.locator("#canvas")).to_be_hidden()
    screenshot(page, tmp_path, "ui-error-after-success")


def test_text_method_with_classes(page, tmp_path):
    use_key(page)
    page.click("label[for=method-text]")
    expect(page.locator("#classes")).to_be_visible()
    expect(page.locator("#kl_threshold")).to_be_hidden()
    page.set_input_files("#picture", files=[png(image_bytes(240, 160, seed=2), "park.png")])
    page.fill("#classes", "dog, grass, person with clothes")
    page.click("#segment-form summary")
    expect(page.locator("#samples")).to_be_visible()
    page.select_option("#text-method", "gem")
    expect(page.locator("#samples")).to_be_hidden()  # selfcross only
    expect(page.locator("#t-timestep")).to_be_hidden()  # gem has no SD pass
    page.select_option("#resolution", "256")
    job = segment(page, "#segment-submit")
    names = page.locator("#legend li .name").all_text_contents()
    assert names and set(names) <= {"background", "dog", "grass", "person with clothes"}
    assert len(set(names)) == len(names)
    expect(page.locator("#result-title")).to_have_text("Result · gem")
    expect(page.locator("#result-meta")).to_contain_text("random weights")
    assert job["kind"] == "text" and job["params"]["classes"] == ["dog", "grass", "person with clothes"]
    assert job["params"]["method"] == "gem" and job["params"]["resolution"] == 256
    screenshot(page, tmp_path, "ui-text")


def test_asking_again_about_the_same_picture_sends_its_id(page):
    use_key(page)
    page.click("label[for=method-text]")
    picture = image_bytes(96, 64, seed=5)
    page.set_input_files("#picture", files=[png(picture, "again.png")])
    page.click("#segment-form summary")
    page.select_option("#resolution", "256")
    # What each segmentation POST carried: its form parts, and whether each is a file.
    page.evaluate(
        """() => {
          window.sentParts = [];
          const send = window.fetch;
          window.fetch = (url, options) => {
            if (options?.body instanceof FormData && String(url).includes("/segment/"))
              window.sentParts.push([...options.body.entries()].map(([name, value]) => [name, value instanceof File]));
            return send(url, options);
          };
        }"""
    )
    page.fill("#classes", "dog")
    first = segment(page, "#segment-submit")
    page.fill("#classes", "cat, grass")  # only the classes change
    second = segment(page, "#segment-submit")
    assert second["params"]["classes"] == ["cat", "grass"]
    assert second["result"]["image"] == first["result"]["image"]
    first_parts, second_parts = (dict(parts) for parts in page.evaluate("window.sentParts"))
    assert first_parts["image"] is True and "image_id" not in first_parts
    assert second_parts["image_id"] is False and "image" not in second_parts  # the id, not the bytes


def test_api_errors_are_shown_next_to_what_to_fix(page, tmp_path):
    page.set_input_files("#picture", files=[png(image_bytes(64, 64), "p.png")])
    use_key(page, "wrong-key")
    page.click("#segment-submit")
    expect_error_at(page, "#segment-form", "#api-key", "401 unauthorized", "API key")
    assert page.evaluate("sessionStorage.getItem('attnseg.apiKey')") == "wrong-key"

    use_key(page)
    page.click("label[for=method-text]")
    page.fill("#classes", "dog.cat, grass")
    page.click("#segment-submit")
    expect_error_at(page, "#segment-form", "#classes", "422 invalid_field", "'dog.cat' contains ',' or '.'")
    screenshot(page, tmp_path, "ui-error")
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: one column, nothing wider than the screen
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    expect(page.locator("#classes")).to_be_in_viewport()
    screenshot(page, tmp_path, "ui-phone")
    page.set_viewport_size({"width": 1280, "height": 900})

    page.click("label[for=method-unsupervised]")
    page.click("#segment-form summary")
    page.fill("#kl_threshold", "0")
    page.click("#segment-form summary")  # closed again: the error opens it to show the field
    page.click("#segment-submit")
    expect_error_at(page, "#segment-form", "#kl_threshold", "kl_threshold")
    expect(page.locator("#segment-form details")).to_have_attribute("open", "")


MODEL_NAME = "Toy cars seen from the side, in two halves"


def test_oneshot_train_with_live_progress_then_segment(page, tmp_path):
    use_key(page)
    page.click("label[for=method-oneshot]")
    image, mask = two_part_example()
    page.set_input_files("#train-image", files=[png(image, "car.png")])
    page.set_input_files("#train-mask", files=[png(mask, "car_mask.png")])
    expect(page.locator("#mask-help")).to_contain_text("part ids 1, 2: name 2 part(s)")
    page.fill("#labels", "left, right")
    page.fill("#model-name", MODEL_NAME)
    page.click("#train-form summary")
    page.fill("#epochs", "40")  # long enough (seconds) for the page's 2 s polls to see it train
    page.select_option("#train-resolution", "256")
    page.fill("#train-seed", "0")
    # Every progress text the page shows, to check the live epoch / loss / IoU line.
    page.evaluate("""() => {
        window.progressSeen = [];
        const text = document.querySelector("#train-progress-text");
        new MutationObserver(() => window.progressSeen.push(text.textContent))
            .observe(text, { childList: true, characterData: true, subtree: true });
    }""")
    page.click("#train-submit")
    done = re.compile(r"^Done: epoch 40 / 40 · loss \d+\.\d{3} · best IoU \d\.\d\d$")
    expect(page.locator("#train-progress-text")).to_have_text(done, timeout=JOB_TIMEOUT_MS)
    seen = page.evaluate("window.progressSeen")
    assert any(
        re.fullmatch(r"Training: epoch \d+ / 40 · loss \d+\.\d{3}( · best IoU \d\.\d\d)?", text) for text in seen
    ), seen
    expect(page.locator("#train-progress progress")).to_have_js_property("value", 1)
    model = page.locator("#model option:checked")
    expect(model).to_have_text(re.compile(rf"^{re.escape(MODEL_NAME)} \(ready, IoU \d\.\d\d\)$"))
    # The whole name, its parts and its id are under the list, wrapped rather than cut.
    info = page.locator("#model-info")
    expect(info).to_contain_text(f"{MODEL_NAME} · parts: left, right · id ")
    assert page.eval_on_selector("#model-info", "el => el.scrollWidth <= el.clientWidth")

    page.set_input_files("#oneshot-picture", files=[png(image, "new_car.png")])
    job = segment(page, "#oneshot-segment-submit")
    assert set(page.locator("#legend li .name").all_text_contents()) <= {"background", "left", "right"}
    expect(page.locator("#result-title")).to_have_text("Result · one-shot")
    assert job["kind"] == "oneshot_segment" and job["result"]["labels"] == ["background", "left", "right"]
    screenshot(page, tmp_path, "ui-oneshot")

    # A long training can be canceled from the page.
    page.fill("#epochs", "2000")
    page.click("#train-submit")
    expect(page.locator("#train-progress-text")).to_contain_text("Training: epoch", timeout=JOB_TIMEOUT_MS)
    page.click("#train-progress .cancel")
    expect(page.locator("#train-progress-text")).to_have_text("Canceled.", timeout=JOB_TIMEOUT_MS)
    expect(page.locator("#train-submit")).to_be_enabled()


def object_photos(count: int) -> list[dict]:
    return [png(image_bytes(64, 64, seed=i), f"mug{i}.png") for i in range(count)]


def legend_names(result: dict, class_word: str) -> list[str]:
    """What the legend should say: each segment's label; the class's other instances numbered after the queries."""
    others = iter(range(1, len(result["segments"]) + 1))
    return [
        s["label"] if s["label_id"] is not None else f"other {class_word} {next(others)}" for s in result["segments"]
    ]


def test_find_my_object_teach_a_concept_then_find_it(page, tmp_path):
    use_key(page)
    page.click("label[for=method-referring]")
    expect(page.locator("#concept-identifier")).to_be_visible()
    expect(page.locator("#picture")).to_be_hidden()
    page.set_input_files("#concept-photos", files=object_photos(3))
    expect(page.locator("#concept-train-form .drop-text").first).to_have_text("3 files: mug0.png, mug1.png, mug2.png")
    page.fill("#concept-identifier", "ui-mug")
    page.fill("#concept-class-word", "mug")
    page.fill("#concept-name", "Grandma's blue mug")
    page.click("#concept-train-form summary")
    page.fill("#concept-steps", "2")
    page.fill("#concept-batch-size", "1")
    page.select_option("#concept-resolution", "256")
    page.fill("#concept-seed", "0")
    page.click("#concept-train-submit")
    # Listed and chosen as soon as it is submitted (a query may name it while it trains).
    expect(page.locator("#queries")).to_have_value("<ui-mug> mug")
    expect(page.locator("#referring-class-word")).to_have_value("mug")
    done = re.compile(r"^Done: step 2 / 2 · loss \d+\.\d{3}$")
    expect(page.locator("#concept-progress-text")).to_have_text(done, timeout=JOB_TIMEOUT_MS)
    expect(page.locator("#concept-progress progress")).to_have_js_property("value", 1)
    expect(page.locator("#concept option:checked")).to_have_text("Grandma's blue mug (ready)")
    expect(page.locator("#concept-info")).to_have_text("Grandma's blue mug · <ui-mug> mug")

    scene = image_bytes(128, 96, seed=5)
    page.set_input_files("#referring-picture", files=[png(scene, "table.png")])
    page.fill("#queries", "<ui-mug> mug\na red mug")
    page.click("#referring-form summary")
    page.select_option("#referring-resolution", "256")
    page.fill("#referring-seed", "5")
    job = segment(page, "#referring-submit")
    result = job["result"]
    expect(page.locator("#result-title")).to_have_text("Result · referring")
    assert job["kind"] == "referring" and result["labels"] == ["background", "<ui-mug> mug", "a red mug"]
    # Random weights find one instance: one query gets it, the other is said not found.
    expect(page.locator("#legend li .name")).to_have_text(legend_names(result, "mug"))
    found = [i for i, s in enumerate(result["segments"]) if s["label_id"]]
    missing = [
        label
        for label_id, label in enumerate(result["labels"][1:], 1)
        if label_id not in {s["label_id"] for s in result["segments"]}
    ]
    meta = page.locator("#result-meta")
    expect(meta).to_contain_text(count(result["instances"], "instance"))  # "1 instance", not "1 instances"
    if missing:
        expect(meta).to_contain_text(f"not found: {', '.join(missing)}")
    assert found and len(found) + len(missing) == 2
    check_drawn_mask(page, scene, result["segments"][found[0]], found[0])
    screenshot(page, tmp_path, "ui-referring")

    # A training error after a success, on a phone: the error, not "Done: step 2 / 2" beside it.
    page.set_viewport_size({"width": 390, "height": 844})
    page.set_input_files("#concept-photos", files=object_photos(2))
    page.fill("#concept-identifier", "ui-mug-2")
    page.click("#concept-train-submit")
    expect_error_at(page, "#concept-train-form", "#concept-photos", "give 3 to 20 photos of the object, got 2")
    expect(page.locator("#concept-progress")).to_be_hidden()
    screenshot(page, tmp_path, "ui-phone-training-error")
    page.set_viewport_size({"width": 1280, "height": 900})

    page.click("#concept-delete")
    expect(page.locator("#concept option:checked")).to_have_text("No object yet")


def answer_referring(page, queries: list[str], result: dict) -> None:
    """The page's next referring job is answered here: queued, then succeeded with `result`."""
    queued = {
        "id": "made-up",
        "kind": "referring",
        "status": "queued",
        "progress": {"stage": "queued", "fraction": 0},
        "params": {"class_word": "mug", "queries": queries, "seed": 1, "resolution": 256},
    }
    page.route("**/segment/referring", lambda route: route.fulfill(status=202, json=queued))
    page.route(
        re.compile(r"/jobs/made-up\?"),
        lambda route: route.fulfill(
            json={**queued, "status": "succeeded", "progress": {"stage": "done", "fraction": 1}, "result": result}
        ),
    )


def test_find_my_object_names_and_colours_every_instance(page, tmp_path):
    """Several instances (random weights only ever find one): the API's answers are replaced by a result
    made the way the worker makes it, to see the queries and the other instances in the legend and drawn."""
    scene = image_bytes(120, 90, seed=7)
    queries = ["<my-mug> mug", "a red mug"]
    labels = np.zeros((90, 120), np.int64)  # as the worker's: 0 background, 1 + query index, then the others
    for label in range(1, 5):
        labels[20:70, 30 * (label - 1) : 30 * label] = label
    names, label_ids = ["background", *queries, None, None], [0, 1, 2, None, None]
    segments = [
        {
            "id": i + 1,
            "label": names[label],
            "label_id": label_ids[label],
            "score": None,
            "area": area,
            "bbox": box,
            "segmentation": mask,
        }
        for i, (label, mask, area, box) in enumerate(rle.label_map_to_segments(labels))
    ]
    result = {
        "image": {"width": 120, "height": 90},
        "segments": segments,
        "labels": ["background", *queries],
        "instances": 4,
        "instance_scores": [[0.9, 0.1, 0.1, 0.1], [0.1, 0.8, 0.1, 0.1]],
        "random_weights": False,
        "timings_ms": {"inference": 1200.0},
    }
    answer_referring(page, queries, result)
    use_key(page)
    page.click("label[for=method-referring]")
    page.set_input_files("#referring-picture", files=[png(scene, "table.png")])
    page.fill("#referring-class-word", "mug")
    page.fill("#queries", "\n".join(queries))
    page.click("#referring-submit")
    names = page.locator("#legend li .name")
    expect(names).to_have_text(
        ["background", "<my-mug> mug", "a red mug", "other mug 1", "other mug 2"], timeout=JOB_TIMEOUT_MS
    )
    assert legend_names(result, "mug") == names.all_text_contents()
    swatches = page.eval_on_selector_all("#legend .swatch", "els => els.map((el) => el.style.backgroundColor)")
    assert len(set(swatches)) == 5, swatches
    expect(page.locator("#result-meta")).to_contain_text("5 segments · 4 instances · 120×90 px")
    expect(page.locator("#result-meta")).not_to_contain_text("not found")
    check_drawn_mask(page, scene, segments[4], 4)
    ys, xs = np.nonzero(labels == 3)
    box = page.locator("#canvas").bounding_box()
    scale = box["width"] / 120
    page.hover("#canvas", position={"x": (xs[len(xs) // 2] + 0.5) * scale, "y": (ys[len(ys) // 2] + 0.5) * scale})
    expect(page.locator("#hover-label")).to_have_text("other mug 1 · click to toggle")
    screenshot(page, tmp_path, "ui-referring-instances")


def test_find_my_object_errors_are_shown_next_to_the_field(page):
    use_key(page)
    page.click("label[for=method-referring]")
    page.set_input_files("#concept-photos", files=object_photos(2))
    page.fill("#concept-identifier", "two-mugs")
    page.fill("#concept-class-word", "mug")
    page.click("#concept-train-submit")
    expect_error_at(
        page, "#concept-train-form", "#concept-photos", "422 invalid_field", "give 3 to 20 photos of the object, got 2"
    )

    page.set_input_files("#concept-photos", files=object_photos(3))
    page.fill("#concept-identifier", "my mug!")
    page.click("#concept-train-submit")
    expect_error_at(page, "#concept-train-form", "#concept-identifier", "422 invalid_field", "identifier")

    page.set_input_files("#referring-picture", files=[png(image_bytes(64, 64), "table.png")])
    page.fill("#referring-class-word", "mug")
    page.fill("#queries", "<nobody> mug")
    page.click("#referring-submit")
    expect_error_at(page, "#referring-form", "#queries", "422 unknown_concept", "<nobody> is not a concept of yours")


def test_the_key_states_are_said_by_the_key_field(page, tmp_path):
    """With keys on, a missing or refused key is said as such (a worker is ready all along)."""
    status, pill = page.locator("#key-status"), page.locator("#service-status")
    expect(pill).to_have_text("Keys are on: enter your API key")
    expect(page.locator("footer")).to_have_text(re.compile(r"decoded in this page\s*$"))  # no dangling "·"
    screenshot(page, tmp_path, "ui-key-missing")

    use_key(page, "wrong-key")
    expect(status).to_have_text("Key not accepted")
    expect(page.locator("#api-key")).to_have_attribute("aria-invalid", "true")
    expect(pill).to_have_text("The API key was not accepted: check it")
    screenshot(page, tmp_path, "ui-key-wrong")

    use_key(page)  # a tenant's key: the bare verdict
    expect(status).to_have_text("Key accepted")
    expect(page.locator("#api-key")).not_to_have_attribute("aria-invalid", "true")
    expect(pill).to_have_text("Service ready")
    expect(page.locator("footer")).to_have_text(re.compile(r"decoded in this page\s*$"))
    screenshot(page, tmp_path, "ui-key-accepted")

    use_key(page, "ui-operator-key")  # an operator's: the workers too
    expect(status).to_have_text("Key accepted")
    expect(pill).to_contain_text("1 worker ready")
    expect(page.locator("footer")).to_have_text(re.compile(r"decoded in this page · \S+: cpu\s*$"))


def test_one_segment_and_one_instance_are_singular(page, tmp_path):
    scene = image_bytes(80, 60, seed=3)
    mask = rle.label_map_to_segments(np.ones((60, 80), np.int64))[0][1]
    segment = {"id": 1, "label": "a mug", "label_id": 1, "score": 0.5, "area": 4800, "bbox": [0, 0, 80, 60]}
    result = {
        "image": {"width": 80, "height": 60},
        "segments": [{**segment, "segmentation": mask}],
        "labels": ["background", "a mug"],
        "instances": 1,
        "random_weights": False,
        "timings_ms": {"inference": 900.0},
    }
    answer_referring(page, ["a mug"], result)
    use_key(page)
    page.click("label[for=method-referring]")
    page.set_input_files("#referring-picture", files=[png(scene, "one.png")])
    page.fill("#referring-class-word", "mug")
    page.fill("#queries", "a mug")
    page.click("#referring-submit")
    expect(page.locator("#result-meta")).to_contain_text("1 segment · 1 instance · 80×60 px", timeout=JOB_TIMEOUT_MS)
    expect(page.locator("#canvas")).to_have_attribute("aria-label", "The picture with 1 segment drawn over it")
    screenshot(page, tmp_path, "ui-singular")
