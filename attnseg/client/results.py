"""Job states and results as objects; masks are decoded from COCO RLE only when asked for."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

import numpy as np

from attnseg import rle
from attnseg.client.inputs import StoredPicture

FINAL_STATUSES = ("succeeded", "failed", "canceled")


@dataclass(frozen=True)
class Progress:
    """`stage` and `fraction` (0..1); one-shot training adds `epoch`, `epochs`, `loss` and `best_iou`,
    concept training `step`, `steps` and `loss`."""

    stage: str
    fraction: float
    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None
    steps: int | None = None
    loss: float | None = None
    best_iou: float | None = None

    @classmethod
    def from_api(cls, body: dict) -> Progress:
        return cls(
            stage=body["stage"],
            fraction=body["fraction"],
            **{name: body.get(name) for name in ("epoch", "epochs", "step", "steps", "loss", "best_iou")},
        )


@dataclass(frozen=True)
class Segment:
    id: int
    label: str | None
    label_id: int | None
    score: float | None
    area: int
    bbox: tuple[int, int, int, int]  # x, y, width, height
    rle: dict  # {"size": [H, W], "counts": str}, COCO compressed RLE

    @cached_property
    def mask(self) -> np.ndarray:
        """(H, W) bool at the picture's size, decoded on first access."""
        return rle.decode(self.rle)

    @classmethod
    def from_api(cls, body: dict) -> Segment:
        return cls(
            id=body["id"],
            label=body.get("label"),
            label_id=body.get("label_id"),
            score=body.get("score"),
            area=body["area"],
            bbox=tuple(body["bbox"]),
            rle=body["segmentation"],
        )


@dataclass(frozen=True)
class Result:
    """A segmentation: the picture's id and size, its segments, and (text, one-shot) `labels` by label_id."""

    image_id: str | None  # None from a server older than picture reuse
    width: int
    height: int
    segments: list[Segment]
    labels: list[str] | None
    random_weights: bool
    timings_ms: dict[str, float]
    raw: dict = field(repr=False)  # the API's JSON, as received

    @classmethod
    def from_api(cls, body: dict) -> Result:
        return cls(
            image_id=body["image"].get("id"),
            width=body["image"]["width"],
            height=body["image"]["height"],
            segments=[Segment.from_api(s) for s in body["segments"]],
            labels=body.get("labels"),
            random_weights=body.get("random_weights", False),
            timings_ms=body.get("timings_ms", {}),
            raw=body,
        )

    @property
    def picture(self) -> StoredPicture:
        """This result's picture, to ask about it again without sending it:
        `client.segment_text(result.picture, ["dog"])`."""
        if self.image_id is None:
            raise ValueError("this server's results do not name their picture; send the picture again")
        return StoredPicture(self.image_id)

    def label_map(self) -> np.ndarray:
        """(H, W) int32: each pixel's `label_id` (text, one-shot, referring: 0 is background), or its segment
        `id` when segments have no label_id (unsupervised); 0 where no segment covers the pixel. The
        unlabelled instances of a referring result follow the labels: len(labels), len(labels) + 1, ..."""
        out = np.zeros((self.height, self.width), np.int32)
        unlabelled = 0
        for segment in self.segments:
            if segment.label_id is not None:
                out[segment.mask] = segment.label_id
            elif self.labels is None:
                out[segment.mask] = segment.id
            else:
                out[segment.mask] = len(self.labels) + unlabelled
                unlabelled += 1
        return out


def parse_time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


@dataclass(frozen=True)
class JobState:
    """One reading of `GET /jobs/{id}`."""

    id: str
    kind: str
    status: str
    progress: Progress
    model_id: str | None
    concept_id: str | None
    params: dict[str, Any]
    error: dict | None  # {"code", "message"} when failed or canceled
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None
    raw: dict = field(repr=False)

    @property
    def done(self) -> bool:
        return self.status in FINAL_STATUSES

    @classmethod
    def from_api(cls, body: dict) -> JobState:
        return cls(
            id=body["id"],
            kind=body["kind"],
            status=body["status"],
            progress=Progress.from_api(body["progress"]),
            model_id=body.get("model_id"),
            concept_id=body.get("concept_id"),
            params=body.get("params") or {},
            error=body.get("error"),
            **{name: parse_time(body.get(name)) for name in ("created_at", "started_at", "finished_at", "expires_at")},
            raw=body,
        )


