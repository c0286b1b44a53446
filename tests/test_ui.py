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
from tests.support import Stack, image_bytes
from tests.test_e2e import two_part_example

pytestmark = pytest.mark.slow

API_KEY = "ui-test-key"
SCREENS = Path("/tmp/ui-screens")  # a copy of each screenshot, for people to look at
JOB_TIMEOUT_MS = 180_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("ui-stack"), ATTNSEG_API_KEY=API_KEY).start_ready()
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
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True,
                                  base_url=stack.base_url)
    page = context.new_page()
    problems = []
    # CSP violations and script errors surface here; failed requests (our 401s) are expected.
    page.on("console", lambda m: m.type == "error" and not m.text.startswith("Failed to load resource")
            and problems.append(m.text))
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
    masks = [np.zeros((1, 1), bool), np.ones((1, 1), bool), np.ones((7, 1), bool), np.zeros((1, 9), bool),
             rng.random((23, 37)) > 0.5, rng.random((64, 48)) > 0.9, np.ones((40, 30), bool)]
    stripes = np.zeros((50, 80), bool)
    stripes[:, ::3] = True
    masks.append(stripes)
    encoded = [rle.encode(mask) for mask in masks]
    decoded = page.evaluate("""async (rles) => {
        const { labelMap } = await import("./js/rle.js");
        return rles.map((r) => Array.from(labelMap([{ id: 1, segmentation: r }], ...r.size)));
    }""", encoded)
    for mask, flat in zip(masks, decoded):  # segment index 0 where the mask is set, -1 elsewhere
        np.testing.assert_array_equal(np.array(flat).reshape(mask.shape), np.where(mask, 0, -1))
    # Several segments: each pixel gets the index of the segment covering it.
    labels = rng.integers(0, 5, (30, 20))
    segments = [{"id": i + 1, "segmentation": rle.encode(labels == i)} for i in range(5)]
    painted = page.evaluate("""async (segments) => Array.from(
        (await import("./js/rle.js")).labelMap(segments, 30, 20))""", segments)
    np.testing.assert_array_equal(np.array(painted).reshape(30, 20), labels)
    # Counts past 2^31 (pictures over 2 Gpx are refused, but the string format allows them) and deltas < 0.
    counts = [0, 5, 2**31 + 7, 3, 2**40, 1, 2]
    assert page.evaluate("""async (text) => (await import("./js/rle.js")).stringToCounts(text)""",
                         rle.counts_to_string(counts)) == counts
    message = page.evaluate("""async () => {
        const { labelMap } = await import("./js/rle.js");
        try { labelMap([{ id: 1, segmentation: { size: [2, 2], counts: [1, 2] } }], 2, 2); return null; }
        catch (e) { return e.message; }
    }""")
    assert message == "RLE covers 3 pixels, its size says 4"


