"""The resident model set of this worker process, loaded once and shared by every job."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from attnseg.settings import MiB, Settings
from workers.engine.latent_cache import LatentCache
from workers.models.clip import Clip, load_clip
from workers.models.stable_diffusion import StableDiffusion, load_stable_diffusion

NO_CLIP = "none"

log = logging.getLogger("attnseg.worker")


@dataclass
class Runtime:
    settings: Settings
    sd: StableDiffusion
    clip: Clip | None  # None when ATTNSEG_CLIP_MODEL=none: the gem methods are then refused
    latents: LatentCache = field(init=False)

    def __post_init__(self) -> None:
        self.latents = LatentCache(self.settings.latent_cache_mib * MiB)

    def describe(self) -> dict:
        clip = self.clip.describe() if self.clip else {"clip_model": None}
        clip_random = bool(self.clip and self.clip.random_weights)
        note = self.sd.weights_note
        if note and clip_random and not self.sd.random_weights:
            note += "; the GEM methods' CLIP has random weights (their masks mean nothing)"
        return {
            **self.sd.describe(),
            **clip,
            "random_weights": self.sd.random_weights or clip_random,
            "weights_note": note,
        }


_runtime: Runtime | None = None


def load_runtime(settings: Settings) -> Runtime:
    torch.set_num_threads(settings.torch_threads)
    log.info("loading %s on %s (%s)", settings.sd_model, settings.device, settings.dtype)
    sd = load_stable_diffusion(
        settings.sd_model, device=settings.device, dtype=settings.dtype, cache_dir=settings.cache_dir
    )
    clip = None
    if settings.clip_model != NO_CLIP:
        log.info("loading CLIP %s (%s)", settings.clip_model, settings.clip_pretrained)
        clip = load_clip(
            settings.clip_model,
            settings.clip_pretrained,
            device=sd.device,
            dtype=sd.dtype,
            cache_dir=settings.cache_dir,
        )
    return Runtime(settings=settings, sd=sd, clip=clip)


def install(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


def current() -> Runtime:
    if _runtime is None:
        raise RuntimeError("no models are loaded in this process: jobs run inside `attnseg worker`")
    return _runtime
