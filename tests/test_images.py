"""The picture store: bytes kept as received, decoded upright to 8-bit RGB, straight to a working size."""

import io

import numpy as np
import pytest
from PIL import Image

from attnseg.images import decode_rgb, load_image, load_mask, mask_png, store_bytes


def jpeg(width: int, height: int, orientation: int | None = None) -> bytes:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (220, 30, 30)  # left half red: tells the orientation apart
    image = Image.fromarray(pixels)
    exif = image.getexif()
    if orientation:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_decoding_to_a_working_size_stays_at_or_above_it(fmt):
    buffer = io.BytesIO()
    Image.new("RGB", (2000, 1500), (10, 200, 30)).save(buffer, format=fmt)
    full = decode_rgb(buffer.getvalue())
    small = decode_rgb(buffer.getvalue(), min_side=256)
    assert full.shape == (1500, 2000, 3)
    assert 256 <= min(small.shape[:2]) < 1500 and small.shape[2] == 3  # draft (JPEG) or reduce: 1/4 or more
    assert small.shape[1] * 1500 == pytest.approx(small.shape[0] * 2000, rel=0.01)  # aspect kept
    assert np.abs(small.astype(int) - (10, 200, 30)).max() <= 3


@pytest.mark.parametrize("mode", ["P", "1", "I;16", "LA"])
def test_any_mode_decodes_to_a_working_size(mode):
    buffer = io.BytesIO()
    Image.new(mode, (1200, 900)).save(buffer, format="PNG")
    small = decode_rgb(buffer.getvalue(), min_side=300)
    assert small.shape == (300, 400, 3) and small.dtype == np.uint8


def test_exif_orientation_applies_after_reduction():
    data = jpeg(1600, 1200, orientation=6)  # rotate 90 clockwise: upright 1200 wide, 1600 high
    full, small = decode_rgb(data), decode_rgb(data, min_side=300)
    assert full.shape[:2] == (1600, 1200) and small.shape[:2] == (400, 300)
    assert full[10, 600, 0] > 200 and full[-10, 600, 0] < 60  # the red half is on top now
    assert small[5, 150, 0] > 200 and small[-5, 150, 0] < 60


def test_bytes_are_stored_as_received_and_shared_within_a_tenant(redis_server):
    connection = redis_server.client()
    connection.flushall()
    data = jpeg(64, 48)
    key = store_bytes(connection, "alice", data, ttl_s=60)
    assert store_bytes(connection, "alice", data, ttl_s=120) == key and connection.ttl(key) > 60  # refreshed, one copy
    assert connection.get(key) == data
    assert load_image(connection, key).shape == (48, 64, 3)


def test_another_tenant_never_touches_a_picture(redis_server):
    """Issue 16 item 7: bob's upload of alice's bytes cut her picture's TTL (one key per content)."""
    connection = redis_server.client()
    connection.flushall()
    data = jpeg(64, 48)
    alices = store_bytes(connection, "alice", data, ttl_s=60)
    connection.expire(alices, 86_400)  # her job succeeded: the picture lives as long as the result
    bobs = store_bytes(connection, "bob", data, ttl_s=600)
    assert bobs != alices and connection.get(bobs) == data
    assert connection.ttl(alices) > 80_000  # neither shortened nor shared
    connection.delete(bobs)
    assert connection.get(alices) == data


def test_a_pictures_ttl_is_never_shortened(redis_server):
    connection = redis_server.client()
    connection.flushall()
    data = jpeg(64, 48)
    key = store_bytes(connection, "alice", data, ttl_s=60)
    connection.expire(key, 86_400)
    assert store_bytes(connection, "alice", data, ttl_s=600) == key and connection.ttl(key) > 80_000


def test_masks_round_trip_as_8_bit_class_ids(redis_server):
    connection = redis_server.client()
    mask = np.zeros((30, 40), np.uint8)
    mask[5:10, 5:20] = 7
    key = store_bytes(connection, "alice", mask_png(mask), ttl_s=60)
    np.testing.assert_array_equal(load_mask(connection, key), mask)