def test_every_control_is_labelled_and_reachable_by_keyboard(page):
    unlabelled = page.evaluate("""() => [...document.querySelectorAll("input, select, button")]
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
    expect(page.locator("#service-status")).to_contain_text("1 worker ready")
    picture = image_bytes(300, 200, seed=1)
    page.set_input_files("#picture", files=[png(picture, "regions.png")])
    expect(page.locator("#segment-form .drop-text")).to_have_text("regions.png")
    page.click("#segment-form summary")
    page.select_option("#resolution", "256")
    page.fill("#grid", "8")
    page.fill("#kl_threshold", "0.0003")  # random weights: near-uniform attention, one segment at the default
    page.fill("#seed", "3")
    page.click("#segment-submit")
    legend = page.locator("#legend li")
    expect(legend.first).to_be_visible(timeout=JOB_TIMEOUT_MS)
    expect(page.locator("#segment-progress .progress-text")).to_have_text("Done.")

    job = download_json(page)
    assert job["status"] == "succeeded" and job["params"]["seed"] == 3 and job["params"]["resolution"] == 256
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        assert http.get(f"/jobs/{job['id']}").json()["result"] == job["result"]
    segments = job["result"]["segments"]
    assert len(segments) >= 2
    expect(legend).to_have_count(len(segments))
    expect(page.locator("#canvas")).to_have_attribute("aria-label",
                                                      f"The picture with {len(segments)} segments drawn over it")
    expect(legend.nth(1).locator(".name")).to_have_text("segment 2")

    # The page draws the API's masks: hiding segment 2 restores the picture on exactly its pixels.
    original = np.asarray(Image.open(io.BytesIO(picture)).convert("RGB")).astype(int)
    shown = canvas_pixels(page).astype(int)
    assert shown.shape == original.shape
    second = coco.decode({"size": segments[1]["segmentation"]["size"],
                          "counts": segments[1]["segmentation"]["counts"].encode()}).astype(bool)
    assert (np.abs(shown - original).max(axis=-1)[second] > 2).mean() > 0.9  # tinted
    page.click("#segment-toggle-1")
    expect(legend.nth(1)).to_have_class(re.compile(r"\boff\b"))
    hidden = canvas_pixels(page).astype(int)
    assert np.abs(hidden - original)[second].max() <= 2
    np.testing.assert_array_equal(hidden[~second], shown[~second])
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
    page.click("#segment-submit")
    legend = page.locator("#legend li .name")
    expect(legend.first).to_be_visible(timeout=JOB_TIMEOUT_MS)
    names = legend.all_text_contents()
    assert names and set(names) <= {"background", "dog", "grass", "person with clothes"}
    assert len(set(names)) == len(names)
    expect(page.locator("#result-title")).to_have_text("Result · gem")
    expect(page.locator("#result-meta")).to_contain_text("random weights")
    job = download_json(page)
    assert job["kind"] == "text" and job["params"]["classes"] == ["dog", "grass", "person with clothes"]
    assert job["params"]["method"] == "gem" and job["params"]["resolution"] == 256
    screenshot(page, tmp_path, "ui-text")


def test_api_errors_are_shown_next_to_what_to_fix(page, tmp_path):
    page.set_input_files("#picture", files=[png(image_bytes(64, 64), "p.png")])
    use_key(page, "wrong-key")
    page.click("#segment-submit")
    error = page.locator("#segment-form .error")
    expect(error).to_contain_text("401 unauthorized")
    expect(error).to_contain_text("API key")
    expect(page.locator("#api-key")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#api-key")).to_be_focused()
    assert page.evaluate("sessionStorage.getItem('attnseg.apiKey')") == "wrong-key"

    use_key(page)
    page.click("label[for=method-text]")
    page.fill("#classes", "dog.cat, grass")
    page.click("#segment-submit")
    expect(error).to_contain_text("422 invalid_field")
    expect(error).to_contain_text("'dog.cat' contains ',' or '.'")
    expect(page.locator("#classes")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#classes")).to_be_focused()
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
    expect(error).to_contain_text("kl_threshold")
    expect(page.locator("#kl_threshold")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#segment-form details")).to_have_attribute("open", "")


def test_oneshot_train_with_live_progress_then_segment(page, tmp_path):
    use_key(page)
    page.click("label[for=method-oneshot]")
    image, mask = two_part_example()
    page.set_input_files("#train-image", files=[png(image, "car.png")])
    page.set_input_files("#train-mask", files=[png(mask, "car_mask.png")])
    expect(page.locator("#mask-help")).to_contain_text("part ids 1, 2: name 2 part(s)")
    page.fill("#labels", "left, right")
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
    assert any(re.fullmatch(r"Training: epoch \d+ / 40 · loss \d+\.\d{3}( · best IoU \d\.\d\d)?", text)
               for text in seen), seen
    expect(page.locator("#train-progress progress")).to_have_js_property("value", 1)
    model = page.locator("#model option:checked")
    expect(model).to_contain_text(re.compile(r"^left, right \(ready, IoU \d\.\d\d\)"))

    page.set_input_files("#oneshot-picture", files=[png(image, "new_car.png")])
    page.click("#oneshot-segment-submit")
    names = page.locator("#legend li .name")
    expect(names.first).to_be_visible(timeout=JOB_TIMEOUT_MS)
    assert set(names.all_text_contents()) <= {"background", "left", "right"}
    expect(page.locator("#result-title")).to_have_text("Result · one-shot")
    job = download_json(page)
    assert job["kind"] == "oneshot_segment" and job["result"]["labels"] == ["background", "left", "right"]
    screenshot(page, tmp_path, "ui-oneshot")

    # A long training can be canceled from the page.
    page.fill("#epochs", "2000")
    page.click("#train-submit")
    expect(page.locator("#train-progress-text")).to_contain_text("Training: epoch", timeout=JOB_TIMEOUT_MS)
    page.click("#train-progress .cancel")
    expect(page.locator("#train-progress-text")).to_have_text("Canceled.", timeout=JOB_TIMEOUT_MS)
    expect(page.locator("#train-submit")).to_be_enabled()
