"""Open-vocabulary segmentation from a list of class names (docs/methods.md 2.2, 2.3), four methods.

- `selfcross` (From Text to Mask): SD cross-attention of the classes propagated by SD self-attention.
- `gem`: dense CLIP (GEM) class probabilities; no SD pass.
- `gem_refined` (AggGEM): GEM probabilities propagated by the aggregated SD self-attention.
- `cluster` (DiffSegClust): DiffSeg segments, each named by its mean GEM probabilities.

Every method builds "channels", score maps (K, h, w) of one square grid, where channel k stands for
label `first_label + k`: with a background channel first_label is 0 (channel 0 = background),
without it 1. Usable without the service::

    out = segment_text(sd, clip, rgb_uint8, ["cat", "dog"], method="selfcross")
    out.labels  # (H, W) narrowest int: 0 = background, 1 + index in classes
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from workers.methods import diffseg, gem, label_maps
from workers.methods.concepts import Concept, combined_kv, encode_with_concepts, vector_counts
from workers.methods.prompts import Prompt, PromptTooLongError, build_prompt
from workers.methods.selfcross import background_score, selfcross_scores
from workers.methods.timing import Timer
from workers.methods.unsupervised import ALL_BLOCKS, self_attention_by_grid
from workers.models.attention import AttentionStore, capture_attention
from workers.models.clip import Clip
from workers.models.concept_hooks import concept_attention
from workers.models.sd_ops import (
    add_noise,
    encode_latents,
    fixed_prompt_embeddings,
    image_to_pixels,
    make_generator,
    unet_noise,
)
from workers.models.stable_diffusion import StableDiffusion

METHODS = ("selfcross", "gem", "gem_refined", "cluster")
DEFAULT_TIMESTEPS = {"selfcross": 150, "gem": None, "gem_refined": 100, "cluster": 100}
SELFCROSS_CROSS_BLOCKS = (5, 6, 7, 8, 9)  # grids R/4 and R/8
SELFCROSS_SELF_BLOCK = 12  # up_blocks.2.attentions.1, grid R/2
# The reference's VOC settings (box gate, background threshold); COCO uses 0.5 and 0.35.
SELFCROSS_GATE_THRESHOLD = 0.2
SELFCROSS_BACKGROUND_THRESHOLD = 0.5  # the paper's bg = (1 - max_c SC_c)^2
VOC_BACKGROUND_TEMPERATURE = 0.1  # langseg's VOC recipe: CA at s = 0.1 when a background channel is added
CLUSTER_KL_THRESHOLD = 0.8


@dataclass
class TextSegmentation:
    labels: np.ndarray  # (H, W) narrowest int type, at the image's size: 0 = background, c = 1 + index in `classes`
    scores: dict[int, float]  # label id -> mean of its channel over its pixels (present labels only)
    passes: int  # prompts per noise draw (selfcross splits long class lists); 1 for an SD pass, 0 for gem
    timings_ms: dict[str, float] = field(default_factory=dict)


# --- selfcross ----------------------------------------------------------------------------


def split_classes(
    tokenizer, classes: list[str], background_words: list[str] = (), counts: dict[str, int] | None = None
) -> list[Prompt]:
    """Greedy split of the classes, in order, over as few prompts as fit the text encoder.

    Each prompt takes the next classes while they fit; the background words go into every prompt.
    counts: identifier -> vectors of the concepts classes may name as `<identifier>`.
    Raises PromptTooLongError when one class with the background words does not fit alone.
    """
    prompts: list[Prompt] = []
    start = 0
    while start < len(classes):
        prompt, end = build_prompt(tokenizer, classes[start : start + 1], background_words, counts), start + 1
        while end < len(classes):
            try:
                prompt = build_prompt(tokenizer, classes[start : end + 1], background_words, counts)
            except PromptTooLongError:
                break
            end += 1
        prompts.append(prompt)
        start = end
    return prompts


def selfcross_draw(
    store: AttentionStore,
    prompts: list[Prompt],
    gate_threshold: float | None = SELFCROSS_GATE_THRESHOLD,
    first_row: int = 0,
) -> torch.Tensor:
    """SelfCross maps of all classes from one noise draw: (C, g, g) in [0, 1], classes in prompt order.

    store: cross-attention of SELFCROSS_CROSS_BLOCKS and self-attention of SELFCROSS_SELF_BLOCK,
    recorded from one UNet call whose batch row first_row + i is prompts[i]. Each prompt's class
    spans select its classes' tokens; min-max normalisation stays per class, so prompts do not interact.
    gate_threshold: the box gate's level (None: no gate).
    """
    (self_grid,) = store.grids("self")
    cross_grids = store.grids("cross")
    layers_by_grid = {grid: store.count("cross", grid) for grid in cross_grids}
    maps = []
    for row, prompt in enumerate(prompts, start=first_row):
        cross_by_grid = {grid: store.mean("cross", grid)[row] for grid in cross_grids}
        self_attn = store.mean("self", self_grid)[row]
        maps.append(selfcross_scores(cross_by_grid, layers_by_grid, self_attn, prompt.class_spans, gate_threshold))
    return torch.cat(maps)


def selfcross_channels(
    sc: torch.Tensor, background: bool, threshold: float = SELFCROSS_BACKGROUND_THRESHOLD
) -> torch.Tensor:
    """(C, g, g) SelfCross maps -> channels: [bg, SC_1..SC_C] with background, else SC alone."""
    if not background:
        return sc
    return torch.cat([background_score(sc, threshold), sc])


# --- GEM-based methods --------------------------------------------------------------------


def gem_channels(logits: torch.Tensor, background: bool) -> torch.Tensor:
    """(C, h, w) GEM cosine logits -> CA channels.

    Without background: softmax(logits / 0.01) over the classes, (C, h, w). With background, the
    langseg VOC recipe as a whole: CA = softmax(logits / 0.1) and the channel max(0, 1 - max_c CA - 0.8)
    in front, (1 + C, h, w). Both channel and classes use s = 0.1 so they compete on one scale
    (the class argmax is the same at any s; only where background wins depends on it).
    """
    if not background:
        return gem.class_probabilities(logits)
    probs = gem.class_probabilities(logits, VOC_BACKGROUND_TEMPERATURE)
    return torch.cat([gem.background_channel(probs), probs])


def propagate_class_maps(self_attention: torch.Tensor, class_maps: torch.Tensor) -> torch.Tensor:
    """AggGEM: AGG = row_normalise(SA^T) @ CA.

    self_attention: (P, P) aggregated SA, rows = queries, P = R * R. class_maps: (K, R, R).
    Returns (K, R, R). Row i of SA^T holds how much every query attends to pixel i, so pixel i gets
    the CA of the pixels attending to it, weighted. Computed as SA^T @ CA over SA's column sums: no
    second (P, P) matrix.
    """
    columns = class_maps.flatten(1).T.float()  # (P, K)
    column_sums = self_attention.sum(0).clamp_min(torch.finfo(torch.float32).tiny)
    aggregated = (self_attention.T @ columns) / column_sums[:, None]
    return aggregated.T.reshape(class_maps.shape)


def name_segments(segments: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """(H, W) segments 0..K-1 and (N, h, w) channels -> (K,) the channel with the highest mean per segment."""
    return diffseg.segment_word_scores(segments, channels).argmax(1)


# --- labels and scores --------------------------------------------------------------------


def clean_latents(sd: StableDiffusion, images: np.ndarray | list[np.ndarray], resolution: int) -> torch.Tensor:
    """The VAE posterior means of the images resized to resolution x resolution, (B, 4, R, R); one
    image (H, W, 3) or a list of them, encoded in one VAE call."""
    images = [images] if isinstance(images, np.ndarray) else images
    with torch.inference_mode():
        return encode_latents(
            sd, torch.cat([image_to_pixels(image, resolution, sd.device, sd.dtype) for image in images])
        )


def selfcross_pass(
    sd: StableDiffusion,
    latents: torch.Tensor,
    prompts: list[Prompt],
    timestep: int,
    seeds: int | list[int],
    concepts: dict[str, Concept] | None = None,
) -> AttentionStore:
    """One conditional UNet call on latents (B, 4, R, R), image b noised with seeds[b]: batch row
    b * len(prompts) + i is image b with prompts[i].

    concepts: those the prompts name; their vectors go to the text encoder and the attention weights
    of the (at most one) Custom Diffusion concept among them to the UNet, for this call only.
    """
    seeds = [seeds] if isinstance(seeds, int) else seeds
    concepts = concepts or {}
    store = AttentionStore()
    with torch.inference_mode():
        text = encode_with_concepts(sd, prompts, {name: concept.vectors for name, concept in concepts.items()})
        noisy = torch.cat(
            [add_noise(sd, latents[b : b + 1], timestep, make_generator(sd, seed)) for b, seed in enumerate(seeds)]
        )
        if len(seeds) > 1:
            noisy, text = noisy.repeat_interleave(len(prompts), dim=0), text.repeat(len(seeds), 1, 1)
        # The concept's processors wrap the capturing ones: enter them inside capture_attention.
        with (
            capture_attention(sd.unet, store, self_blocks=(SELFCROSS_SELF_BLOCK,), cross_blocks=SELFCROSS_CROSS_BLOCKS),
            concept_attention(sd.unet, combined_kv(list(concepts.values()))),
        ):
            unet_noise(sd, noisy, timestep, text)
    return store


def selfcross_maps(
    sd: StableDiffusion,
    latents: torch.Tensor,
    prompts: list[Prompt],
    *,
    samples: int,
    timestep: int,
    seeds: list[int],
    gate_threshold: float | None,
    concepts: dict[str, Concept] | None,
    timer: Timer,
    report: Callable[[str, float], None],
) -> list[torch.Tensor]:
    """Per image of latents (B, 4, R, R): its SelfCross maps (C, g, g) averaged over `samples` noise
    draws (draw i of image b uses seeds[b] + i); each draw is one UNet call for all images."""
    totals: list[torch.Tensor | None] = [None] * len(seeds)
    started = time.perf_counter()
    for draw in range(samples):
        report("attention", 0.1 + 0.7 * draw / samples)
        store = selfcross_pass(sd, latents, prompts, timestep, [seed + draw for seed in seeds], concepts)
        started = timer("unet", started)
        for b in range(len(seeds)):
            sc = selfcross_draw(store, prompts, gate_threshold, first_row=b * len(prompts))
            totals[b] = sc if totals[b] is None else totals[b] + sc
        started = timer("propagate", started)
    return [total / samples for total in totals]


def channel_labels(
    channels: torch.Tensor, output_size: tuple[int, int], first_label: int, timer: Timer
) -> tuple[torch.Tensor, dict[int, float]]:
    """Channels (K, h, w) -> the (H, W) argmax labels (+ first_label) and each present label's score."""
    started = time.perf_counter()
    labels = diffseg.proposals_to_labels(channels.flatten(1), output_size) + first_label
    started = timer("label", started)
    scores = diffseg.label_scores(labels, channels, first_label)
    timer("scores", started)
    return labels, scores


