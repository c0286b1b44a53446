"""SLiMe end to end on the tiny random SD model (docs/methods.md section 3), at resolution 256 (R = 32).

The fitting tests use a copy of the tiny model given the three properties SLiMe relies on in real
SD, which random weights lack (see `like_sd`); the mechanics tests (seeding, gradients, progress,
cancellation) use the shared tiny model as it is.
"""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from workers.methods import oneshot
from workers.methods.oneshot import ModelMismatchError, OneshotModel, segment_oneshot, train_oneshot
from workers.methods.slime import mean_iou
from workers.models.attention import CapturingAttnProcessor, transformer_blocks
from workers.models.sd_ops import image_to_pixels
from workers.models.stable_diffusion import load_stable_diffusion

RESOLUTION = 256
HEIGHT, WIDTH = 48, 80  # not square: labels must come back at the image's own size
LABELS = ["top", "bottom"]
FIT_EPOCHS = 24  # at the default learning rate 0.1; seeds 0-3 reached 0.90-0.92 training IoU


def two_colour_example() -> tuple[np.ndarray, np.ndarray]:
    """Top half red = part 1, bottom half blue = part 2.

    Top/bottom rather than left/right: training flips horizontally, so with a left/right split
    each image border is part 1 in half the steps and part 2 in the others, and a random UNet's
    border features (zero padding) carry no colour to tell them apart.
    """
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    image[: HEIGHT // 2] = (220, 40, 40)
    image[HEIGHT // 2 :] = (40, 60, 210)
    mask = np.zeros((HEIGHT, WIDTH), np.int64)
    mask[: HEIGHT // 2] = 1
    mask[HEIGHT // 2 :] = 2
    return image, mask


@torch.no_grad()
def like_sd(sd, latent_gain: float = 60.0, cross_query_gain: float = 5.0, self_gain: float = 3.0):
    """Give the random model, in place, what SLiMe relies on in real SD:

    - VAE: a deterministic posterior whose latents are centred and carry colour at SD's scale
      (random weights: posterior std ~1 over a colour signal ~0.1, under a shared offset ~0.4);
    - cross-attention: queries x5, so text logits span an SD-like range (random weights: +-0.2,
      which the vectors could only widen by growing ~10x and thereby rewriting the UNet's values);
    - self-attention of blocks 14-16: keys tied to queries (x3), so pixels with similar features
      attend to each other (random weights: uniform attention, WAS would be noise).
    Measured on the fit below (24 epochs, lr 0.1): training IoU 0.0 with the model as it is (no
    part's attention over 77 tokens reaches keep_and_gate's 0.2, so all is background), 0.0 with
    VAE and self-attention only, 0.92 with all three.
    """
    grey = image_to_pixels(np.full((64, 64, 3), 128, np.uint8), RESOLUTION, sd.device, sd.dtype)
    offset = sd.vae.encode(grey).latent_dist.mean.mean(dim=(0, 2, 3))
    moments = sd.vae.quant_conv  # 1x1 conv -> [mean (4), logvar (4)]
    moments.bias[:4] -= offset
    moments.weight[:4] *= latent_gain
    moments.bias[:4] *= latent_gain
    moments.weight[4:] = 0
    moments.bias[4:] = -30  # the VAE clamps logvar at -30: std 3e-7
    for block in transformer_blocks(sd.unet):
        block.cross_attention.to_q.weight *= cross_query_gain
        if block.number in oneshot.SELF_BLOCKS:
            block.self_attention.to_q.weight *= self_gain
            block.self_attention.to_k.weight.copy_(block.self_attention.to_q.weight)
    return sd


@pytest.fixture(scope="module")
def sd_like(tiny_sd_dir):
    return like_sd(load_stable_diffusion(str(tiny_sd_dir), device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def fitted(sd_like):
    image, mask = two_colour_example()
    progress = []
    model = train_oneshot(
        sd_like,
        [image],
        [mask],
        LABELS,
        epochs=FIT_EPOCHS,
        resolution=RESOLUTION,
        report=lambda **p: progress.append(p),
    )
    return model, progress


def quick_train(sd, **kwargs):
    image, mask = two_colour_example()
    return train_oneshot(sd, [image], [mask], LABELS, **{"epochs": 2, "resolution": RESOLUTION, **kwargs})


def unet_untouched(sd) -> bool:
    parameters = [*sd.unet.parameters(), *sd.vae.parameters(), *sd.text_encoder.parameters()]
    no_grads = all(p.grad is None and not p.requires_grad for p in parameters)
    stock = not any(isinstance(p, CapturingAttnProcessor) for p in sd.unet.attn_processors.values())
    return no_grads and stock


# --- fitting (planted signal) --------------------------------------------------------------------


def test_training_fits_the_two_colour_mask(fitted):
    model, _ = fitted
    assert model.metrics["train_iou"] > 0.85
    assert model.vectors.shape == (2, 32) and model.vectors.dtype == torch.float32
    assert model.labels == LABELS and model.sd_model.endswith("tiny-random")
    assert model.params["epochs"] == FIT_EPOCHS and model.params["learning_rate"] == 0.1


def test_segmenting_the_training_image_reproduces_its_mask(sd_like, fitted):
    model, _ = fitted
    image, mask = two_colour_example()
    out = segment_oneshot(sd_like, model, image, resolution=RESOLUTION)
    assert out.labels.shape == (HEIGHT, WIDTH) and out.labels.dtype == np.uint8  # narrowest
    iou = mean_iou(torch.from_numpy(out.labels), torch.from_numpy(mask), 3)
    assert iou > 0.85
    # The kept vectors are the best checked ones, and the same path measured them.
    assert iou == pytest.approx(model.metrics["train_iou"], abs=1e-6)
    assert set(out.scores) == set(np.unique(out.labels).tolist())
    assert all(0 < score <= 1 for score in out.scores.values())


def test_four_crops_on_a_non_square_image(sd_like, fitted):
    model, _ = fitted
    image, mask = two_colour_example()
    out = segment_oneshot(sd_like, model, image, crops_per_side=2, resolution=RESOLUTION)
    assert out.labels.shape == (HEIGHT, WIDTH)
    assert mean_iou(torch.from_numpy(out.labels), torch.from_numpy(mask), 3) > 0.85
    assert out.timings_ms["unet"] > 0


def test_report_gets_epoch_progress(fitted):
    _, progress = fitted
    assert [p["epoch"] for p in progress] == list(range(1, FIT_EPOCHS + 1))
    assert all(p["stage"] == "training" and p["epochs"] == FIT_EPOCHS for p in progress)
    assert [p["fraction"] for p in progress] == [e / FIT_EPOCHS for e in range(1, FIT_EPOCHS + 1)]
    assert all(math.isfinite(p["loss"]) for p in progress)
    # Checked every FIT_EPOCHS // 10 = 2 epochs: none yet after the first; the best never drops.
    best = [p["best_iou"] for p in progress]
    assert best[0] is None and all(b is not None for b in best[1:])
    assert best[1:] == sorted(best[1:])


# --- the artefact ----------------------------------------------------------------------------------


def test_json_round_trip_is_exact(sd_like, fitted):
    model, _ = fitted
    loaded = OneshotModel.from_json(json.loads(json.dumps(model.to_json())))
    assert torch.equal(loaded.vectors, model.vectors)
    assert (loaded.labels, loaded.sd_model, loaded.params, loaded.metrics) == (
        model.labels,
        model.sd_model,
        model.params,
        model.metrics,
    )
    image, _ = two_colour_example()
    first = segment_oneshot(sd_like, model, image, resolution=RESOLUTION)
    again = segment_oneshot(sd_like, loaded, image, resolution=RESOLUTION)
    assert np.array_equal(first.labels, again.labels)


def test_from_json_rejects_vectors_that_do_not_fit_the_labels(fitted):
    data = fitted[0].to_json()
    data["labels"] = data["labels"][:1]
    with pytest.raises(ValueError, match="do not fit 1 labels"):
        OneshotModel.from_json(data)


def test_model_of_another_sd_model_is_refused(sd_like, fitted):
    other = dataclasses.replace(fitted[0], sd_model="stable-diffusion-v1-5/stable-diffusion-v1-5")
    with pytest.raises(ModelMismatchError, match="stable-diffusion-v1-5.*tiny-random"):
        segment_oneshot(sd_like, other, two_colour_example()[0], resolution=RESOLUTION)


# --- mechanics --------------------------------------------------------------------------------------


def test_same_seed_same_vectors_other_seed_other_vectors(tiny_sd):
    first, again = quick_train(tiny_sd, seed=3), quick_train(tiny_sd, seed=3)
    other = quick_train(tiny_sd, seed=4)
    assert torch.equal(first.vectors, again.vectors)
    assert not torch.equal(first.vectors, other.vectors)


def test_only_the_vectors_are_trained(tiny_sd):
    base, _ = oneshot.part_prompt_outputs(tiny_sd, 3)
    model = quick_train(tiny_sd)
    assert not torch.equal(model.vectors, base[1:3])  # they moved: gradients reached them
    assert unet_untouched(tiny_sd)


def test_exception_from_report_stops_training_cleanly(tiny_sd):
    class Canceled(Exception):
        pass

    epochs_seen = []

    def report(**progress):
        epochs_seen.append(progress["epoch"])
        if progress["epoch"] == 2:
            raise Canceled

    with pytest.raises(Canceled):
        quick_train(tiny_sd, epochs=5, report=report)
    assert epochs_seen == [1, 2]
    assert unet_untouched(tiny_sd)
    quick_train(tiny_sd, epochs=1)  # the model is still usable


def test_report_runs_between_steps_and_evaluated_images(tiny_sd):
    """With many (or large) pictures an epoch is long: a cancel is seen after every step and image."""
    image, mask = two_colour_example()
    fractions = []
    train_oneshot(
        tiny_sd,
        [image, image],
        [mask, mask],
        LABELS,
        epochs=1,
        resolution=RESOLUTION,
        report=lambda **p: fractions.append(p["fraction"]),
    )
    # after step 1 of 2; between the 2 images of the IoU check (the epoch's steps are done); its end
    assert fractions == [0.5, 1.0, 1.0]

    class Canceled(Exception):
        pass

    def cancel(**progress):
        raise Canceled

    with pytest.raises(Canceled):
        train_oneshot(tiny_sd, [image] * 3, [mask] * 3, LABELS, epochs=1, resolution=RESOLUTION, report=cancel)
    assert unet_untouched(tiny_sd)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_unet_trains_in_place(tiny_sd, tiny_sd_dir, dtype):
    """Autocast (and loss scaling for fp16) through the resident UNet in its own dtype: the first
    Adam step (lr * sign of the gradient) goes the way the fp32 model's does."""
    sd = load_stable_diffusion(str(tiny_sd_dir), device="cpu", dtype=dtype)
    base, _ = oneshot.part_prompt_outputs(tiny_sd, 3)
    reference = quick_train(tiny_sd, epochs=1, resolution=128).vectors - base[1:3]
    step = quick_train(sd, epochs=1, resolution=128).vectors - base[1:3]  # 128: fp16 is slow on CPU
    assert step.dtype == torch.float32
    assert (step.sign() == reference.sign()).float().mean() > 0.95
    assert all(p.dtype == getattr(torch, dtype) for p in sd.unet.parameters())
    assert unet_untouched(sd)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda image, mask: (image, mask[:, 1:]), "mask 0 has shape"),
        (lambda image, mask: (image, np.where(mask == 2, 3, mask)), "labels 1..3"),
        (lambda image, mask: (image, np.minimum(mask, 1)), "'bottom' \\(id 2\\)"),
        (lambda image, mask: (image.astype(np.float32), mask), "uint8 RGB"),
    ],
)
def test_impossible_inputs_are_refused(tiny_sd, change, message):
    image, mask = change(*two_colour_example())
    with pytest.raises(ValueError, match=message):
        train_oneshot(tiny_sd, [image], [mask], LABELS, epochs=1, resolution=RESOLUTION)
