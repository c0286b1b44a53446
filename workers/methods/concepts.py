"""Concepts: an identifier learned from a few photos of one object (docs/methods.md 2.4).

Custom Diffusion (Kumari et al. 2023; diffusers' `train_custom_diffusion.py`): the identifier's input
token embedding, initialised from the class word, plus the `to_k`/`to_v` weights of every
cross-attention layer, trained with the diffusion loss. With `train_kv=False` the embedding alone is
trained (Textual Inversion, Gal et al. 2023; diffusers' `textual_inversion.py`). Both run through the
resident models, which never change: the vectors enter through the token-embedding hook and the
weights through attention processors (workers.models.concept_hooks), for the call only.

Usable without the service (the `Concept` it returns is workers.models.concept's)::

    concept = train_concept(sd, photos, "my-mug", "mug")
    files = concept.files()           # {"learned_embeds.safetensors": ..., "pytorch_custom_...": ...}
    again = Concept.from_files(files, "my-mug", "mug", sd_model=sd.model_id)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from attnseg.defaults import CONCEPT, RESOLUTION, SEED
from workers.methods.passes import autocast, encode_with_concepts, grad_scaler, unet_pass
from workers.methods.prompts import Prompt, prompt_from_pieces
from workers.methods.timing import Timer
from workers.models.concept import KV, Concept
from workers.models.concept_hooks import cross_attention_layers
from workers.models.sd_ops import image_to_pixels, make_generator, sample_noise
from workers.models.stable_diffusion import StableDiffusion

# Prompts of the training photos ("{}" is "<identifier> class_word", or "<identifier>" for Textual
# Inversion): a few of textual_inversion.py's object templates; Custom Diffusion's instance prompt
# "photo of a <new1> <class>" is the first.
TEMPLATES = (
    "photo of a {}",
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a good photo of a {}",
)
# Defaults from the public recipes (diffusers' READMEs, learning rates after --scale_lr):
# Custom Diffusion 250 steps, lr 1e-5 x batch 2; Textual Inversion 3000 steps, lr 5e-4 x 4 (batch 1,
# gradient accumulation 4). Both use AdamW (weight decay 1e-2) and clip gradients at norm 1.
RECIPES = {
    True: {"steps": 250, "learning_rate": 2e-5, "batch_size": 2},
    False: {"steps": 3000, "learning_rate": 2e-3, "batch_size": 4},
}
WEIGHT_DECAY = 1e-2
MAX_GRAD_NORM = 1.0

Report = Callable[..., None]


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def class_word_embedding(sd: StableDiffusion, class_word: str, count: int) -> torch.Tensor:
    """(count, D) fp32: the mean input embedding of the class word's tokens, repeated."""
    ids = sd.tokenizer(class_word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"class word {class_word!r} has no tokens")
    table = sd.text_encoder.get_input_embeddings().weight
    return table[torch.tensor(ids, device=table.device)].float().mean(0).expand(count, -1).clone().cpu()


def training_prompts(sd: StableDiffusion, identifier: str, class_word: str, train_kv: bool, count: int) -> list[Prompt]:
    subject = f"<{identifier}> {class_word}" if train_kv else f"<{identifier}>"
    return [
        prompt_from_pieces(sd.tokenizer, [(template.format(subject), None)], [], 0, {identifier: count})
        for template in TEMPLATES
    ]


