"""One typed settings object, read from `ATTNSEG_*` environment variables (and a `.env` file)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ATTNSEG_", env_file=".env", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"

    # Models. `tiny-random` builds a tiny SD (and CLIP) of the real topology with random weights.
    sd_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    clip_model: str = "ViT-B-16-quickgelu"  # "none": no CLIP, the gem methods are refused
    clip_pretrained: str = "metaclip_400m"
    device: str = "auto"
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "attnseg")

    # Uploads.
    max_upload_bytes: int = Field(25 * MiB, gt=0, description="Whole request body, all files together.")
    max_image_pixels: int = Field(40_000_000, gt=0, description="Width x height of one decoded image.")
    image_ttl_s: int = Field(6 * 3600, gt=0, description="How long an uploaded image stays in Redis.")

    # Jobs.
    result_ttl_s: int = Field(24 * 3600, gt=0, description="How long a finished job and its result are kept.")
    queued_ttl_s: int = Field(3600, gt=0, description="A job still queued after this is dropped.")
    max_queued_jobs: int = Field(200, gt=0, description="Per queue; beyond it new jobs get 429.")
    max_queued_per_tenant: int | None = Field(
        None, gt=0, description="Queued jobs one tenant may have (all queues); beyond it 429. Unset: no limit."
    )
    segment_timeout_s: int = Field(600, gt=0)
    train_timeout_s: int = Field(4 * 3600, gt=0)

    # Workers.
    worker_heartbeat_s: int = Field(10, gt=0, description="How often a worker says it is alive.")
    worker_lost_after_s: int = Field(60, gt=0, description="Silence after which a running job is failed.")
    warmup: bool = True
    max_batch: int | None = Field(
        None,
        gt=0,
        description="Queued jobs a worker runs as one model pass when they can share it; unset: 8 on a GPU, 1 on CPU.",
    )
    prefetch_mb: int = Field(
        256,
        ge=0,
        description="Decoded pictures of queued jobs a worker holds ahead of the model, in MiB (0: no look-ahead).",
    )
    latent_cache_mib: int = Field(
        256,
        ge=0,
        description="VAE latents of recent pictures a worker keeps, in MiB, so a second query on a picture "
        "skips its decode and VAE encode (0: none kept).",
    )
    workers_per_host: int = Field(1, gt=0, description="Worker processes sharing this host's CPUs.")
    torch_threads: int | None = Field(
        None,
        gt=0,
        description="CPU threads per worker (torch.set_num_threads); "
        "unset: OMP_NUM_THREADS if set, else the host's CPUs "
        "divided by workers_per_host (oversubscribed workers "
        "slow down 2-20x).",
    )

    @model_validator(mode="after")
    def _default_torch_threads(self) -> Settings:
        if self.torch_threads is None:
            omp = os.environ.get("OMP_NUM_THREADS", "")
            self.torch_threads = (
                int(omp) if omp.isdigit() and int(omp) > 0 else max(1, usable_cpus() // self.workers_per_host)
            )
        return self

    # API.
    overlay_max_side: int = Field(
        2048, ge=16, description="Longest side of an overlay drawing; larger pictures are drawn reduced."
    )
    overlay_concurrency: int = Field(
        2, gt=0, description="Overlays drawn at once per API process; beyond it 429 with Retry-After."
    )
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_key: str | None = Field(
        None, description="When set, requests need `Authorization: Bearer <key>`; its holder is tenant `default`."
    )
    api_keys: str | None = Field(None, description="Comma-separated `tenant:key` pairs.")
    api_keys_file: Path | None = Field(None, description="One `tenant:key` a line; re-read when it changes.")
    admin_keys: str | None = Field(
        None,
        description="Comma-separated operator keys: they alone open `/metrics` and `/readyz` details once any "
        "key is configured; they are not tenants' keys (the job and model routes refuse them).",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated exact origins browsers may call the API from."
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value


def usable_cpus() -> int:
    """CPUs this process may run on (a container's or taskset's limit, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@lru_cache
def get_settings() -> Settings:
    return Settings()