def selfcross_batch(
    sd: StableDiffusion,
    images: list[np.ndarray],
    classes: list[str],
    *,
    seeds: list[int],
    background: bool = True,
    background_words: list[str] | None = (),
    samples: int = 1,
    timestep: int | None = None,
    resolution: int = 512,
    gate_threshold: float | None = SELFCROSS_GATE_THRESHOLD,
    background_threshold: float = SELFCROSS_BACKGROUND_THRESHOLD,
    concepts: dict[str, Concept] | None = None,
    report: Callable[[str, float], None] | None = None,
) -> tuple[list[torch.Tensor], int, dict]:
    """The shared part of selfcross for several images with the same classes and options: one VAE
    call, one UNet call per draw. Returns (channels (K, g, g) per image, passes, timings_ms); finish
    each image with `channel_labels`. Raises PromptTooLongError as `segment_text`."""
    report = report or (lambda stage, fraction: None)
    timer = Timer()
    timestep = DEFAULT_TIMESTEPS["selfcross"] if timestep is None else timestep
    prompts = split_classes(sd.tokenizer, list(classes), list(background_words or ()), vector_counts(concepts))
    started = time.perf_counter()
    report("encoding", 0.05)
    latents = clean_latents(sd, images, resolution)
    timer("latent", started)
    maps = selfcross_maps(
        sd,
        latents,
        prompts,
        samples=samples,
        timestep=timestep,
        seeds=seeds,
        gate_threshold=gate_threshold,
        concepts=concepts,
        timer=timer,
        report=report,
    )
    return [selfcross_channels(sc, background, background_threshold) for sc in maps], len(prompts), timer.ms


