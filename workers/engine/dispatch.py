"""The worker's dispatch, built from the one table of job kinds (attnseg.queue.KINDS).

RQ calls a job's function by its dotted path; what else the worker does per kind (decode its picture
ahead, run queued jobs together) is looked up here by that same path.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from attnseg.queue import KINDS, JobKind
from workers.engine.batch import Batch


@dataclass(frozen=True)
class Handling:
    """How the worker treats jobs of one kind: `function(payload)` runs one; `picture_side(params)` is
    the working size its picture is decoded at ahead (None: fetched as it starts); `batch` (None:
    always alone) runs queued jobs of the kind together."""

    kind: JobKind
    function: Callable[[dict], dict]
    picture_side: Callable[[dict], int] | None
    batch: Batch | None


def resolve(path: str | None):
    """The object a dotted path names (ImportError or AttributeError if none); None for None."""
    if path is None:
        return None
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@functools.cache
def handlings() -> dict[str, Handling]:
    """Job function (dotted path) -> its handling; imported on first use (the job modules import torch)."""
    return {
        kind.func: Handling(kind, resolve(kind.func), resolve(kind.picture_side), resolve(kind.batch))
        for kind in KINDS.values()
    }


def batch_of(function: str) -> Batch | None:
    """The batch runner of jobs of `function` (dotted path); None for a job that always runs alone."""
    handling = handlings().get(function)
    return handling.batch if handling else None


def picture_side(function: str, params: dict) -> int | None:
    """The working size of a job of `function` (dotted path); None for one without a picture to decode ahead."""
    handling = handlings().get(function)
    side = handling.picture_side if handling else None
    return side(params) if side is not None else None


def queues_with_pictures() -> set[str]:
    """The queues holding jobs whose pictures are decoded ahead."""
    return {kind.queue for kind in KINDS.values() if kind.picture_side is not None}
