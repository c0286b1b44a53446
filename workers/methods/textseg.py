"""Open-vocabulary segmentation from a list of class names (docs/methods.md 2.2, 2.3), four methods.

- `selfcross` (From Text to Mask): SD cross-attention of the classes propagated by SD self-attention.
- `gem`: dense CLIP (GEM) class probabilities; no SD pass.
- `gem_refined` (AggGEM): GEM probabilities propagated by the aggregated SD self-attention.
- `cluster` (DiffSegClust): DiffSeg segments, each named by its mean GEM probabilities.

Every method builds "channels", score maps (K, h, w) of one square grid, where channel k stands for
label `first_label + k`: with a background channel first_label is 0 (channel 0 = background),
without it 1. Each method is one function of (sd, clip, TextRequest, report) in the `TEXT_METHODS`
table; `segment_text` checks the arguments and hands them to it. Usable without the service::

    out = segment_text(sd, clip, rgb_uint8, ["cat", "dog"], method="selfcross")
    out.labels  # (H, W) narrowest int: 0 = background, 1 + index in classes
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from attnseg.defaults import RESOLUTION, SEED, TEXT, TEXT_TIMESTEPS
from workers.methods import diffseg, gem, label_maps
from workers.methods.passes import Picture, aggregated_self_attention, clean_latents, vector_counts
from workers.methods.prompts import Prompt, PromptTooLongError, build_prompt
from workers.methods.selfcross import background_score, selfcross_draw, selfcross_pass
from workers.methods.timing import Timer
from workers.models.clip import Clip
from workers.models.concept import Concept
from workers.models.stable_diffusion import StableDiffusion

VOC_BACKGROUND_TEMPERATURE = 0.1  # langseg's VOC recipe: CA at s = 0.1 when a background channel is added
CLUSTER_KL_THRESHOLD = 0.8

Report = Callable[[str, float], None]


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


def selfcross_channels(
    sc: torch.Tensor, background: bool, threshold: float = TEXT.background_threshold
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


# --- the shared selfcross pass (also the worker's batch path) ------------------------------


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
    report: Report,
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


def selfcross_batch(
    sd: StableDiffusion,
    images: list[Picture],
    classes: list[str],
    *,
    seeds: list[int],
    background: bool = TEXT.background,
    background_words: list[str] | None = (),
    samples: int = TEXT.samples,
    timestep: int | None = None,
    resolution: int = RESOLUTION,
    gate_threshold: float | None = TEXT.gate_threshold,
    background_threshold: float = TEXT.background_threshold,
    concepts: dict[str, Concept] | None = None,
    report: Report | None = None,
) -> tuple[list[torch.Tensor], int, dict]:
    """The shared part of selfcross for several images with the same classes and options: one VAE
    call, one UNet call per draw. Returns (channels (K, g, g) per image, passes, timings_ms); finish
    each image with `channel_labels`. Raises PromptTooLongError as `segment_text`."""
    report = report or (lambda stage, fraction: None)
    timer = Timer()
    timestep = TEXT_TIMESTEPS["selfcross"] if timestep is None else timestep
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


# --- labels and scores --------------------------------------------------------------------


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


def scored(
    labels: torch.Tensor, channels: torch.Tensor, request: TextRequest, passes: int, timer: Timer
) -> TextSegmentation:
    """The result of labels (H, W) whose label l is channel l - first_label of channels (K, h, w)."""
    started = time.perf_counter()
    scores = diffseg.label_scores(labels, channels, request.first_label)
    timer("scores", started)
    return TextSegmentation(label_maps.to_numpy(labels), scores, passes, timer.ms)


# --- one function per method --------------------------------------------------------------


@dataclass(frozen=True)
class TextRequest:
    """One picture and the options of `segment_text`, checked; what every method function reads."""

    image: np.ndarray  # RGB uint8 (H, W, 3)
    classes: list[str]
    output_size: tuple[int, int]  # (H, W) of the labels
    background: bool
    background_words: list[str] | None
    samples: int
    timestep: int | None  # the method's own when None was given
    resolution: int
    seed: int
    gate_threshold: float | None
    background_threshold: float
    concepts: dict[str, Concept] | None

    @property
    def first_label(self) -> int:
        """The label of channel 0: 0 (background) with a background channel, else 1 (the first class)."""
        return 0 if self.background else 1


def clip_channels(clip: Clip, request: TextRequest, report: Report, timer: Timer) -> torch.Tensor:
    """The GEM channels (K, 28, 28) of the request's picture and classes (docs/methods.md 2.3)."""
    started = time.perf_counter()
    report("clip", 0.05)
    channels = gem_channels(gem.class_logits(clip, request.image, list(request.classes)), request.background)
    timer("clip", started)
    return channels


def sd_self_attention(sd: StableDiffusion, request: TextRequest, report: Report, timer: Timer) -> torch.Tensor:
    """The aggregated SD self-attention (R^2, R^2) of the request's picture, noised with its seed."""
    started = time.perf_counter()
    report("encoding", 0.2)
    latents = clean_latents(sd, request.image, request.resolution)
    started = timer("latent", started)
    report("attention", 0.3)
    self_attention = aggregated_self_attention(sd, latents, request.timestep, request.seed)
    timer("unet", started)
    return self_attention


def clip_and_sd(
    sd: StableDiffusion, clip: Clip, request: TextRequest, report: Report, timer: Timer
) -> tuple[torch.Tensor, torch.Tensor]:
    """What gem_refined and cluster start from: the GEM channels and the aggregated SD self-attention."""
    channels = clip_channels(clip, request, report, timer)
    self_attention = sd_self_attention(sd, request, report, timer)
    report("labelling", 0.85)
    return channels, self_attention