def aggregated_self_attention(sd: StableDiffusion, latents: torch.Tensor, timestep: int, seed: int) -> torch.Tensor:
    """Empty-prompt UNet pass on latents noised with `seed`: all 16 self layers, DiffSeg step 3, (R^2, R^2)."""
    store = AttentionStore()
    with torch.inference_mode():
        noisy = add_noise(sd, latents, timestep, make_generator(sd, seed))
        with capture_attention(sd.unet, store, self_blocks=ALL_BLOCKS):
            unet_noise(sd, noisy, timestep, fixed_prompt_embeddings(sd, [""]))
        return diffseg.aggregate(self_attention_by_grid(store))


# --- the API ------------------------------------------------------------------------------


def segment_text(
    sd: StableDiffusion | None,
    clip: Clip | None,
    image: np.ndarray,
    classes: list[str],
    *,
    method: str = "selfcross",
    background: bool = True,
    background_words: list[str] | None = (),
    samples: int = 1,
    timestep: int | None = None,
    resolution: int = 512,
    seed: int = 0,
    gate_threshold: float | None = SELFCROSS_GATE_THRESHOLD,
    background_threshold: float = SELFCROSS_BACKGROUND_THRESHOLD,
    concepts: dict[str, Concept] | None = None,
    report: Callable[[str, float], None] | None = None,
    output_size: tuple[int, int] | None = None,
) -> TextSegmentation:
    """Segments an RGB uint8 image (H, W, 3) into the given classes; labels come back at (H, W), or
    at `output_size` (H, W) when the image was decoded smaller than the original.

    method: "selfcross" (needs sd), "gem" (needs clip), "gem_refined" or "cluster" (need both).
    background: add label 0 where no class is strong; without it every pixel gets a class.
    background_words: selfcross only, extra prompt words that absorb attention, never reported.
    samples: selfcross only, noise draws averaged; draw i uses seed + i.
    gate_threshold, background_threshold: selfcross only, the box gate's level (None: no gate) and
    the background's thr; VOC values by default, COCO 0.5 and 0.35 (methods 2.2).
    concepts: selfcross only, identifier -> Concept for classes that name `<identifier>` (at most one
    of them with attention weights).
    timestep: None for the method's default (DEFAULT_TIMESTEPS); gem has no SD pass and ignores it,
    as it ignores resolution, samples and seed (CLIP runs at 448).
    report(stage, fraction) is called between steps (progress and cancellation).
    Raises ValueError for bad arguments, PromptTooLongError (a ValueError) for a class that does
    not fit a prompt even alone.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if not classes:
        raise ValueError("at least one class is needed")
    if samples < 1:
        raise ValueError("samples must be at least 1")
    if method != "selfcross" and concepts:
        raise ValueError(f"concepts work with method 'selfcross' only, not {method!r}")
    if method != "gem" and sd is None:
        raise ValueError(f"method {method!r} needs a Stable Diffusion model")
    if method != "selfcross" and clip is None:
        raise ValueError(f"method {method!r} needs a CLIP model")
    report = report or (lambda stage, fraction: None)
    timestep = DEFAULT_TIMESTEPS[method] if timestep is None else timestep
    output_size = tuple(output_size or image.shape[:2])
    first_label = 0 if background else 1
    timer = Timer()
    started = time.perf_counter()

    if method == "selfcross":
        (channels,), passes, timer.ms = selfcross_batch(
            sd,
            [image],
            classes,
            seeds=[seed],
            background=background,
            background_words=background_words,
            samples=samples,
            timestep=timestep,
            resolution=resolution,
            gate_threshold=gate_threshold,
            background_threshold=background_threshold,
            concepts=concepts,
            report=report,
        )
    else:
        report("clip", 0.05)
        channels = gem_channels(gem.class_logits(clip, image, list(classes)), background)
        started = timer("clip", started)
        passes = 0
        if method != "gem":
            report("encoding", 0.2)
            latents = clean_latents(sd, image, resolution)
            started = timer("latent", started)
            report("attention", 0.3)
            self_attention = aggregated_self_attention(sd, latents, timestep, seed)
            started = timer("unet", started)
            passes = 1

    report("labelling", 0.85)
    if method in ("selfcross", "gem"):
        labels, scores = channel_labels(channels, output_size, first_label, timer)
        return TextSegmentation(label_maps.to_numpy(labels), scores, passes, timer.ms)
    if method == "gem_refined":
        side = latents.shape[-1]
        class_maps = F.interpolate(channels[None], size=(side, side), mode="bilinear", align_corners=False)[0]
        channels = propagate_class_maps(self_attention, class_maps)
        started = timer("propagate", started)
        labels = diffseg.proposals_to_labels(channels.flatten(1), output_size, mode="bicubic") + first_label
        started = timer("label", started)
    else:
        segments = diffseg.merge(self_attention, kl_threshold=CLUSTER_KL_THRESHOLD, output_size=output_size)
        started = timer("merge", started)
        labels = (name_segments(segments, channels) + first_label)[segments]
        started = timer("label", started)

    scores = diffseg.label_scores(labels, channels, first_label)
    timer("scores", started)
    return TextSegmentation(label_maps.to_numpy(labels), scores, passes, timer.ms)
