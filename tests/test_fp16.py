"""The model, capture and methods with fp16 weights against the fp32 CPU reference: on the CPU
always, and on CUDA in GPU mode (`ATTNSEG_TEST_DEVICE=cuda python -m pytest -q tests/test_fp16.py`;
the whole suite then also runs the DiffSeg tensor tests on CUDA). The CUDA cases skip elsewhere.

Tolerances: maps are accumulated in fp32 from fp16 activations, so they differ from the fp32
model's by fp16 rounding of the activations (~1e-3 relative): attention probabilities agree within
atol 2e-3 (rows of up to 4096 entries, each ~1/Q) and the label maps of DiffSeg in at least 90% of
the pixels (a label changes only where two proposals nearly tie).
"""

import numpy as np
import torch

from workers.methods import oneshot
from workers.methods.textseg import segment_text
from workers.methods.unsupervised import segment_unsupervised
from workers.models.attention import AttentionStore, capture_attention, head_mean_attention
from workers.models.sd_ops import encode_latents, fixed_prompt_embeddings, image_to_pixels, unet_noise

ATTENTION_ATOL = 2e-3
LABEL_AGREEMENT = 0.9


def picture(seed: int = 0, size=(96, 128)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.zeros((*size, 3), np.uint8)
    image[: size[0] // 2] = (200, 40, 40)
    image[size[0] // 2 :, : size[1] // 3] = (30, 160, 60)
    return np.clip(image + rng.integers(0, 30, image.shape), 0, 255).astype(np.uint8)


def captured(sd, image: np.ndarray) -> AttentionStore:
    store = AttentionStore()
    with torch.inference_mode():
        latents = encode_latents(sd, image_to_pixels(image, 64, sd.device, sd.dtype))
        with capture_attention(sd.unet, store, self_blocks=range(1, 17), cross_blocks=range(1, 17)):
            unet_noise(sd, latents, 300, fixed_prompt_embeddings(sd, [""]))
    return store


def test_fp16_capture_matches_fp32_maps(half_sd, tiny_sd):
    image = picture()
    half, full = captured(half_sd, image), captured(tiny_sd, image)
    for kind in ("self", "cross"):
        assert half.grids(kind) == full.grids(kind)
        for grid in full.grids(kind):
            maps = half.mean(kind, grid)
            assert maps.dtype == torch.float32 and maps.device.type == half_sd.device.type
            torch.testing.assert_close(maps.cpu(), full.mean(kind, grid), atol=ATTENTION_ATOL, rtol=0.05)


def test_fp16_heads_together_equal_one_head_at_a_time(half_sd):
    gen = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 8, 256, 40, generator=gen), torch.randn(2, 8, 256, 40, generator=gen)
    one = head_mean_attention(query, key, 40**-0.5, logits=True, heads_at_once=1)
    device = half_sd.device
    together = head_mean_attention(query.to(device).half(), key.to(device).half(), 40**-0.5, logits=True)
    for reference, value in zip(one, together):
        torch.testing.assert_close(value.cpu(), reference, atol=5e-3, rtol=0.02)  # fp16 inputs


def test_fp16_diffseg_agrees_with_fp32(half_sd, tiny_sd):
    image = picture(1)
    half = segment_unsupervised(half_sd, image, resolution=128, grid=8)
    full = segment_unsupervised(tiny_sd, image, resolution=128, grid=8)
    assert half.labels.shape == image.shape[:2]
    assert (half.labels == full.labels).mean() >= LABEL_AGREEMENT


def test_fp16_selfcross_agrees_with_fp32(half_sd, tiny_sd):
    image = picture(2)
    half = segment_text(half_sd, None, image, ["red", "green"], resolution=128, seed=3)
    full = segment_text(tiny_sd, None, image, ["red", "green"], resolution=128, seed=3)
    assert (half.labels == full.labels).mean() >= LABEL_AGREEMENT


def test_fp16_slime_trains_under_autocast(half_sd, tiny_sd):
    """fp16 UNet under autocast with loss scaling: fp32 vectors, the first step as the fp32 model's."""
    image = picture(3)
    mask = np.zeros(image.shape[:2], np.int64)
    mask[: image.shape[0] // 2] = 1
    mask[image.shape[0] // 2 :, : image.shape[1] // 3] = 2
    base, _ = oneshot.part_prompt_outputs(tiny_sd, 3)
    reference = oneshot.train_oneshot(tiny_sd, [image], [mask], ["top", "left"], epochs=1, resolution=128).vectors
    trained = oneshot.train_oneshot(half_sd, [image], [mask], ["top", "left"], epochs=1, resolution=128).vectors
    assert trained.dtype == torch.float32 and torch.isfinite(trained).all()
    step, reference_step = trained.cpu() - base[1:3], reference - base[1:3]
    assert (step.sign() == reference_step.sign()).float().mean() > 0.9
    assert all(p.dtype == torch.float16 for p in half_sd.unet.parameters())