def selfcross_text(sd: StableDiffusion, clip: Clip | None, request: TextRequest, report: Report) -> TextSegmentation:
    """From Text to Mask (docs/methods.md 2.2): `selfcross_batch` for one picture, then its labels."""
    (channels,), passes, timings_ms = selfcross_batch(
        sd,
        [request.image],
        request.classes,
        seeds=[request.seed],
        background=request.background,
        background_words=request.background_words,
        samples=request.samples,
        timestep=request.timestep,
        resolution=request.resolution,
        gate_threshold=request.gate_threshold,
        background_threshold=request.background_threshold,
        concepts=request.concepts,
        report=report,
    )
    timer = Timer()
    timer.ms = timings_ms
    report("labelling", 0.85)
    labels, scores = channel_labels(channels, request.output_size, request.first_label, timer)
    return TextSegmentation(label_maps.to_numpy(labels), scores, passes, timer.ms)


def gem_text(sd: StableDiffusion | None, clip: Clip, request: TextRequest, report: Report) -> TextSegmentation:
    """Dense CLIP alone (docs/methods.md 2.3): the argmax of the GEM channels; no SD pass."""
    timer = Timer()
    channels = clip_channels(clip, request, report, timer)
    report("labelling", 0.85)
    labels, scores = channel_labels(channels, request.output_size, request.first_label, timer)
    return TextSegmentation(label_maps.to_numpy(labels), scores, 0, timer.ms)


def gem_refined_text(sd: StableDiffusion, clip: Clip, request: TextRequest, report: Report) -> TextSegmentation:
    """AggGEM (docs/methods.md 2.3): the GEM channels propagated by the aggregated SD self-attention."""
    timer = Timer()
    channels, self_attention = clip_and_sd(sd, clip, request, report, timer)
    started = time.perf_counter()
    side = math.isqrt(self_attention.shape[0])
    class_maps = F.interpolate(channels[None], size=(side, side), mode="bilinear", align_corners=False)[0]
    channels = propagate_class_maps(self_attention, class_maps)
    started = timer("propagate", started)
    labels = diffseg.proposals_to_labels(channels.flatten(1), request.output_size, mode="bicubic")
    timer("label", started)
    return scored(labels + request.first_label, channels, request, 1, timer)


def cluster_text(sd: StableDiffusion, clip: Clip, request: TextRequest, report: Report) -> TextSegmentation:
    """DiffSegClust (docs/methods.md 2.3): DiffSeg segments, each named by its mean GEM channels."""
    timer = Timer()
    channels, self_attention = clip_and_sd(sd, clip, request, report, timer)
    started = time.perf_counter()
    segments = diffseg.merge(self_attention, kl_threshold=CLUSTER_KL_THRESHOLD, output_size=request.output_size)
    started = timer("merge", started)
    labels = (name_segments(segments, channels) + request.first_label)[segments]
    timer("label", started)
    return scored(labels, channels, request, 1, timer)


# Method name -> its function (sd, clip, request, report); the API's `method` values, in order.
TEXT_METHODS = {"selfcross": selfcross_text, "gem": gem_text, "gem_refined": gem_refined_text, "cluster": cluster_text}
METHODS = tuple(TEXT_METHODS)


# --- the API ------------------------------------------------------------------------------


def check_text_arguments(
    sd: StableDiffusion | None,
    clip: Clip | None,
    method: str,
    classes: list[str],
    samples: int,
    concepts: dict[str, Concept] | None,
) -> None:
    """ValueError naming the problem when `segment_text` cannot run these arguments."""
    if method not in TEXT_METHODS:
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


def segment_text(
    sd: StableDiffusion | None,
    clip: Clip | None,
    image: np.ndarray,
    classes: list[str],
    *,
    method: str = TEXT.method,
    background: bool = TEXT.background,
    background_words: list[str] | None = (),
    samples: int = TEXT.samples,
    timestep: int | None = None,
    resolution: int = RESOLUTION,
    seed: int = SEED,
    gate_threshold: float | None = TEXT.gate_threshold,
    background_threshold: float = TEXT.background_threshold,
    concepts: dict[str, Concept] | None = None,
    report: Report | None = None,
    output_size: tuple[int, int] | None = None,
) -> TextSegmentation:
    """Segments an RGB uint8 image (H, W, 3) into the given classes; labels come back at (H, W), or
    at `output_size` (H, W) when the image was decoded smaller than the original.

    method: "selfcross" (needs sd), "gem" (needs clip), "gem_refined" or "cluster" (need both).
    background: add label 0 where no class is strong; without it every pixel gets a class.
    background_words: selfcross only, extra prompt words that absorb attention, never reported.
    samples: selfcross only, noise draws averaged; draw i uses seed + i.
    gate_threshold, background_threshold: selfcross only, the box gate's level (None: no gate) and
    the background's thr; VOC values by default, COCO 0.5 and 0.35 (docs/methods.md 2.2).
    concepts: selfcross only, identifier -> Concept for classes that name `<identifier>` (at most one
    of them with attention weights).
    timestep: None for the method's default (TEXT_TIMESTEPS); gem has no SD pass and ignores it,
    as it ignores resolution, samples and seed (CLIP runs at 448).
    report(stage, fraction) is called between steps (progress and cancellation).
    Raises ValueError for bad arguments, PromptTooLongError (a ValueError) for a class that does
    not fit a prompt even alone.
    """
    check_text_arguments(sd, clip, method, classes, samples, concepts)
    request = TextRequest(
        image,
        classes,
        tuple(output_size or image.shape[:2]),
        background,
        background_words,
        samples,
        TEXT_TIMESTEPS[method] if timestep is None else timestep,
        resolution,
        seed,
        gate_threshold,
        background_threshold,
        concepts,
    )
    return TEXT_METHODS[method](sd, clip, request, report or (lambda stage, fraction: None))
