"""tiny-colour: built and loaded like real weights, and its attention follows colour as constructed.

The method tests run DiffSeg and selfcross through their functions on synthetic scenes (384 x 512
pictures at the working resolution 512; object sizes, the bounding-circle diameter, 30 % to 50 % of
the shorter side, i.e. 115 to 190 px) and check the mIoU against the ground truth.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from workers.evaluation.metrics import ConfusionScore, UnsupervisedScore
from workers.evaluation.synthetic import CLASS_NAMES, make_scene
from workers.methods.textseg import segment_text
from workers.methods.unsupervised import segment_unsupervised
from workers.models.attention import AttentionStore, capture_attention, transformer_blocks
from workers.models.sd_ops import add_noise, encode_latents, encode_prompts, image_to_pixels, make_generator, unet_noise
from workers.models.stable_diffusion import load_stable_diffusion
from workers.models.tiny_colour import (
    COLOURS,
    CONSTRUCTED_MARKER,
    LATENT_GAIN,
    MODEL_NAME,
    VERSION,
    chroma_matrix,
    tiny_colour_components,
)

RESOLUTION = 256  # latent grid R = 32 for the attention checks
SCENE_SIZE = (384, 512)
OBJECT_SIZES = (0.3, 0.5)


def two_regions(size: int = RESOLUTION) -> np.ndarray:
    """Grey picture, red left third, a blue square on the right; edges on multiples of 32 px."""
    image = np.full((size, size, 3), 128, np.uint8)
    image[:, : size // 4 + size // 8] = COLOURS["red"]
    image[size // 4 : size // 2, 3 * size // 4 - 32 : 3 * size // 4 + 32] = COLOURS["blue"]
    return image


def region_masks(image: np.ndarray, grid: int) -> dict[str, torch.Tensor]:
    """name -> (grid²,) bool: the grid cells whose whole patch is that colour (grey: the rest)."""
    step = image.shape[0] // grid
    cells = image.reshape(grid, step, grid, step, 3).transpose(0, 2, 1, 3, 4).reshape(grid * grid, -1, 3)
    masks = {name: torch.from_numpy((cells == COLOURS[name]).all(-1).all(-1)) for name in ("red", "blue")}
    masks["grey"] = torch.from_numpy((cells == 128).all(-1).all(-1))
    return masks


def test_built_once_into_the_cache_and_loaded_like_real_weights(tmp_path, tiny_colour):
    sd = load_stable_diffusion(MODEL_NAME, device="cpu", dtype="float32", cache_dir=tmp_path)
    folder = tmp_path / f"{MODEL_NAME}-v{VERSION}"
    assert json.loads((folder / CONSTRUCTED_MARKER).read_text())["constructed_weights"] is True
    assert (folder / "unet" / "config.json").is_file() and (folder / "tokenizer").is_dir()
    assert sd.random_weights is False and len(transformer_blocks(sd.unet)) == 16
    built = tiny_colour_components()  # no RNG: the same weights every time
    for name in ("unet", "vae", "text_encoder"):
        for key, tensor in built[name].state_dict().items():
            assert torch.equal(getattr(tiny_colour, name).state_dict()[key], tensor), f"{name}.{key}"


def test_vae_keeps_each_patch_colour(tiny_colour):
    image = two_regions()
    pixels = image_to_pixels(image, RESOLUTION, "cpu", torch.float32)
    latents = encode_latents(tiny_colour, pixels)
    expected = LATENT_GAIN * torch.einsum("ij,jhw->ihw", chroma_matrix(), pixels[0, :, ::8, ::8])
    assert torch.allclose(latents[0, :3], expected, atol=1e-3)
    assert latents[0, 3].abs().max() < 1e-6
    decoded = tiny_colour.vae.decode(latents / tiny_colour.vae.config.scaling_factor).sample
    assert torch.allclose(decoded, pixels, atol=1e-3)  # the patches are uniform: the inverse is exact


def capture(sd, image: np.ndarray, prompt: str, blocks) -> AttentionStore:
    latents = encode_latents(sd, image_to_pixels(image, RESOLUTION, sd.device, sd.dtype))
    noisy = add_noise(sd, latents, 150, make_generator(sd, 0))
    store = AttentionStore()
    with torch.no_grad(), capture_attention(sd.unet, store, self_blocks=blocks, cross_blocks=blocks):
        unet_noise(sd, noisy, 150, encode_prompts(sd, [prompt]))
    return store


@pytest.mark.parametrize("block", [1, 12, 16])
def test_self_attention_groups_the_positions_of_one_colour(tiny_colour, block):
    image = two_regions()
    store = capture(tiny_colour, image, "", [block])
    grid = store.grids("self")[0]
    attention = store.mean("self", grid)[0]
    for name, region in region_masks(image, grid).items():
        mass = attention[region][:, region].sum(1)
        assert mass.min() > 0.99, f"{name} rows at grid {grid} keep {mass.min():.3f} on {name}"


def test_a_colour_words_cross_attention_covers_its_region(tiny_colour):
    image = two_regions()
    ids = tiny_colour.tokenizer("a photo including red, blue.").input_ids
    red, blue = ids.index(tiny_colour.tokenizer.convert_tokens_to_ids("red</w>")), ids.index(1746)
    store = capture(tiny_colour, image, "a photo including red, blue.", range(1, 17))
    for grid in store.grids("cross"):
        cross = store.mean("cross", grid)[0]
        regions = region_masks(image, grid)
        for token, name in ((red, "red"), (blue, "blue")):
            elsewhere = torch.stack([region for other, region in regions.items() if other != name]).any(0)
            if regions[name].any():  # cells wholly of the colour, against cells wholly of another
                assert cross[regions[name], token].min() > 0.9, (grid, name)
                assert cross[elsewhere, token].max() < 0.01, (grid, name)
        assert cross[regions["grey"], 0].min() > 0.2  # the start token takes the rest, as in SD


def scenes(count: int):
    return [make_scene(seed, *SCENE_SIZE, sizes=OBJECT_SIZES) for seed in range(count)]


def test_diffseg_segments_scenes_by_colour(tiny_colour):
    score = UnsupervisedScore(len(CLASS_NAMES) + 1)
    for scene in scenes(2):
        result = segment_unsupervised(tiny_colour, scene.image, resolution=512, kl_threshold=1.1)
        score.add(result.labels, scene.classes)
    assert score.result()["miou"] >= 0.82  # measured 0.837


def test_selfcross_finds_each_colour_word(tiny_colour):
    ious = []
    for scene in scenes(3):
        names = scene.present
        truth = np.zeros_like(scene.classes)
        for k, name in enumerate(names, start=1):
            truth[scene.classes == CLASS_NAMES.index(name) + 1] = k
        result = segment_text(tiny_colour, None, scene.image, names, resolution=512, seed=0)
        score = ConfusionScore(len(names) + 1)
        score.add(result.labels, truth)
        ious.append(score.result()["miou"])
    assert min(ious) >= 0.9, ious  # measured 0.921, 0.916, 0.938
