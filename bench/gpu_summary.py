"""The figures of one `bench/gpu_check.sh` run, from the JSON reports and nvidia-smi samples it left.

python bench/gpu_summary.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(directory: Path, name: str) -> dict | None:
    path = directory / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def batch_lines(report: dict | None, label: str) -> list[str]:
    if not report:
        return [f"{label}: no report"]
    lines = [f"{label} ({report['settings']['model']}, {report['machine']['gpu']})"]
    for row in report.get("batches") or []:
        lines.append(
            f"  batch {row['batch']}: {row['images/s best']:.1f} images/s best, {row['images/s median']:.1f} median,"
            f" peak {row['peak MiB']:.0f} MiB"
        )
    return lines


def oneshot_lines(report: dict | None) -> list[str]:
    if not report:
        return ["one-shot: no report"]
    return [
        f"one-shot: {row['row']}: p50 {row['p50 ms']:.0f} ms, peak {row['peak MiB']:.0f} MiB" for row in report["rows"]
    ]


def service_lines(report: dict | None, samples: Path) -> list[str]:
    if not report:
        return ["service: no report"]
    lines = [f"service ({report['settings']['model']}, resolution {report['settings']['resolution']})"]
    for phase in report["phases"]:
        e2e = phase["stats"].get("e2e", {})
        busy = phase.get("model_busy")
        lines.append(
            f"  {phase['name']}: {phase['jobs_per_s']:.1f} jobs/s, p50 {e2e.get('p50', 0):.0f} ms, "
            f"p99 {e2e.get('p99', 0):.0f} ms, model busy {'-' if busy is None else f'{100 * busy:.0f}%'}"
        )
    rows = (
        [line.split(",") for line in samples.read_text().splitlines() if line.count(",") == 1]
        if samples.exists()
        else []
    )
    used = [(float(u), float(m)) for u, m in rows if u.strip().isdigit()]
    if used:
        active = [u for u, _ in used if u > 0]
        lines.append(
            f"  nvidia-smi over the service step: utilisation mean {sum(active) / max(1, len(active)):.0f}% while "
            f"active, peak memory {max(m for _, m in used):.0f} MiB"
        )
    return lines


def main(directory: str) -> None:
    out = Path(directory)
    lines = batch_lines(load(out, "diffseg"), "DiffSeg") + batch_lines(load(out, "text"), "selfcross")
    lines += oneshot_lines(load(out, "oneshot")) + service_lines(load(out, "service"), out / "nvidia-smi.csv")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1])