@dataclass(frozen=True)
class ModelState:
    """One reading of `GET /oneshot/{id}`."""

    id: str
    name: str  # as given at training, else the part names
    description: str | None
    status: str  # training | ready | failed
    labels: list[str]  # by label_id; 0 is background
    metrics: dict[str, Any]
    train_job_id: str
    error: dict | None
    raw: dict = field(repr=False)

    @classmethod
    def from_api(cls, body: dict) -> ModelState:
        return cls(
            id=body["id"],
            name=body.get("name") or ", ".join(body["labels"][1:]),
            description=body.get("description"),
            status=body["status"],
            labels=body["labels"],
            metrics=body.get("metrics") or {},
            train_job_id=body["train_job_id"],
            error=body.get("error"),
            raw=body,
        )


@dataclass(frozen=True)
class ConceptState:
    """One reading of `GET /concepts/{id}`."""

    id: str
    name: str  # as given at training or import, else the identifier
    description: str | None
    identifier: str
    class_word: str
    status: str  # training | importing | ready | failed
    method: str | None  # custom_diffusion | textual_inversion
    files: list[str]  # diffusers files, once ready
    metrics: dict[str, Any]
    job_id: str  # the training or import job
    error: dict | None
    raw: dict = field(repr=False)

    @classmethod
    def from_api(cls, body: dict) -> ConceptState:
        return cls(
            id=body["id"],
            name=body.get("name") or body["identifier"],
            description=body.get("description"),
            identifier=body["identifier"],
            class_word=body["class_word"],
            status=body["status"],
            method=body.get("method"),
            files=body.get("files") or [],
            metrics=body.get("metrics") or {},
            job_id=body["job_id"],
            error=body.get("error"),
            raw=body,
        )


def segmentation_result(state: JobState) -> Result:
    """A succeeded segmentation job's `Result`; a training job's product is its model or concept, not a Result."""
    if state.kind == "oneshot_train":
        raise TypeError(f"job {state.id} trains model {state.model_id}: use client.oneshot_model(...) for it")
    if state.kind in ("concept_train", "concept_import"):
        raise TypeError(f"job {state.id} makes concept {state.concept_id}: use client.concept(...) for it")
    return Result.from_api(state.raw["result"])


class StateView:
    """A handle on something the API keeps (a job, a model, a concept): the last state read of it."""

    state: JobState | ModelState | ConceptState

    @property
    def id(self) -> str:
        return self.state.id

    @property
    def status(self) -> str:
        return self.state.status


class JobView(StateView):
    """What the sync `Job` and the `AsyncJob` handles share: the last state read from the API."""

    state: JobState

    def _observe(self, state: JobState) -> None:
        self.state = state

    @property
    def progress(self) -> Progress:
        return self.state.progress

    @property
    def done(self) -> bool:
        return self.state.done

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.state.id} {self.state.kind} {self.state.status}>"


class ModelView(StateView):
    """What the sync `OneshotModel` and `AsyncOneshotModel` share: the last model state read."""

    state: ModelState

    @property
    def labels(self) -> list[str]:
        return self.state.labels

    @property
    def metrics(self) -> dict[str, Any]:
        return self.state.metrics

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.state.id} {self.state.status} {self.state.labels}>"


class ConceptView(StateView):
    """What the sync `Concept` and `AsyncConcept` share: the last concept state read."""

    state: ConceptState

    @property
    def query(self) -> str:
        """How queries and class names refer to it: `"<my-mug> mug"`."""
        return f"<{self.state.identifier}> {self.state.class_word}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.state.id} {self.query!r} {self.state.status}>"
