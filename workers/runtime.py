"""The resident model set of this worker process, loaded once and shared by every job."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from attnseg.settings import Settings
from workers.models import StableDiffusion, load_stable_diffusion

log = logging.getLogger("attnseg.worker")


@dataclass
class Runtime:
    settings: Settings
    sd: StableDiffusion

    def describe(self) -> dict:
        return self.sd.describe()


_runtime: Runtime | None = None


def load_runtime(settings: Settings) -> Runtime:
    log.info("loading %s on %s (%s)", settings.sd_model, settings.device, settings.dtype)
    sd = load_stable_diffusion(settings.sd_model, device=settings.device, dtype=settings.dtype,
                               cache_dir=settings.cache_dir)
    return Runtime(settings=settings, sd=sd)


def install(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


def current() -> Runtime:
    if _runtime is None:
        raise RuntimeError("no models are loaded in this process: jobs run inside `attnseg worker`")
    return _runtime
