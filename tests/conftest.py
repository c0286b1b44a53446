"""Shared fixtures. Heavy imports (torch, diffusers) stay inside the fixtures: the API tests run
without them."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """The tiny random SD pipeline (real SD 1.x topology, tiny widths), built once per session."""
    from workers.tiny_random import build_tiny_random

    return build_tiny_random(tmp_path_factory.mktemp("models") / "tiny-random")


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_dir):
    """tiny_sd_dir loaded like real weights, on CPU in fp32. Shared: do not modify its weights."""
    from workers.models import load_stable_diffusion

    return load_stable_diffusion(str(tiny_sd_dir), device="cpu", dtype="float32")
