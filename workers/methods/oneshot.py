"""SLiMe end to end (docs/methods.md section 3): learn one text-encoder output vector per part from a few
annotated images, then segment new images with them.

Usable without the service::

    sd = load_stable_diffusion("stable-diffusion-v1-5/stable-diffusion-v1-5")
    model = train_oneshot(sd, [rgb_uint8], [label_mask], ["head", "body"])
    out = segment_oneshot(sd, model, other_rgb_uint8)
    out.labels  # (H, W) narrowest int: 0 background, 1.. the parts in `model.labels` order

The pure tensor steps live in `workers.methods.slime`; this module runs the UNet and wires them together.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from attnseg.defaults import ONESHOT, RESOLUTION, SEED
from workers.methods import diffseg, label_maps, slime
from workers.methods.passes import autocast, grad_scaler, unet_pass
from workers.methods.timing import Timer
from workers.models.attention import AttentionStore
from workers.models.sd_ops import (
    add_noise,
    encode_latents,
    fixed_prompt_embeddings,
    image_to_pixels,
    make_generator,
    sample_noise,
)
from workers.models.stable_diffusion import StableDiffusion

CROSS_BLOCKS = (8, 9, 10, 11, 12)  # attn2 at grids R/4 and R/2 (methods 3.2)
SELF_BLOCKS = (14, 15, 16)  # attn1 at grid R
COND_ROW = slice(1, 2)  # the learned half of the batch [uncond, learned]
TRAIN_TIMESTEPS = (5, 100)  # t uniform in this range, both ends included
SEGMENT_TIMESTEP = 100
CROP_FRACTION = slime.CROP_SIZE / 512  # inference crops are 400 px at 512 (docs/methods.md 3.4), scaled
EVALUATIONS = 10  # training-set IoU checks per run, plus one after the last epoch

Report = Callable[..., None]


class ModelMismatchError(ValueError):
    """A one-shot model used with a Stable Diffusion model other than the one it was trained on."""


@dataclass
class OneshotModel:
    labels: list[str]  # part names for ids 1..K-1 (id 0 = background)
    vectors: torch.Tensor  # (K-1, D) fp32 on CPU: the learned text-encoder output vectors
    sd_model: str  # model id the vectors belong to
    params: dict  # training parameters used
    metrics: dict  # {"train_iou": best, "best_epoch", "loss": last, "epochs", ...}

    def to_json(self) -> dict:
        """JSON-safe dict; the vectors as base64 of little-endian float32 plus their shape."""
        data = self.vectors.detach().cpu().to(torch.float32).numpy().astype("<f4").tobytes()
        vectors = {"dtype": "float32", "shape": list(self.vectors.shape), "base64": base64.b64encode(data).decode()}
        return {
            "labels": list(self.labels),
            "vectors": vectors,
            "sd_model": self.sd_model,
            "params": self.params,
            "metrics": self.metrics,
        }

    @classmethod
    def from_json(cls, data: dict) -> OneshotModel:
        """Inverse of to_json (bit-exact vectors); ValueError if the vectors do not fit the labels."""
        encoded = data["vectors"]
        shape = tuple(int(n) for n in encoded["shape"])
        values = np.frombuffer(base64.b64decode(encoded["base64"]), dtype="<f4")
        if len(shape) != 2 or values.size != shape[0] * shape[1] or shape[0] != len(data["labels"]):
            raise ValueError(
                f"one-shot model vectors of shape {shape} ({values.size} values) do not fit "
                f"{len(data['labels'])} labels"
            )
        vectors = torch.from_numpy(values.astype(np.float32).reshape(shape))  # astype copies: writable
        return cls(list(data["labels"]), vectors, data["sd_model"], dict(data["params"]), dict(data["metrics"]))


@dataclass
class OneshotSegmentation:
    labels: np.ndarray  # (H, W) narrowest int: 0 background, c = part model.labels[c - 1]
    scores: dict[int, float]  # label id present in `labels` -> mean score over its pixels
    timings_ms: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Inputs and text
# ---------------------------------------------------------------------------------------------


def check_training_inputs(images: list[np.ndarray], masks: list[np.ndarray], labels: list[str]) -> None:
    """ValueError naming the problem when the images, masks and part names cannot be trained on."""
    if not labels:
        raise ValueError("at least one part name is needed")
    if not images or len(images) != len(masks):
        raise ValueError(
            f"need at least one image and one mask per image, got {len(images)} images, {len(masks)} masks"
        )
    num_classes = len(labels) + 1
    present = set()
    for index, (image, mask) in enumerate(zip(images, masks)):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image {index}: expected uint8 RGB (H, W, 3), got {image.dtype} {image.shape}")
        if mask.ndim != 2 or mask.shape != image.shape[:2]:
            raise ValueError(f"mask {index} has shape {mask.shape}, its image is {image.shape[:2]} (H, W)")
        if not np.issubdtype(mask.dtype, np.integer) and mask.dtype != np.bool_:
            raise ValueError(f"mask {index}: expected integer labels, got {mask.dtype}")
        low, high = int(mask.min()), int(mask.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"mask {index} holds labels {low}..{high}; with {len(labels)} part names labels must be "
                f"0 (background) .. {num_classes - 1}"
            )
        present.update(np.unique(mask).tolist())
    missing = [f"{labels[c - 1]!r} (id {c})" for c in range(1, num_classes) if c not in present]
    if missing:
        raise ValueError(f"no mask has a pixel of part {', '.join(missing)}: a part needs pixels to be learned")


def part_prompt_outputs(sd: StableDiffusion, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-encoder outputs (77, D) of `"part " * K` (positions 0..K-1 are the classes) and of ""."""
    base, uncond = fixed_prompt_embeddings(sd, ["part " * num_classes, ""])  # raises when K + 2 > 77 tokens
    return base, uncond


