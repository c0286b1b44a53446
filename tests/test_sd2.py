"""The SD 2.x topology (tiny-random-sd2): its traits, exact capture, and every method on it.

SD 2.1-base (SLiMe's model) differs from SD 1.x in the text encoder (1024 wide, gelu, pad "!") and
in the UNet's transformer blocks (linear projections, a head count per block); the methods find
layers by position and read heads from each layer, and these tests run them there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.methods import textseg
from workers.methods.oneshot import segment_oneshot, train_oneshot
from workers.methods.textseg import segment_text
from workers.methods.unsupervised import segment_unsupervised
from workers.models.attention import AttentionStore, capture_attention, transformer_blocks
from workers.models.sd_ops import encode_prompts, unet_noise
from workers.models.tiny_random import SD2_TEXT_WIDTH

RESOLUTION = 128  # R = 16: the smallest size where every grid (16, 8, 4, 2) exists
HEIGHT, WIDTH = 40, 56


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(1)
    pixels = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    pixels[:, : WIDTH // 2] = (200, 40, 40)
    pixels[:, WIDTH // 2 :] = (40, 60, 200)
    return np.clip(pixels + rng.integers(-10, 10, pixels.shape), 0, 255).astype(np.uint8)


def test_sd2_traits(tiny_sd2, tiny_sd):
    assert tiny_sd2.text_encoder.config.hidden_size == SD2_TEXT_WIDTH != tiny_sd.text_encoder.config.hidden_size
    assert tiny_sd2.text_encoder.config.hidden_act == "gelu"
    ids = tiny_sd2.tokenizer("", padding="max_length", max_length=77).input_ids
    assert ids[:2] == [49406, 49407] and set(ids[2:]) == {tiny_sd2.tokenizer.convert_tokens_to_ids("!")}
    assert tiny_sd2.unet.config.use_linear_projection
    assert isinstance(tiny_sd2.unet.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    heads = [block.cross_attention.heads for block in transformer_blocks(tiny_sd2.unet)]
    assert heads == [2, 2, 2, 2, 4, 4, 4, 4, 4, 4, 2, 2, 2, 2, 2, 2]  # per block, not one config value
    assert all(block.cross_attention.to_k.in_features == SD2_TEXT_WIDTH for block in transformer_blocks(tiny_sd2.unet))


def test_capture_is_exact_and_row_stochastic_on_sd2(tiny_sd2):
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = encode_prompts(tiny_sd2, ["", "a photo of a dog"])
    every = tuple(range(1, 17))
    store = AttentionStore()
    with torch.no_grad():
        plain = unet_noise(tiny_sd2, latents, 300, text)
        with capture_attention(tiny_sd2.unet, store, self_blocks=every, cross_blocks=every):
            captured = unet_noise(tiny_sd2, latents, 300, text)
    assert torch.equal(plain, captured)
    for kind in ("self", "cross"):
        assert store.grids(kind) == [2, 4, 8, 16]
        for grid in store.grids(kind):
            assert torch.allclose(store.mean(kind, grid).sum(-1), torch.ones(2, grid * grid), atol=1e-5)


def test_unsupervised_on_sd2(tiny_sd2, image):
    out = segment_unsupervised(tiny_sd2, image, resolution=RESOLUTION, grid=8, vocabulary=["red", "blue"])
    assert out.labels.shape == (HEIGHT, WIDTH) and out.labels.min() >= 0


@pytest.mark.parametrize("method", [m for m in textseg.METHODS if m != "gem"])  # gem has no SD pass
def test_text_methods_on_sd2(tiny_sd2, tiny_clip, image, method):
    out = segment_text(tiny_sd2, tiny_clip, image, ["cat", "big tree"], method=method, resolution=RESOLUTION)
    assert out.labels.shape == (HEIGHT, WIDTH) and 0 <= out.labels.min() and out.labels.max() <= 2
    assert out.passes == 1


def test_oneshot_on_sd2(tiny_sd2, image):
    mask = np.zeros((HEIGHT, WIDTH), np.int64)
    mask[:, WIDTH // 2 :] = 1
    model = train_oneshot(tiny_sd2, [image], [mask], ["blue"], epochs=1, resolution=RESOLUTION)
    assert model.vectors.shape == (1, SD2_TEXT_WIDTH)
    out = segment_oneshot(tiny_sd2, model, image, resolution=RESOLUTION)
    assert out.labels.shape == (HEIGHT, WIDTH) and set(np.unique(out.labels)) <= {0, 1}