def prepare_photos(
    sd: StableDiffusion, images: list[np.ndarray], masks: list[np.ndarray | None] | None, resolution: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The photos' VAE posteriors and loss weights: means (N, 4, R, R), stds (N, 4, R, R) and weights
    (N, 1, R, R) in fp32 on the device (1 everywhere without a mask; the mask, nearest, with one)."""
    grid = resolution // sd.vae_scale_factor
    means, stds, weights = [], [], []
    for index, image in enumerate(images):
        with torch.no_grad():
            pixels = image_to_pixels(image, resolution, sd.device, sd.dtype)
            posterior = sd.vae.encode(pixels).latent_dist
        scale = sd.vae.config.scaling_factor
        means.append(posterior.mean.float() * scale)
        stds.append(posterior.std.float() * scale)
        mask = None if masks is None else masks[index]
        if mask is None:
            weights.append(torch.ones(1, 1, grid, grid, device=sd.device))
        else:
            resized = F.interpolate(
                torch.from_numpy(np.asarray(mask) > 0).float()[None, None], size=(grid, grid), mode="nearest"
            )
            weights.append(resized.to(sd.device))
    return torch.cat(means), torch.cat(stds), torch.cat(weights)


def check_photos(images: list[np.ndarray], masks: list | None) -> None:
    if not 1 <= len(images) <= 20:
        raise ValueError(f"a concept needs 1 to 20 photos, got {len(images)}")
    if masks is not None and len(masks) != len(images):
        raise ValueError(f"{len(images)} photos but {len(masks)} masks: give one mask per photo or none")
    for index, image in enumerate(images):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"photo {index}: expected uint8 RGB (H, W, 3), got {image.dtype} {image.shape}")
        mask = None if masks is None else masks[index]
        if mask is not None and (mask.shape != image.shape[:2] or not (np.asarray(mask) > 0).any()):
            raise ValueError(f"mask {index} must have its photo's size {image.shape[:2]} and some object pixels")


def diffusion_target(sd: StableDiffusion, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """The UNet's training target: the noise (epsilon models: SD 1.x, 2.1-base) or the velocity."""
    if sd.scheduler.config.prediction_type == "v_prediction":
        return sd.scheduler.get_velocity(latents, noise, timesteps)
    return noise


@dataclass
class ConceptTraining:
    """One training run's state: `start_concept_training`, `concept_step` per step, `finish_concept`."""

    sd: StableDiffusion
    identifier: str
    class_word: str
    train_kv: bool
    steps: int
    learning_rate: float
    batch_size: int
    prompts: list[Prompt]  # TEMPLATES with the identifier (and class word)
    means: torch.Tensor  # (N, 4, R, R) the photos' posterior means, `prepare_photos`
    stds: torch.Tensor  # (N, 4, R, R)
    weights: torch.Tensor  # (N, 1, R, R) loss weights
    vectors: torch.Tensor  # (n, D) fp32, trained
    kv: KV | None  # attn2 path -> (to_k, to_v) fp32, trained; None: Textual Inversion
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    choices: torch.Generator  # CPU: photos, flips, timesteps, prompts
    generator: torch.Generator  # the model's device: latents and noise
    timer: Timer = field(default_factory=Timer)
    losses: list[float] = field(default_factory=list)

    @property
    def parameters(self) -> list[torch.Tensor]:
        return [self.vectors, *(w for pair in (self.kv or {}).values() for w in pair)]


def trainable_kv(sd: StableDiffusion) -> KV:
    """fp32 trainable copies of every cross-attention layer's to_k and to_v weights."""
    return {
        name: (
            layer.to_k.weight.detach().float().clone().requires_grad_(True),
            layer.to_v.weight.detach().float().clone().requires_grad_(True),
        )
        for name, layer in cross_attention_layers(sd.unet).items()
    }


def start_concept_training(
    sd: StableDiffusion,
    images: list[np.ndarray],
    identifier: str,
    class_word: str,
    *,
    masks: list[np.ndarray | None] | None,
    train_kv: bool,
    steps: int | None,
    learning_rate: float | None,
    batch_size: int | None,
    num_vectors: int,
    resolution: int,
    seed: int,
) -> ConceptTraining:
    """Check the photos, fill in the recipe, encode the photos and set up the optimiser."""
    check_photos(images, masks)
    recipe = RECIPES[train_kv]
    steps = recipe["steps"] if steps is None else steps
    learning_rate = recipe["learning_rate"] if learning_rate is None else learning_rate
    batch_size = recipe["batch_size"] if batch_size is None else batch_size
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be at least 1")
    started = time.perf_counter()
    prompts = training_prompts(sd, identifier, class_word, train_kv, num_vectors)
    means, stds, weights = prepare_photos(sd, images, masks, resolution)
    vectors = class_word_embedding(sd, class_word, num_vectors).to(sd.device).requires_grad_(True)
    kv = trainable_kv(sd) if train_kv else None
    parameters = [vectors, *(w for pair in (kv or {}).values() for w in pair)]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=WEIGHT_DECAY)
    choices = torch.Generator().manual_seed(seed)
    generator = make_generator(sd, int(torch.randint(2**62, (), generator=choices)))
    training = ConceptTraining(
        sd,
        identifier,
        class_word,
        train_kv,
        steps,
        learning_rate,
        batch_size,
        prompts,
        means,
        stds,
        weights,
        vectors,
        kv,
        optimizer,
        grad_scaler(sd),
        choices,
        generator,
    )
    training.timer("prepare", started)
    return training