def text_batch(base: torch.Tensor, uncond: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """The UNet's text batch [uncond, learned] (2, 77, D) in the vectors' dtype."""
    return torch.stack([uncond.to(vectors.dtype), slime.learned_embeddings(base, vectors)])


# ---------------------------------------------------------------------------------------------
# Attention maps
# ---------------------------------------------------------------------------------------------


def token_maps(store: AttentionStore, kind: str, num_classes: int, size: int) -> torch.Tensor:
    """Maps of tokens 0..K-1, each layer upsampled bilinearly to size x size, mean over layers.

    kind: "cross_logits" (training) or "cross" (probabilities, softmax over 77). Upsampling is
    linear, so upsampling each grid's layer mean and weighting it by its layer count is the mean
    over layers. Returns (K, size, size) fp32, in the graph when the store keeps gradients.
    """
    total, layers = None, 0
    for grid in store.grids(kind):
        maps = slime.select_token_maps(store.mean(kind, grid)[0], num_classes).reshape(1, num_classes, grid, grid)
        maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)[0]
        count = store.count(kind, grid)
        total = count * maps if total is None else total + count * maps
        layers += count
    return total / layers


def self_attention(store: AttentionStore, grid: int) -> torch.Tensor:
    """Self-attention (R*R, R*R) of the recorded row, mean over the self layers (all at grid R)."""
    return store.mean("self", grid)[0]


# ---------------------------------------------------------------------------------------------
# Segmenting (3.4)
# ---------------------------------------------------------------------------------------------


def crop_pixels(pixels: torch.Tensor, box: slime.Box, resolution: int) -> torch.Tensor:
    """Cut box (top, left, h, w) out of pixels (1, 3, S, S) and resize it to resolution."""
    top, left, height, width = box
    crop = pixels[:, :, top : top + height, left : left + width]
    if (height, width) == (resolution, resolution):
        return crop
    return F.interpolate(crop.float(), size=(resolution, resolution), mode="bilinear", align_corners=False).to(
        pixels.dtype
    )


