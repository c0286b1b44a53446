"""Image -> latent, prompt -> text embeddings, seeded noise and one UNet call (docs/methods.md 0.4)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from workers.models.stable_diffusion import StableDiffusion


def make_generator(sd: StableDiffusion, seed: int) -> torch.Generator:
    """A torch.Generator on the model's device, seeded."""
    return torch.Generator(device=sd.device).manual_seed(seed)


def image_to_pixels(image: np.ndarray, resolution: int, device, dtype) -> torch.Tensor:
    """uint8 RGB image (H, W, 3) -> (1, 3, resolution, resolution) in [-1, 1].

    The whole image is resized (aspect ratio not kept), bilinear with antialiasing.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image of shape (H, W, 3), got {image.dtype} {image.shape}")
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float()  # a writable copy
    pixels = F.interpolate(pixels, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return (pixels / 127.5 - 1.0).to(device=device, dtype=dtype)


@torch.no_grad()
def encode_latents(
    sd: StableDiffusion, pixels: torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """pixels (B, 3, H, W) in [-1, 1] -> latents (B, 4, H/8, W/8) times the VAE's scaling factor.

    The posterior mean without a generator, a sample seeded by `generator` otherwise.
    """
    posterior = sd.vae.encode(pixels.to(device=sd.device, dtype=sd.dtype)).latent_dist
    latents = posterior.mean if generator is None else posterior.sample(generator=generator)
    return latents * sd.vae.config.scaling_factor


@torch.no_grad()
def encode_prompt_ids(sd: StableDiffusion, ids: torch.Tensor) -> torch.Tensor:
    """Text encoder outputs (B, T, D) of token ids (B, T), already padded (T = 77)."""
    return sd.text_encoder(ids.to(sd.device))[0]


def encode_prompts(sd: StableDiffusion, prompts: list[str]) -> torch.Tensor:
    """Text encoder outputs of the prompts padded to the tokenizer's length (77): (B, 77, D).

    Raises ValueError for a prompt that does not fit, rather than silently cutting it.
    """
    max_length = sd.tokenizer.model_max_length
    for prompt in prompts:
        needed = len(sd.tokenizer(prompt).input_ids)
        if needed > max_length:
            raise ValueError(f"prompt needs {needed} tokens, the text encoder holds {max_length}: {prompt!r}")
    ids = sd.tokenizer(prompts, padding="max_length", max_length=max_length, return_tensors="pt").input_ids
    return encode_prompt_ids(sd, ids)


def fixed_prompt_embeddings(sd: StableDiffusion, prompts: list[str]) -> torch.Tensor:
    """`encode_prompts` for prompts that recur whatever the request (the empty prompt, SLiMe's
    "part part ..."), each encoded once per model and kept: (B, 77, D). Never pass user text here
    (the cache has no bound). The entries are ordinary tensors, usable in autograd."""
    missing = [prompt for prompt in dict.fromkeys(prompts) if prompt not in sd.prompt_cache]
    if missing:
        with torch.inference_mode(False):
            for prompt, embedding in zip(missing, encode_prompts(sd, missing)):
                sd.prompt_cache[prompt] = embedding
    return torch.stack([sd.prompt_cache[prompt] for prompt in prompts])


def sample_noise(latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like `latents`, drawn in fp32 on the generator's device.

    Drawing in fp32 keeps a seed's noise the same whatever the model's dtype.
    """
    noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device=latents.device, dtype=latents.dtype)


@torch.no_grad()
def add_noise(
    sd: StableDiffusion,
    latents: torch.Tensor,
    timestep: int,
    generator: torch.Generator | None = None,
    *,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The DDPM forward process at `timestep`: scheduler.add_noise(latents, noise, t).

    noise: given (e.g. SLiMe needs it again for its loss), else drawn from `generator`.
    """
    if noise is None:
        if generator is None:
            raise ValueError("add_noise needs a seeded generator or the noise itself")
        noise = sample_noise(latents, generator)
    timesteps = torch.full((latents.shape[0],), timestep, dtype=torch.long, device=latents.device)
    return sd.scheduler.add_noise(latents, noise, timesteps)


def unet_noise(
    sd: StableDiffusion, latents: torch.Tensor, timestep: int, text_embeddings: torch.Tensor
) -> torch.Tensor:
    """One UNet call: the noise prediction (B, 4, R, R) for text embeddings (B, 77, D).

    Latents with batch 1 are shared by every row of the embeddings (e.g. a CFG batch
    [uncond, cond]). No grad context of its own: wrap it in torch.no_grad() for inference,
    leave it out to train through it.
    """
    if latents.shape[0] == 1 and text_embeddings.shape[0] > 1:
        latents = latents.expand(text_embeddings.shape[0], -1, -1, -1)
    return sd.unet(latents, timestep, encoder_hidden_states=text_embeddings).sample
