"""`attnseg evaluate` on a small generated dataset, with tiny-random weights (scores mean nothing;
the test checks the protocol runs, pairs files and reports well-formed scores)."""

import json

import numpy as np
import pytest
from PIL import Image

from cli.main import main


@pytest.fixture
def dataset(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        label = np.zeros((80, 96), np.uint8)
        label[:, 48:] = 1
        label[20:60, 10:40] = 2
        label[0, 0] = 255  # ignored
        pixels = (
            np.array([[30, 30, 30], [200, 50, 50], [40, 200, 60]])[np.minimum(label, 2)]
            + rng.integers(0, 20, (80, 96, 3))
        ).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"img{index}.png")
        Image.fromarray(label).save(labels / f"img{index}.png")
    return images, labels


@pytest.fixture
def tiny_env(monkeypatch, tiny_sd_dir, tmp_path):
    from attnseg.settings import get_settings

    monkeypatch.setenv("ATTNSEG_SD_MODEL", str(tiny_sd_dir))
    monkeypatch.setenv("ATTNSEG_CLIP_MODEL", "tiny-random")
    monkeypatch.setenv("ATTNSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ATTNSEG_DEVICE", "cpu")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def run(capsys, *argv) -> dict:
    main(["evaluate", *argv])
    return json.loads(capsys.readouterr().out)


def check_unit_interval(*values):
    for value in values:
        assert 0.0 <= value <= 1.0


def test_unsupervised_protocol(dataset, tiny_env, capsys, tmp_path):
    images, labels = dataset
    out = run(
        capsys,
        "unsupervised",
        "--images",
        str(images),
        "--labels",
        str(labels),
        "--num-classes",
        "3",
        "--resolution",
        "256",
        "--output",
        str(tmp_path / "scores.json"),
    )
    assert out["protocol"] == "unsupervised" and out["images"] == 2 and out["random_weights"] is True
    check_unit_interval(out["pixel_accuracy"], out["miou"])
    assert len(out["per_class_iou"]) == 3
    assert json.loads((tmp_path / "scores.json").read_text()) == out


def test_text_protocol(dataset, tiny_env, capsys):
    images, labels = dataset
    out = run(
        capsys,
        "text",
        "--images",
        str(images),
        "--labels",
        str(labels),
        "--classes",
        "red thing, green thing",
        "--method",
        "gem",
        "--resolution",
        "256",
    )
    assert out["classes"] == ["background", "red thing", "green thing"]
    assert np.asarray(out["confusion"]).shape == (3, 3)
    # every pixel of the centre square, resized to 256, once (the ignored corner pixel is cropped away)
    assert np.asarray(out["confusion"]).sum() == 2 * 256 * 256
    check_unit_interval(out["pixel_accuracy"], out["miou"])


def test_oneshot_protocol(dataset, tiny_env, capsys):
    images, labels = dataset
    out = run(
        capsys,
        "oneshot",
        "--images",
        str(images),
        "--labels",
        str(labels),
        "--parts",
        "red,green",
        "--train-images",
        str(images / "img0.png"),
        "--train-masks",
        str(labels / "img0.png"),
        "--epochs",
        "2",
        "--resolution",
        "256",
    )
    assert out["parts"] == ["background", "red", "green"]
    assert len(out["per_part_iou"]) == 3
    check_unit_interval(out["miou"])


def test_missing_label_file_is_a_clear_error(dataset, tiny_env):
    images, labels = dataset
    (labels / "img1.png").unlink()
    with pytest.raises(SystemExit, match="no label PNG for img1.png"):
        main(["evaluate", "unsupervised", "--images", str(images), "--labels", str(labels)])


def test_referring_protocol(tiny_env, tiny_sd, capsys, tmp_path):
    from workers.methods.concepts import train_concept

    scenes, instances, queries, concepts = (tmp_path / name for name in ("scenes", "instances", "queries", "concepts"))
    for folder in (scenes, instances, queries):
        folder.mkdir()
    label = np.zeros((64, 64), np.uint8)
    label[16:48, 4:28], label[16:48, 36:60] = 1, 2
    pixels = np.array([[90, 90, 90], [220, 30, 30], [30, 30, 220]], np.uint8)[label]
    Image.fromarray(pixels).save(scenes / "s0.png")
    Image.fromarray(label).save(instances / "s0.png")
    (queries / "s0.json").write_text(
        json.dumps([{"query": "<my-mug> mug", "instance": 1}, {"query": "a blue mug", "instance": 2}])
    )
    concept = train_concept(tiny_sd, [pixels[:, :32].copy()], "my-mug", "mug", steps=1, batch_size=1, resolution=128)
    (concepts / "my-mug").mkdir(parents=True)
    for name, data in concept.files().items():
        (concepts / "my-mug" / name).write_bytes(data)
    out = run(
        capsys,
        "referring",
        "--images",
        str(scenes),
        "--labels",
        str(instances),
        "--queries",
        str(queries),
        "--concepts",
        str(concepts),
        "--class-word",
        "mug",
        "--resolution",
        "128",
    )
    assert out["protocol"] == "referring" and out["concepts"] == ["my-mug"] and out["queries"] == 2
    check_unit_interval(out["miou"], out["bf_miou"], out["bf_acc"], out["af_acc"])
