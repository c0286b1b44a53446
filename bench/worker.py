"""bench_service's worker: `cli worker`, with the model pass replaced by the emulated GPU
(bench/emulated_gpu.py) when ATTNSEG_BENCH_GPU_MS is set (e.g. "8+1")."""

from __future__ import annotations

import os

from attnseg.settings import get_settings
from bench import emulated_gpu
from cli.main import main

if __name__ == "__main__":
    cost = os.environ.get("ATTNSEG_BENCH_GPU_MS")
    if cost:
        emulated_gpu.install(cost, get_settings().redis_url)
    main(["worker"])
