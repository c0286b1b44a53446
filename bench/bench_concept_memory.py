"""Worker peak memory reading a hostile concept file: a DEFLATE zip bomb in torch `.bin` form.

The file is issue 16's: `torch.save({"<x>": zeros(1, 2**28)})` (1 GiB of float32) rewritten with a
DEFLATE-compressed storage member, ~5 MB on disk. Each checkout is measured in its own process
(`Concept.from_files`, what the import job runs): the peak resident set above the one before the
call (VmHWM after a reset through /proc/self/clear_refs), the outcome and the seconds. Building the
file takes ~10 s and 2 GiB once.

    python -m bench.bench_concept_memory --other-root /path/to/a/checkout/from/before
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from bench.common import MIB, ROOT, machine_info, print_header, print_table
from tests.support import deflate_bomb

ELEMENTS = 2**28
MEASURE = """
import json, sys, time
from pathlib import Path
from workers.models.concept import Concept

def status_kib(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1])

data = open(sys.argv[1], "rb").read()
Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (ru_maxrss would keep the parent's peak)
before = status_kib("VmRSS")
started = time.perf_counter()
try:
    Concept.from_files({"learned_embeds.safetensors": data}, "x", "mug")
    outcome = "read"
except Exception as exc:
    outcome = f"{type(exc).__name__}: {str(exc)[:70]}"
seconds = time.perf_counter() - started
print(json.dumps({"peak_kib": status_kib("VmHWM") - before, "seconds": seconds, "outcome": outcome}))
"""


def bomb() -> bytes:
    """zeros(1, 2**28)'s torch file with its 1 GiB storage member DEFLATE-compressed."""
    buffer = io.BytesIO()
    torch.save({"<x>": torch.zeros(1, ELEMENTS)}, buffer)
    archive = zipfile.ZipFile(buffer)
    members = tuple((name, archive.read(name)) for name in archive.namelist() if name != "archive/data/0")
    del archive, buffer
    return deflate_bomb(members, 4 * ELEMENTS)


def measure(root: Path, path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)],
        cwd=root,
        env={"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other-root", type=Path, help="a second checkout to measure (before/after)")
    args = parser.parse_args()
    print_header("Worker peak memory reading a concept zip bomb", machine_info())
    data = bomb()
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "bomb.bin"
        path.write_bytes(data)
        for root in [ROOT, args.other_root] if args.other_root else [ROOT]:
            result = measure(root, path)
            rows.append(
                {
                    "checkout": str(root),
                    "file MiB": len(data) / MIB,
                    "peak MiB": result["peak_kib"] / 1024,
                    "seconds": result["seconds"],
                    "outcome": result["outcome"],
                }
            )
    print_table(rows, ["checkout", "file MiB", "peak MiB", "seconds", "outcome"])


if __name__ == "__main__":
    main()
