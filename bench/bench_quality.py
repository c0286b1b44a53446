"""The quality table of issue 14: `attnseg evaluate synthetic` against a private stack (its own
redis-server, the API and one tiny-colour worker on 127.0.0.1), with the machine header.

    python -m bench.bench_quality                                   # 100 scenes, ~15-30 min on 2 shared cores
    python -m bench.bench_quality --scenes 10 --methods unsupervised selfcross
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from attnseg.client import Client
from bench.common import machine_info, print_header
from tests.support import Stack
from workers.evaluation.quality import METHODS, evaluate_synthetic, table
from workers.evaluation.synthetic import SIZE_RANGE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=60, help="one-shot training epochs")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--sizes", type=float, nargs=2, default=SIZE_RANGE, help="object sizes / shorter side")
    parser.add_argument("--json", help="write the scores and the machine header here")
    args = parser.parse_args()
    info = machine_info()
    print_header("quality on synthetic scenes through the API (tiny-colour)", info)
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        stack = Stack(Path(directory), model="tiny-colour").start_ready()
        print(f"stack ready in {time.perf_counter() - started:.0f} s")
        try:
            with Client(stack.base_url, timeout=300) as client:
                result = evaluate_synthetic(
                    client,
                    args.scenes,
                    seed=args.seed,
                    height=args.height,
                    width=args.width,
                    resolution=args.resolution,
                    epochs=args.epochs,
                    methods=args.methods,
                    sizes=tuple(args.sizes),
                )
        finally:
            stack.stop()
    print(table(result))
    print(f"load average after: {Path('/proc/loadavg').read_text().split()[:3]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, **result}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