def crop_attention(
    sd: StableDiffusion, pixels: torch.Tensor, text: torch.Tensor, generator: torch.Generator, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One crop's maps: pixels (1, 3, S, S) -> noised latent at t = 100 -> UNet on text (2, 77, D).

    Returns CA (K, R, R) (softmax over all 77 tokens, then the K used ones) and SA (R*R, R*R).
    """
    grid = pixels.shape[-1] // sd.vae_scale_factor
    store = AttentionStore(rows=COND_ROW)
    with torch.no_grad():
        latents = add_noise(sd, encode_latents(sd, pixels), SEGMENT_TIMESTEP, generator)
        unet_pass(
            sd, latents, SEGMENT_TIMESTEP, text.to(sd.dtype), store, self_blocks=SELF_BLOCKS, cross_blocks=CROSS_BLOCKS
        )
    return token_maps(store, "cross", num_classes, grid), self_attention(store, grid)


def score_maps(
    sd: StableDiffusion,
    text: torch.Tensor,
    num_classes: int,
    image: np.ndarray,
    *,
    crops_per_side: int,
    seed: int,
    resolution: int,
    report: Report,
    timer: Timer,
) -> torch.Tensor:
    """Class scores (K, resolution, resolution) of an RGB uint8 image (H, W, 3).

    The crops' rescaled WAS maps are composed on a resolution x resolution canvas (per-class crop
    averages). `labels_and_scores` upsamples them bilinearly to (H, W) before the argmax: smooth
    boundaries, unlike a nearest upscale of the label map.
    """
    started = time.perf_counter()
    pixels = image_to_pixels(image, resolution, sd.device, sd.dtype)
    boxes = slime.crop_boxes(resolution, crops_per_side, round(CROP_FRACTION * resolution))
    generator = make_generator(sd, seed)
    canvas = slime.Canvas(num_classes, resolution, resolution, device=sd.device)
    for index, box in enumerate(boxes):
        ca, sa = crop_attention(sd, crop_pixels(pixels, box, resolution), text, generator, num_classes)
        started = timer("unet", started)
        scores, kept = slime.crop_scores(ca, sa, box[2:])
        canvas.add(scores, kept, box)
        started = timer("scores", started)
        report(stage="segmenting", fraction=(index + 1) / len(boxes))
    return canvas.mean()  # every pixel is covered by a crop: Canvas.labels would argmax this


def labels_and_scores(scores: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, dict[int, float]]:
    """Scores (K, r, r) -> the (H, W) argmax of their bilinear upsampling (chunked, so memory stays
    at a few maps of the output size), and each present label's mean score over its pixels."""
    labels = diffseg.proposals_to_labels(scores.flatten(1), size)
    return labels, diffseg.label_scores(labels, scores, first_label=0)


def segment_oneshot(
    sd: StableDiffusion,
    model: OneshotModel,
    image: np.ndarray,
    *,
    crops_per_side: int = ONESHOT.crops_per_side,
    seed: int = SEED,
    resolution: int = RESOLUTION,
    report: Report | None = None,
    output_size: tuple[int, int] | None = None,
) -> OneshotSegmentation:
    """Segment an RGB uint8 image (H, W, 3) with a trained model; labels come back at (H, W), or at
    `output_size` (H, W) when the image was decoded smaller than the original.

    Raises ModelMismatchError when the model was trained on another SD model.
    """
    if model.sd_model != sd.model_id:
        raise ModelMismatchError(
            f"one-shot model was trained on Stable Diffusion model {model.sd_model!r}, "
            f"this worker runs {sd.model_id!r}; its vectors only mean something to the model they were trained on"
        )
    report = report or (lambda **progress: None)
    timer = Timer()
    started = time.perf_counter()
    num_classes = len(model.labels) + 1
    base, uncond = part_prompt_outputs(sd, num_classes)
    text = text_batch(base, uncond, model.vectors.to(sd.device))
    timer("text", started)
    scores = score_maps(
        sd,
        text,
        num_classes,
        image,
        crops_per_side=crops_per_side,
        seed=seed,
        resolution=resolution,
        report=report,
        timer=timer,
    )
    started = time.perf_counter()
    labels, mean_scores = labels_and_scores(scores, tuple(output_size or image.shape[:2]))
    timer("label", started)
    return OneshotSegmentation(label_maps.to_numpy(labels), mean_scores, timer.ms)


