"""A stand-in for DiffSeg's model pass, for bench_service only: never on the service's code path.

It takes a set wall time per batch (`FIXED+PER_IMAGE` ms, e.g. "8+1": 8 ms + 1 ms per image) asleep,
so the CPU stays free as it would while a GPU works, and returns attention of the real shapes: the
first call per (resolution, timestep, vocabulary) runs the real pass on one image and keeps its
head-mean maps, later batches see those maps (views, no copy) in every row. Everything after the
pass (DiffSeg's per-image steps, labels, RLE, saving, notify) is the service's real code; with a
third figure ("8+1+2") DiffSeg's per-image aggregation and merging count as GPU time too (2 ms per
image, asleep), as they run on the GPU in a GPU worker, so the CPU path around the GPU is measured.

The seconds it spent asleep are added to a Redis key, so the benchmark can report its busy share.
"""

from __future__ import annotations

import time

import redis

from workers.methods import unsupervised
from workers.models.attention import KINDS, AttentionStore

BUSY_KEY = "attnseg:bench:emulated-gpu-busy-s"


def parse_cost(text: str) -> tuple[float, float, float | None]:
    """ "8+1" -> (0.008, 0.001, None): seconds per batch and per image; "8+1+2" also emulates
    DiffSeg's per-image merging on the GPU at 2 ms per image (None: it runs for real)."""
    fixed, per_image, *steps = (float(v) / 1000 for v in text.split("+"))
    return fixed, per_image, steps[0] if steps else None


class SharedMaps(AttentionStore):
    """An AttentionStore whose every row is the same recorded maps: (B, Q, K) expanded views."""

    def __init__(self, means: dict[tuple[str, int], object], rows: int):
        super().__init__()
        self.means, self.rows = means, rows

    def mean(self, kind: str, grid: int):
        return self.means[(kind, grid)].expand(self.rows, -1, -1)

    def grids(self, kind: str) -> list[int]:
        return sorted(grid for stored_kind, grid in self.means if stored_kind == kind)


class EmulatedSteps:
    """workers.methods.diffseg as segment_row sees it, with aggregation and merging done once per
    recorded maps and then taken as GPU time (asleep): every row holds the same maps, so the same
    proposals. What follows them (labels at picture size, RLE, saving) stays real."""

    def __init__(self, real, step_s: float, connection):
        self.real, self.step_s, self.connection = real, step_s, connection
        self.done: dict[int, object] = {}

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    def aggregate(self, by_grid: dict):
        key = tuple((maps.data_ptr(), tuple(maps.shape)) for maps in by_grid.values())  # the maps behind the views
        if key not in self.done:  # kept with their input, so no later tensor can reuse the address
            self.done[key] = (self.real.aggregate(by_grid), list(by_grid.values()))
        return self.done[key][0]

    def proposals(self, attn, **options):
        key = (id(attn), tuple(sorted(options.items())))
        if key not in self.done:
            self.done[key] = self.real.proposals(attn, **options)
        time.sleep(self.step_s)
        self.connection.incrbyfloat(BUSY_KEY, self.step_s)
        return self.done[key]


class EmulatedPass:
    """Called as `attention_pass(sd, images, *, timestep, resolution, vocabulary, report)`."""

    def __init__(self, cost: str, redis_url: str):
        self.fixed_s, self.per_image_s, _ = parse_cost(cost)
        self.connection = redis.Redis.from_url(redis_url)
        self.recorded: dict[tuple, tuple[dict, object]] = {}

    def maps_for(self, sd, image, timestep: int, resolution: int, vocabulary) -> tuple[dict, object]:
        """Head-mean maps {(kind, grid): (1, Q, K)} and the prompt, recorded once per key."""
        key = (resolution, timestep, tuple(vocabulary or ()))
        if key not in self.recorded:  # the real pass on the CPU, once, not counted as GPU time
            real = unsupervised.attention_pass(
                sd, [image], timestep=timestep, resolution=resolution, vocabulary=vocabulary
            )
            means = {(k, g): real.store.mean(k, g)[:1] for k in KINDS for g in real.store.grids(k)}
            self.recorded[key] = (means, real.prompt)
        return self.recorded[key]

    def __call__(self, sd, images, *, timestep=300, resolution=512, vocabulary=None, report=None):
        means, prompt = self.maps_for(sd, images[0], timestep, resolution, vocabulary)
        wall_s = self.fixed_s + self.per_image_s * len(images)
        time.sleep(wall_s)
        self.connection.incrbyfloat(BUSY_KEY, wall_s)
        return unsupervised.SharedPass(
            SharedMaps(means, len(images)), resolution, prompt, vocabulary, {"unet": 1000 * wall_s}
        )


def install(cost: str, redis_url: str) -> None:
    """Replace the model pass of batched DiffSeg jobs in this process (the bench worker's only)."""
    from workers.engine import jobs

    jobs.attention_pass = EmulatedPass(cost, redis_url)
    step_s = parse_cost(cost)[2]
    if step_s is not None:
        unsupervised.diffseg = EmulatedSteps(unsupervised.diffseg, step_s, redis.Redis.from_url(redis_url))
