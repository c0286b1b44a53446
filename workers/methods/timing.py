"""Per-stage wall-clock timings of a method, reported in the job result as `timings_ms`."""

from __future__ import annotations

import time

import torch


class Timer:
    """Accumulates stage times in ms. On CUDA it waits for queued kernels first, or a stage's time
    would be charged to whichever later stage happens to synchronise."""

    def __init__(self):
        self.ms: dict[str, float] = {}

    def __call__(self, name: str, started: float) -> float:
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.ms[name] = round(self.ms.get(name, 0.0) + (now - started) * 1000, 1)
        return now