# ---------------------------------------------------------------------------------------------
# Training (3.1-3.3)
# ---------------------------------------------------------------------------------------------


def training_example(
    image: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator,
    *,
    step: int,
    resolution: int,
    grid: int,
    min_crop: float,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One augmented example from image (3, S, S) in [0, 1] and mask (S, S): pixels (1, 3, S, S) in
    [-1, 1], mask (R, R) and the timestep, all drawn from the CPU `generator`."""
    image, mask = slime.augment(
        image, mask, generator=generator, size=resolution, min_crop=min_crop, part_cycle=step, latent_size=grid
    )
    timestep = int(torch.randint(TRAIN_TIMESTEPS[0], TRAIN_TIMESTEPS[1] + 1, (), generator=generator))
    return (image * 2 - 1)[None], mask, timestep


def training_loss(
    sd: StableDiffusion,
    text: torch.Tensor,
    pixels: torch.Tensor,
    mask: torch.Tensor,
    timestep: int,
    generator: torch.Generator,
    num_classes: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SLiMe's loss of one example (3.3 steps 2-6): pixels (1, 3, S, S), mask (R, R), text
    (2, 77, D) [uncond, learned] with the learned vectors in the graph. Returns (total, parts)."""
    grid = mask.shape[-1]
    latents = encode_latents(sd, pixels, generator=generator)  # seeded posterior sample
    noise = sample_noise(latents, generator)
    noisy = add_noise(sd, latents, timestep, noise=noise)
    store = AttentionStore(rows=COND_ROW, keep_grad=True)
    # Autocast for the UNet only: the losses' matmuls (WAS over an R^2 x R^2 map) stay fp32.
    with autocast(sd):
        eps = unet_pass(sd, noisy, timestep, text, store, self_blocks=SELF_BLOCKS, cross_logit_blocks=CROSS_BLOCKS)
    ca_logits = token_maps(store, "cross_logits", num_classes, grid)
    return slime.slime_loss(ca_logits, self_attention(store, grid), mask.to(sd.device), eps[0], eps[1], noise[0])


def training_iou(
    sd: StableDiffusion,
    text: torch.Tensor,
    num_classes: int,
    images: list[np.ndarray],
    masks: list[np.ndarray],
    *,
    seed: int,
    resolution: int,
    between: Callable[[], None] = lambda: None,
) -> float:
    """Mean over the training images of slime.mean_iou between the segment path (1 crop, labels
    at the image's size) and the image's mask. text: (2, 77, D) [uncond, learned].
    between() runs between images (a cancel check: large images take seconds each)."""
    ious = []
    for index, (image, mask) in enumerate(zip(images, masks)):
        if index:
            between()
        scores = score_maps(
            sd,
            text,
            num_classes,
            image,
            crops_per_side=1,
            seed=seed,
            resolution=resolution,
            report=lambda **progress: None,
            timer=Timer(),
        )
        labels, _ = labels_and_scores(scores, mask.shape)
        ious.append(slime.mean_iou(labels, torch.from_numpy(mask.astype(np.int64)).to(labels.device), num_classes))
    return sum(ious) / len(ious)


def prepare_example(image: np.ndarray, mask: np.ndarray, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (H, W, 3) uint8 -> (3, S, S) in [0, 1] (black stays 0 under rotation padding) and mask
    (H, W) -> (S, S) long, both on CPU at S = resolution: augment's own first resize is then the
    identity and large images are not resized every step."""
    pixels = (image_to_pixels(image, resolution, "cpu", torch.float32)[0] + 1) / 2
    return pixels, slime.resize_mask(torch.from_numpy(mask.astype(np.int64)), resolution)


def train_step(
    sd: StableDiffusion,
    text: torch.Tensor,
    example: tuple[torch.Tensor, torch.Tensor, int],
    generator: torch.Generator,
    num_classes: int,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> dict[str, float]:
    """One optimiser step on one augmented example; returns the loss and its parts as floats, so
    no graph outlives the step (the caller's report may raise and keep the caller's frame)."""
    pixels, mask, timestep = example
    loss, parts = training_loss(sd, text, pixels.to(sd.device, sd.dtype), mask, timestep, generator, num_classes)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scale = scaler.get_scale() if scaler.is_enabled() else 1.0
    scaler.step(optimizer)
    scaler.update()
    skipped = scaler.is_enabled() and scaler.get_scale() < scale  # fp16 overflow: the step was dropped
    return {"loss": loss.item(), **{name: value.item() for name, value in parts.items()}, "skipped": int(skipped)}


@dataclass
class Training:
    """One training run's state: `start_training`, then `train_epoch` (and `evaluate`) per epoch,
    then `finish_training`."""

    sd: StableDiffusion
    images: list[np.ndarray]  # as given: the IoU checks segment them as the segment path would
    masks: list[np.ndarray]
    labels: list[str]
    params: dict  # the training parameters, as the model records them
    examples: list[tuple[torch.Tensor, torch.Tensor]]  # `prepare_example` of each picture
    base: torch.Tensor  # (77, D) text-encoder output of "part " * K
    uncond: torch.Tensor  # (77, D) of ""
    vectors: torch.Tensor  # (K-1, D) fp32, the trained part vectors
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    augmentation: torch.Generator  # CPU: augmentation and timesteps
    generator: torch.Generator  # the model's device: latent samples and noise
    timer: Timer = field(default_factory=Timer)
    best: dict = field(default_factory=lambda: {"train_iou": None, "best_epoch": None, "vectors": None})
    totals: dict[str, float] = field(default_factory=dict)  # the current epoch's sums of the step results
    skipped_steps: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.labels) + 1

    @property
    def evaluate_every(self) -> int:
        return max(1, self.params["epochs"] // EVALUATIONS)


def start_training(
    sd: StableDiffusion,
    images: list[np.ndarray],
    masks: list[np.ndarray],
    labels: list[str],
    *,
    epochs: int,
    learning_rate: float,
    seed: int,
    resolution: int,
    min_crop: float,
) -> Training:
    """Check the inputs, encode the part prompt, prepare the pictures and the optimiser (3.1, 3.3)."""
    check_training_inputs(images, masks, labels)
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if not 0 < min_crop <= 1:
        raise ValueError(f"min_crop must be in (0, 1], got {min_crop}")
    base, uncond = part_prompt_outputs(sd, len(labels) + 1)
    examples = [prepare_example(image, mask, resolution) for image, mask in zip(images, masks)]
    # fp32 master copy of the part vectors, initialised to the encoded "part" tokens.
    vectors = base[1 : len(labels) + 1].float().clone().requires_grad_(True)
    augmentation = torch.Generator().manual_seed(seed)
    # Latent samples and noise come from their own stream, seeded from the first.
    generator = make_generator(sd, int(torch.randint(2**62, (), generator=augmentation)))
    params = {
        "epochs": epochs,
        "learning_rate": learning_rate,
        "seed": seed,
        "resolution": resolution,
        "min_crop": min_crop,
        "images": len(images),
    }
    optimizer = torch.optim.Adam([vectors], lr=learning_rate)
    return Training(
        sd,
        images,
        masks,
        list(labels),
        params,
        examples,
        base,
        uncond,
        vectors,
        optimizer,
        grad_scaler(sd),
        augmentation,
        generator,
    )


def train_epoch(training: Training, epoch: int, report: Report) -> dict:
    """One optimiser step per picture (3.3); report() after each step but the last. Returns the
    progress after the last step (the epoch's mean loss so far)."""
    started = time.perf_counter()
    sd, examples, params = training.sd, training.examples, training.params
    grid = params["resolution"] // sd.vae_scale_factor
    training.totals = {}
    for index, (image, mask) in enumerate(examples):
        step = (epoch - 1) * len(examples) + index
        example = training_example(
            image,
            mask,
            training.augmentation,
            step=step,
            resolution=params["resolution"],
            grid=grid,
            min_crop=params["min_crop"],
        )
        text = text_batch(training.base, training.uncond, training.vectors)
        result = train_step(
            sd, text, example, training.generator, training.num_classes, training.optimizer, training.scaler
        )
        training.skipped_steps += result.pop("skipped")
        training.totals = {name: training.totals.get(name, 0.0) + value for name, value in result.items()}
        progress = {
            "stage": "training",
            "fraction": (epoch - 1 + (index + 1) / len(examples)) / params["epochs"],
            "epoch": epoch,
            "epochs": params["epochs"],
            "loss": training.totals["loss"] / (index + 1),
            "best_iou": training.best["train_iou"],
        }
        if index + 1 < len(examples):  # within an epoch of many pictures: a cancel stops here
            report(**progress)
    training.timer("training", started)
    return progress


def evaluate(training: Training, epoch: int, between: Callable[[], None]) -> None:
    """The training-set IoU of the current vectors; keeps them when they beat the best so far."""
    started = time.perf_counter()
    text = text_batch(training.base, training.uncond, training.vectors.detach())
    iou = training_iou(
        training.sd,
        text,
        training.num_classes,
        training.images,
        training.masks,
        seed=training.params["seed"],
        resolution=training.params["resolution"],
        between=between,
    )
    if training.best["train_iou"] is None or iou > training.best["train_iou"]:
        training.best = {"train_iou": iou, "best_epoch": epoch, "vectors": training.vectors.detach().clone()}
    training.timer("evaluation", started)


def finish_training(training: Training) -> OneshotModel:
    """The model of the best vectors seen, with the run's metrics."""
    pictures = len(training.examples)
    metrics = {
        "train_iou": round(training.best["train_iou"], 6),
        "best_epoch": training.best["best_epoch"],
        "epochs": training.params["epochs"],
        "evaluated_every": training.evaluate_every,
        **{name: round(value / pictures, 6) for name, value in training.totals.items()},  # the last epoch's means
        "skipped_steps": int(training.skipped_steps),
        "timings_ms": training.timer.ms,
    }
    return OneshotModel(training.labels, training.best["vectors"].cpu(), training.sd.model_id, training.params, metrics)


def train_oneshot(
    sd: StableDiffusion,
    images: list[np.ndarray],
    masks: list[np.ndarray],
    labels: list[str],
    *,
    epochs: int = ONESHOT.epochs,
    learning_rate: float = ONESHOT.learning_rate,
    seed: int = SEED,
    resolution: int = RESOLUTION,
    min_crop: float = ONESHOT.min_crop,
    report: Report | None = None,
) -> OneshotModel:
    """Learn one text-encoder output vector per part (docs/methods.md 3.1-3.3).

    images: RGB uint8 (H, W, 3); masks: (H, W) integer labels, 0 background, c part labels[c - 1].
    Adam on the vectors only, batch 1, each epoch one step per image. Every max(1, epochs // 10)
    epochs and after the last, the training-set IoU of the segment path (1 crop) is measured and
    the best vectors so far are kept. report(stage="training", fraction, epoch, epochs, loss,
    best_iou) runs after every epoch, after each step of an epoch over several images and between the
    images of an IoU check, so a cancel (an exception from it) stops training within one step or
    image, whatever their size; nothing stays allocated.
    """
    training = start_training(
        sd,
        images,
        masks,
        labels,
        epochs=epochs,
        learning_rate=learning_rate,
        seed=seed,
        resolution=resolution,
        min_crop=min_crop,
    )
    report = report or (lambda **progress: None)
    try:
        for epoch in range(1, epochs + 1):
            progress = train_epoch(training, epoch, report)
            if epoch % training.evaluate_every == 0 or epoch == epochs:
                evaluate(training, epoch, lambda progress=progress: report(**progress))
            loss = training.totals["loss"] / len(training.examples)
            best_iou = training.best["train_iou"]
            report(stage="training", fraction=epoch / epochs, epoch=epoch, epochs=epochs, loss=loss, best_iou=best_iou)
    finally:
        if sd.device.type == "cuda":
            torch.cuda.empty_cache()
    return finish_training(training)
