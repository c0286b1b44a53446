"""The Stable Diffusion passes every method builds on (docs/methods.md 0.4).

Pictures to clean or seeded-noised latents, prompts to text-encoder outputs (with the vectors of
concepts, docs/methods.md 2.4), one UNet call recording the attention of chosen blocks (0.3), the
aggregated self-attention of DiffSeg's pass (1.3), and the mixed-precision helpers of the training
loops. The methods import these and nothing of each other's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from workers.methods import diffseg
from workers.methods.prompts import Prompt, pad_ids
from workers.models.attention import ALL_BLOCKS, AttentionStore, capture_attention
from workers.models.concept import KV, Concept
from workers.models.concept_hooks import concept_attention, token_embeddings
from workers.models.sd_ops import (
    add_noise,
    encode_latents,
    fixed_prompt_embeddings,
    image_to_pixels,
    make_generator,
    unet_noise,
)
from workers.models.stable_diffusion import StableDiffusion

# --- latents ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """A picture already through the VAE at the working resolution: its clean latents (1, 4, R, R)
    (a worker keeps them for the next question about the same picture)."""

    latents: torch.Tensor


Picture = np.ndarray | Encoded


def clean_latents(sd: StableDiffusion, images: Picture | list[Picture], resolution: int) -> torch.Tensor:
    """The VAE posterior means of the images resized to resolution x resolution, (B, 4, R, R); one
    image (H, W, 3) or a list of them, encoded in one VAE call. A list of `Encoded` pictures (all of
    them; they were encoded at `resolution`) is only stacked."""
    images = [images] if isinstance(images, (np.ndarray, Encoded)) else images
    if images and all(isinstance(image, Encoded) for image in images):
        return torch.cat([image.latents for image in images])
    with torch.inference_mode():
        return encode_latents(
            sd, torch.cat([image_to_pixels(image, resolution, sd.device, sd.dtype) for image in images])
        )


def noised_latents(sd: StableDiffusion, latents: torch.Tensor, timestep: int, seeds: list[int]) -> torch.Tensor:
    """Latents (B, 4, R, R) at `timestep`, image b noised from its own generator seeded with seeds[b]."""
    return torch.cat(
        [add_noise(sd, latents[b : b + 1], timestep, make_generator(sd, seed)) for b, seed in enumerate(seeds)]
    )


# --- the UNet -----------------------------------------------------------------------------


def unet_pass(
    sd: StableDiffusion,
    latents: torch.Tensor,
    timestep: int | torch.Tensor,
    text: torch.Tensor,
    store: AttentionStore | None = None,
    *,
    self_blocks: Iterable[int] = (),
    cross_blocks: Iterable[int] = (),
    cross_logit_blocks: Iterable[int] = (),
    kv: KV | None = None,
) -> torch.Tensor:
    """One UNet call (`unet_noise`) recording the given blocks' attention into `store` (as
    `capture_attention`), with a Custom Diffusion concept's attention weights `kv` for this call
    only. Returns the noise prediction. No grad context of its own, as `unet_noise`."""
    # The concept's processors wrap the capturing ones: entered inside capture_attention.
    with (
        capture_attention(
            sd.unet,
            store if store is not None else AttentionStore(),
            self_blocks=self_blocks,
            cross_blocks=cross_blocks,
            cross_logit_blocks=cross_logit_blocks,
        ),
        concept_attention(sd.unet, kv),
    ):
        return unet_noise(sd, latents, timestep, text)


def self_attention_by_grid(store: AttentionStore, row: int = 0) -> dict[int, torch.Tensor]:
    """Per grid g: the (g^2, g^2) self-attention of batch row `row`, averaged over that grid's layers."""
    return {grid: store.mean("self", grid)[row] for grid in store.grids("self")}


def aggregated_self_attention(sd: StableDiffusion, latents: torch.Tensor, timestep: int, seed: int) -> torch.Tensor:
    """Empty-prompt UNet pass on latents noised with `seed`: all 16 self layers, DiffSeg step 3, (R^2, R^2)."""
    store = AttentionStore()
    with torch.inference_mode():
        noisy = noised_latents(sd, latents, timestep, [seed])
        unet_pass(sd, noisy, timestep, fixed_prompt_embeddings(sd, [""]), store, self_blocks=ALL_BLOCKS)
        return diffseg.aggregate(self_attention_by_grid(store))


# --- mixed precision (training) -----------------------------------------------------------


def autocast(sd: StableDiffusion) -> torch.autocast:
    """Autocast to the resident UNet's dtype when it is fp16 or bf16, off for fp32. The fp32
    trained tensors meet the UNet's weights inside it: no fp32 copy of the UNet is made."""
    return torch.autocast(sd.device.type, dtype=sd.dtype, enabled=sd.dtype in (torch.float16, torch.bfloat16))


def grad_scaler(sd: StableDiffusion) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (its gradients underflow without it); a pass-through otherwise."""
    return torch.amp.GradScaler(sd.device.type, enabled=sd.dtype == torch.float16)


# --- text with concepts (docs/methods.md 2.4) ---------------------------------------------


def vector_counts(concepts: dict[str, Concept] | None) -> dict[str, int]:
    """identifier -> how many vectors (prompt positions) its concept has."""
    return {identifier: concept.vectors.shape[0] for identifier, concept in (concepts or {}).items()}


def placed_vectors(
    prompts: list[Prompt], vectors: dict[str, torch.Tensor], width: int, length: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(B, T) positions and (B, T, D) values of the concepts' vectors in prompts padded to T = length
    (77); (None, None) without concepts. vectors: identifier -> (n, D), in the graph when trained."""
    if not any(prompt.concept_positions for prompt in prompts):
        return None, None
    first = next(iter(vectors.values()))
    mask = torch.zeros(len(prompts), length, dtype=torch.bool)
    values = torch.zeros(len(prompts), length, width, dtype=first.dtype, device=first.device)
    for row, prompt in enumerate(prompts):
        for identifier, positions in prompt.concept_positions.items():
            values[row, positions] = vectors[identifier][: len(positions)].to(values)  # autograd: CopySlices
            mask[row, positions] = True
    return mask, values


def encode_with_concepts(sd: StableDiffusion, prompts: list[Prompt], vectors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Text encoder outputs (B, 77, D) of the prompts with each identifier's vectors at its positions.
    No grad context of its own: gradients reach trained vectors."""
    ids = torch.cat([pad_ids(prompt, sd.tokenizer) for prompt in prompts]).to(sd.device)
    width = sd.text_encoder.get_input_embeddings().weight.shape[1]
    positions, values = placed_vectors(prompts, vectors, width, ids.shape[1])
    with token_embeddings(sd.text_encoder, positions, values):
        return sd.text_encoder(ids)[0]


def combined_kv(concepts: list[Concept]) -> KV | None:
    """The attention weights for one pass: those of the one Custom Diffusion concept among `concepts`.
    Raises ValueError for two: their weights replace the same projections."""
    with_kv = [concept for concept in concepts if concept.kv]
    if len(with_kv) > 1:
        names = ", ".join(f"<{concept.identifier}>" for concept in with_kv)
        raise ValueError(
            f"{names} each carry Custom Diffusion attention weights; one prompt can use only one "
            "of them (Textual Inversion concepts combine freely)"
        )
    return with_kv[0].kv if with_kv else None
