"""DiffSeg end to end on one image (docs/methods.md section 1): one UNet pass, aggregate, merge, name.

Usable without the service::

    sd = load_stable_diffusion("stable-diffusion-v1-5/stable-diffusion-v1-5")
    out = segment_unsupervised(sd, rgb_uint8, kl_threshold=1.0)
    out.labels  # (H, W) 0..K-1, the narrowest int type (label_maps.to_numpy)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from attnseg.defaults import DIFFSEG, RESOLUTION, SEED
from workers.methods import diffseg, label_maps
from workers.methods.passes import Picture, clean_latents, self_attention_by_grid, unet_pass
from workers.methods.prompts import Prompt, mean_over_spans, pad_ids, word_spans
from workers.methods.timing import Timer
from workers.models.attention import ALL_BLOCKS, AttentionStore
from workers.models.sd_ops import encode_prompt_ids, fixed_prompt_embeddings
from workers.models.stable_diffusion import StableDiffusion


@dataclass
class UnsupervisedSegmentation:
    labels: np.ndarray  # (H, W) 0..K-1 in the narrowest int type, numbered by first appearance
    names: list[str | None]  # per label: the vocabulary word naming it, or None
    scores: list[float | None]  # per label: that word's mean score over the segment
    timings_ms: dict[str, float] = field(default_factory=dict)


def vocabulary_word_maps(store: AttentionStore, prompt: Prompt, size: int, row: int = 0) -> torch.Tensor:
    """docs/methods.md 1.10: (V, size, size) word maps from the cross-attention of every grid.

    Per grid: span mean per word, bilinear upsample, renormalise over the words at each pixel;
    then the grids are summed and each word map L2-normalised over the pixels.
    """
    total = None
    for grid in store.grids("cross"):
        words = mean_over_spans(store.mean("cross", grid)[row], prompt.class_spans)  # (g*g, V)
        maps = words.T.reshape(1, -1, grid, grid).float()
        maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)[0]
        maps = maps / maps.sum(0, keepdim=True).clamp_min(1e-12)
        total = maps if total is None else total + maps
    return total / total.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]


@dataclass
class SharedPass:
    """One UNet pass for a batch of images (row i = image i): what the per-image steps read."""

    store: AttentionStore
    resolution: int
    prompt: Prompt | None
    vocabulary: list[str] | None
    timings_ms: dict[str, float]


def attention_pass(
    sd: StableDiffusion,
    images: list[Picture],
    *,
    timestep: int = DIFFSEG.timestep,
    resolution: int = RESOLUTION,
    vocabulary: list[str] | None = None,
    report: Callable[[str, float], None] | None = None,
) -> SharedPass:
    """VAE, text encoder and UNet with capture once for all `images` (each RGB uint8 (H, W, 3), any
    size, or all already `Encoded`): the work a batch of DiffSeg jobs with the same resolution,
    timestep and vocabulary shares."""
    report = report or (lambda stage, fraction: None)
    timer = Timer()
    started = time.perf_counter()
    report("encoding", 0.05)
    latents = clean_latents(sd, images, resolution)
    with torch.inference_mode():
        prompt = word_spans(sd.tokenizer, vocabulary) if vocabulary else None
        text = encode_prompt_ids(sd, pad_ids(prompt, sd.tokenizer)) if prompt else fixed_prompt_embeddings(sd, [""])
    started = timer("latent", started)

    report("attention", 0.2)
    store = AttentionStore()
    with torch.inference_mode():
        cross_blocks = ALL_BLOCKS if prompt else ()
        unet_pass(
            sd,
            latents,
            timestep,
            text.expand(len(images), -1, -1),
            store,
            self_blocks=ALL_BLOCKS,
            cross_blocks=cross_blocks,
        )
    timer("unet", started)
    return SharedPass(store, resolution, prompt, vocabulary, timer.ms)


def segment_row(
    shared: SharedPass,
    row: int,
    size: tuple[int, int],
    *,
    kl_threshold: float = DIFFSEG.kl_threshold,
    grid: int = DIFFSEG.grid,
    iterations: int = DIFFSEG.iterations,
    refine: bool = DIFFSEG.refine,
    report: Callable[[str, float], None] | None = None,
) -> UnsupervisedSegmentation:
    """DiffSeg's steps after the pass for image `row` of `shared`; labels come back at size (H, W)."""
    report = report or (lambda stage, fraction: None)
    timer = Timer()
    started = time.perf_counter()
    report("aggregating", 0.6)
    attn = diffseg.aggregate(self_attention_by_grid(shared.store, row))
    started = timer("aggregate", started)

    report("merging", 0.7)
    merged = diffseg.proposals(attn, grid=grid, iterations=iterations, kl_threshold=kl_threshold)
    if refine:
        merged = diffseg.refine_proposals(attn, merged)
    started = timer("merge", started)
    labels = diffseg.labels_at(merged, size)
    started = timer("labels", started)

    count = int(labels.max()) + 1
    names: list[str | None] = [None] * count
    scores: list[float | None] = [None] * count
    if shared.prompt is not None:
        word_maps = vocabulary_word_maps(shared.store, shared.prompt, shared.resolution, row)
        word_scores = diffseg.segment_word_scores(labels, word_maps)
        best, word = word_scores.max(dim=1)
        names = [shared.vocabulary[i] for i in word.tolist()]
        scores = [round(v, 6) for v in best.tolist()]
        timer("naming", started)
    return UnsupervisedSegmentation(label_maps.to_numpy(labels), names, scores, {**shared.timings_ms, **timer.ms})


def segment_unsupervised(
    sd: StableDiffusion,
    image: np.ndarray,
    *,
    kl_threshold: float = DIFFSEG.kl_threshold,
    grid: int = DIFFSEG.grid,
    iterations: int = DIFFSEG.iterations,
    timestep: int = DIFFSEG.timestep,
    resolution: int = RESOLUTION,
    refine: bool = DIFFSEG.refine,
    vocabulary: list[str] | None = None,
    seed: int = SEED,
    report: Callable[[str, float], None] | None = None,
    output_size: tuple[int, int] | None = None,
) -> UnsupervisedSegmentation:
    """Segments an RGB uint8 image (H, W, 3) with DiffSeg; labels come back at (H, W), or at
    `output_size` (H, W) when the image was decoded smaller than the original (a worker's working size).

    The pass runs on the clean latent (posterior mean: `seed` is unused unless a later option
    adds noise, and is kept so every method takes one). With a `vocabulary`, the pass uses the
    prompt built from the words and each segment is named by its best word (paper appendix).
    """
    shared = attention_pass(sd, [image], timestep=timestep, resolution=resolution, vocabulary=vocabulary, report=report)
    return segment_row(
        shared,
        0,
        output_size or image.shape[:2],
        kl_threshold=kl_threshold,
        grid=grid,
        iterations=iterations,
        refine=refine,
        report=report,
    )
