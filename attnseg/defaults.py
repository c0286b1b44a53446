"""The default of every method parameter, written once.

The API's request schemas (service/schemas.py) and the workers' Python API (workers/methods) both
read these, so a request that leaves a parameter out and a direct call that leaves it out get the
same value. Plain values only: the service imports this without torch. What each parameter means,
and where a value comes from, is in docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass

RESOLUTION = 512  # working resolution of every SD method (the picture is resized to it)
SEED = 0  # the Python API's seed; the HTTP API draws a fresh one per request


@dataclass(frozen=True)
class DiffSegDefaults:
    """DiffSeg (docs/methods.md 1)."""

    kl_threshold: float = 1.0  # tau, for images in the wild (1.1 COCO-Stuff-27, 0.9 Cityscapes)
    grid: int = 16  # anchors per side, M
    iterations: int = 3  # merging iterations, N
    timestep: int = 300
    refine: bool = False


@dataclass(frozen=True)
class TextDefaults:
    """Text segmentation (docs/methods.md 2.2, 2.3); the thresholds are selfcross's VOC values."""

    method: str = "selfcross"
    background: bool = True
    samples: int = 1
    gate_threshold: float = 0.2
    background_threshold: float = 0.5


# Each text method's timestep when the request gives none; gem has no SD pass.
TEXT_TIMESTEPS = {"selfcross": 150, "gem": None, "gem_refined": 100, "cluster": 100}


@dataclass(frozen=True)
class OneshotDefaults:
    """SLiMe one-shot training and segmentation (docs/methods.md 3)."""

    epochs: int = 200
    learning_rate: float = 0.1
    min_crop: float = 0.7
    crops_per_side: int = 1


@dataclass(frozen=True)
class ConceptDefaults:
    """Concept training (docs/methods.md 2.4); steps, learning rate and batch size follow the recipe."""

    train_kv: bool = True
    num_vectors: int = 1


@dataclass(frozen=True)
class ReferringDefaults:
    """Referring segmentation (docs/methods.md 2.4)."""

    max_instances: int = 8
    max_queries: int = 8
    timestep: int = TEXT_TIMESTEPS["selfcross"]  # every pass is a selfcross pass


DIFFSEG = DiffSegDefaults()
TEXT = TextDefaults()
ONESHOT = OneshotDefaults()
CONCEPT = ConceptDefaults()
REFERRING = ReferringDefaults()