def concept_loss(training: ConceptTraining) -> torch.Tensor:
    """The loss of one drawn batch: photos, flips, timesteps and prompts from `choices`, the latent
    sample and the noise from `generator`; mask-weighted MSE of the UNet's prediction."""
    sd, batch_size, choices = training.sd, training.batch_size, training.choices
    picks = torch.randint(len(training.means), (batch_size,), generator=choices)
    flips = torch.rand(batch_size, generator=choices) < 0.5
    timesteps = torch.randint(0, sd.scheduler.config.num_train_timesteps, (batch_size,), generator=choices)
    prompt_picks = torch.randint(len(training.prompts), (batch_size,), generator=choices).tolist()
    mean, std, weight = training.means[picks], training.stds[picks], training.weights[picks]
    latents = mean + std * sample_noise(mean, training.generator)
    latents = torch.where(flips.to(sd.device)[:, None, None, None], latents.flip(-1), latents)
    weight = torch.where(flips.to(sd.device)[:, None, None, None], weight.flip(-1), weight)
    noise = sample_noise(latents, training.generator)
    timesteps = timesteps.to(sd.device)
    noisy = sd.scheduler.add_noise(latents, noise, timesteps)
    with autocast(sd):
        prompts = [training.prompts[i] for i in prompt_picks]
        text = encode_with_concepts(sd, prompts, {training.identifier: training.vectors})
        prediction = unet_pass(sd, noisy.to(sd.dtype), timesteps, text, kv=training.kv)
    error = (prediction.float() - diffusion_target(sd, latents, noise, timesteps)) ** 2
    return (error * weight).sum() / (weight.sum() * error.shape[1])


def concept_step(training: ConceptTraining) -> float:
    """One optimiser step (gradients clipped at MAX_GRAD_NORM); returns its loss."""
    started = time.perf_counter()
    loss = concept_loss(training)
    training.optimizer.zero_grad(set_to_none=True)
    training.scaler.scale(loss).backward()
    training.scaler.unscale_(training.optimizer)
    torch.nn.utils.clip_grad_norm_(training.parameters, MAX_GRAD_NORM)
    training.scaler.step(training.optimizer)
    training.scaler.update()
    training.losses.append(loss.item())
    training.timer("training", started)
    return training.losses[-1]


def finish_concept(training: ConceptTraining) -> Concept:
    """The trained concept on CPU, with the run's metrics (the loss: mean of the last 10 steps)."""
    tail = training.losses[-10:]
    metrics = {
        "steps": training.steps,
        "loss": round(sum(tail) / len(tail), 6),
        "learning_rate": training.learning_rate,
        "batch_size": training.batch_size,
        "train_kv": training.train_kv,
        "timings_ms": training.timer.ms,
    }
    kv = training.kv
    trained_kv = None if kv is None else {name: (k.detach().cpu(), v.detach().cpu()) for name, (k, v) in kv.items()}
    vectors = training.vectors.detach().cpu()
    return Concept(training.identifier, training.class_word, vectors, trained_kv, training.sd.model_id, metrics)


def train_concept(
    sd: StableDiffusion,
    images: list[np.ndarray],
    identifier: str,
    class_word: str,
    *,
    masks: list[np.ndarray | None] | None = None,
    train_kv: bool = CONCEPT.train_kv,
    steps: int | None = None,
    learning_rate: float | None = None,
    batch_size: int | None = None,
    num_vectors: int = CONCEPT.num_vectors,
    resolution: int = RESOLUTION,
    seed: int = SEED,
    report: Report | None = None,
) -> Concept:
    """Learn a concept from photos (RGB uint8 (H, W, 3)) of one object; masks (H, W), 0 = not the
    object, weight the loss to the object. None for steps, learning_rate, batch_size: RECIPES.

    Each step: batch_size photos drawn with replacement, flipped (p 0.5) in latent space, a posterior
    sample, t uniform in [0, 1000), seeded noise, a prompt from TEMPLATES; loss = mask-weighted MSE
    of the UNet's prediction. report(stage="training", fraction, step, steps, loss) after every step;
    an exception from it stops training. The resident models are never written.
    """
    training = start_concept_training(
        sd,
        images,
        identifier,
        class_word,
        masks=masks,
        train_kv=train_kv,
        steps=steps,
        learning_rate=learning_rate,
        batch_size=batch_size,
        num_vectors=num_vectors,
        resolution=resolution,
        seed=seed,
    )
    report = report or (lambda **progress: None)
    try:
        for step in range(1, training.steps + 1):
            loss = concept_step(training)
            report(stage="training", fraction=step / training.steps, step=step, steps=training.steps, loss=loss)
    finally:
        if sd.device.type == "cuda":
            torch.cuda.empty_cache()
    return finish_concept(training)
