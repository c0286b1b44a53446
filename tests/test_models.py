"""The model layer: tiny-random building and loading, tokenizer ids, offline errors, sd.py helpers."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from open_clip import get_tokenizer

from workers.models.sd_ops import (
    add_noise,
    encode_latents,
    encode_prompts,
    fixed_prompt_embeddings,
    image_to_pixels,
    make_generator,
    sample_noise,
    unet_noise,
)
from workers.models.stable_diffusion import ModelUnavailableError, load_stable_diffusion, resolve_device, resolve_dtype
from workers.models.tiny_random import (
    RANDOM_WEIGHTS_MARKER,
    build_tiny_random,
    clip_bpe_vocabulary,
    tiny_random_components,
)

RESOLUTION = 256  # latent grid R = 32
BOS, EOS = 49406, 49407


def test_saved_weights_load_back_identical(tiny_sd):
    fresh = tiny_random_components(seed=0)
    for name in ("unet", "vae", "text_encoder"):
        loaded = getattr(tiny_sd, name).state_dict()
        built = fresh[name].state_dict()
        assert loaded.keys() == built.keys()
        for key, tensor in built.items():
            assert torch.equal(loaded[key], tensor), f"{name}.{key}"


def test_build_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = tiny_random_components(seed=1)["unet"].conv_in.weight
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(tiny_random_components(seed=1)["unet"].conv_in.weight, first)
    assert not torch.equal(tiny_random_components(seed=2)["unet"].conv_in.weight, first)


def test_tiny_model_has_sd_shapes_and_a_working_forward(tiny_sd):
    assert tiny_sd.describe() == {
        "sd_model": tiny_sd.model_id,
        "device": "cpu",
        "dtype": "float32",
        "random_weights": True,
        "weights_note": "random weights, not trained: the masks mean nothing",
    }
    assert tiny_sd.vae_scale_factor == 8
    assert not any(p.requires_grad for p in tiny_sd.unet.parameters())
    assert not tiny_sd.unet.training and not tiny_sd.vae.training and not tiny_sd.text_encoder.training

    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    latents = encode_latents(tiny_sd, image_to_pixels(image, RESOLUTION, tiny_sd.device, tiny_sd.dtype))
    text = encode_prompts(tiny_sd, ["", "a photo of a dog"])
    assert latents.shape == (1, 4, 32, 32) and text.shape == (2, 77, 32)
    with torch.no_grad():
        noise = unet_noise(tiny_sd, latents, 300, text)
    assert noise.shape == (2, 4, 32, 32) and torch.isfinite(noise).all()


def test_tiny_random_name_builds_once_into_the_cache(tmp_path):
    sd = load_stable_diffusion("tiny-random", device="cpu", cache_dir=tmp_path)
    marker = tmp_path / "tiny-random" / RANDOM_WEIGHTS_MARKER
    assert sd.random_weights and sd.model_id == "tiny-random"
    assert json.loads(marker.read_text())["random_weights"] is True
    built_at = marker.stat().st_mtime_ns
    load_stable_diffusion("tiny-random", device="cpu", cache_dir=tmp_path)
    assert marker.stat().st_mtime_ns == built_at
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-random"]  # no staging folder left behind


def test_concurrent_builders_leave_one_complete_model(tmp_path):
    target = tmp_path / "tiny-random"
    with ThreadPoolExecutor(2) as pool:
        built = list(pool.map(lambda seed: build_tiny_random(target, seed=seed), [0, 0]))
    assert built == [target, target]
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-random"]
    assert (target / "unet" / "config.json").exists() and (target / RANDOM_WEIGHTS_MARKER).exists()


def test_tokenizer_has_sd_ids(tiny_sd):
    tokenizer = tiny_sd.tokenizer
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS, EOS, EOS)
    assert tokenizer.model_max_length == 77
    empty = tokenizer("", padding="max_length", max_length=77).input_ids
    assert empty == [BOS] + [EOS] * 76
    # "a</w>" = 320, "photo</w>" = 1125, "of</w>" = 539, "dog</w>" = 1929 in CLIP's vocabulary
    assert tokenizer("a photo of a dog").input_ids == [BOS, 320, 1125, 539, 320, 1929, EOS]


@pytest.mark.parametrize("text", ["Traffic light, person-with clothes!", "  two   spaces\tand a TAB", "café 42"])
def test_tokenizer_agrees_with_open_clip(tiny_sd, text):
    ids = tiny_sd.tokenizer(text).input_ids
    reference = get_tokenizer("ViT-B-16")([text])[0]
    assert ids == reference[: len(ids)].tolist()
    assert (reference[len(ids) :] == 0).all()


def test_tokenizer_loads_from_the_sd_repository_layout(tmp_path, tiny_sd):
    # Real SD repos ship vocab.json + merges.txt (no tokenizer.json): that path must give the same ids.
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_vocabulary()
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
            }
        )
    )
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    for text in ["a photo of a dog", "person with clothes, traffic light."]:
        assert tokenizer(text).input_ids == tiny_sd.tokenizer(text).input_ids


def test_missing_directory_is_reported(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelUnavailableError, match="no-such-model") as error:
        load_stable_diffusion(missing, device="cpu")
    assert "ATTNSEG_SD_MODEL" in str(error.value)


def test_incomplete_directory_is_reported(tmp_path, tiny_sd_dir):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_bytes(
        (tiny_sd_dir / "scheduler" / "scheduler_config.json").read_bytes()
    )
    with pytest.raises(ModelUnavailableError, match=str(tmp_path)):
        load_stable_diffusion(str(tmp_path), device="cpu")


def test_unknown_hub_id_offline_is_reported(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after import: the loader must still see it
    with pytest.raises(ModelUnavailableError, match="nobody/no-such-sd-model") as error:
        load_stable_diffusion("nobody/no-such-sd-model", device="cpu")
    assert "hf download nobody/no-such-sd-model" in str(error.value)
    assert "Traceback" not in str(error.value)


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="float64"):
        resolve_dtype("float64", torch.device("cpu"))


def test_image_to_pixels_resizes_whole_image_to_minus_one_one():
    image = np.zeros((30, 90, 3), dtype=np.uint8)
    image[..., 0] = 255  # pure red: channel order must stay RGB
    image[:, 45:, 1] = 255  # right half also green
    pixels = image_to_pixels(image, 64, "cpu", torch.float32)
    assert pixels.shape == (1, 3, 64, 64)
    assert torch.allclose(pixels[0, 0], torch.ones(64, 64))
    assert torch.allclose(pixels[0, 2], -torch.ones(64, 64))
    assert torch.allclose(pixels[0, 1, :, :30], torch.full((64, 30), -1.0))  # left half, not cropped
    assert torch.allclose(pixels[0, 1, :, 34:], torch.ones(64, 30))
    with pytest.raises(ValueError, match="RGB"):
        image_to_pixels(np.zeros((8, 8), dtype=np.uint8), 64, "cpu", torch.float32)


def test_latents_are_posterior_mean_or_a_seeded_sample(tiny_sd):
    pixels = image_to_pixels(np.full((16, 16, 3), 100, np.uint8), RESOLUTION, "cpu", torch.float32)
    with torch.no_grad():
        posterior = tiny_sd.vae.encode(pixels).latent_dist
    mean = encode_latents(tiny_sd, pixels)
    assert torch.allclose(mean, posterior.mean * 0.18215)
    first = encode_latents(tiny_sd, pixels, generator=make_generator(tiny_sd, 7))
    again = encode_latents(tiny_sd, pixels, generator=make_generator(tiny_sd, 7))
    other = encode_latents(tiny_sd, pixels, generator=make_generator(tiny_sd, 8))
    assert torch.equal(first, again) and not torch.equal(first, other) and not torch.equal(first, mean)


def test_add_noise_is_seeded_ddpm_forward_process(tiny_sd):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noisy = add_noise(tiny_sd, latents, 150, make_generator(tiny_sd, 3))
    assert torch.equal(noisy, add_noise(tiny_sd, latents, 150, make_generator(tiny_sd, 3)))
    noise = sample_noise(latents, make_generator(tiny_sd, 3))
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[150]
    assert torch.allclose(noisy, alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise, atol=1e-6)
    assert torch.equal(add_noise(tiny_sd, latents, 150, noise=noise), noisy)


def test_prompt_too_long_is_refused(tiny_sd):
    with pytest.raises(ValueError, match="needs 102 tokens"):
        encode_prompts(tiny_sd, ["dog " * 100])


def test_fixed_prompts_are_encoded_once_per_model(tiny_sd):
    calls = []
    hook = tiny_sd.text_encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        tiny_sd.prompt_cache.clear()
        with torch.inference_mode():  # as the methods call it: the entry must still serve training
            first = fixed_prompt_embeddings(tiny_sd, ["part part ", ""])
        again = fixed_prompt_embeddings(tiny_sd, ["", "part part ", ""])
    finally:
        hook.remove()
    assert calls == [2]  # one encoder call, for both prompts, the first time only
    assert torch.equal(first, encode_prompts(tiny_sd, ["part part ", ""]))
    assert torch.equal(again, first[[1, 0, 1]])
    weights = torch.ones(1, requires_grad=True)
    (again * weights).sum().backward()  # not an inference tensor
    assert weights.grad is not None


def test_unet_noise_shares_one_latent_over_the_batch_and_trains(tiny_sd):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = encode_prompts(tiny_sd, ["", "a dog"]).requires_grad_(True)
    noise = unet_noise(tiny_sd, latents, 100, text)
    with torch.no_grad():
        single = unet_noise(tiny_sd, latents, 100, text[1:])
    assert torch.allclose(noise[1:], single, atol=1e-5)
    noise.square().mean().backward()
    assert text.grad is not None and text.grad.abs().sum() > 0
