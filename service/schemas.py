"""Pydantic models at the HTTP edge: request parameters, the job object, results, errors."""

from __future__ import annotations

import re
import secrets
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_serializer,
    model_validator,
)

from attnseg.concept_files import identifiers_in
from attnseg.defaults import CONCEPT, DIFFSEG, ONESHOT, REFERRING, RESOLUTION, TEXT, TEXT_TIMESTEPS
from attnseg.queue import KINDS

MAX_WORDS = 32
MAX_OFFSET = 1_000_000  # paging: beyond any real listing, far below what Redis indexes overflow at
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")  # job and model ids (RQ's alphabet); anything else is unknown
QUERY_INTEGER = re.compile(r"-?[0-9]{1,20}")


def valid_id(value: str) -> bool:
    return ID_PATTERN.fullmatch(value) is not None


def digits_only(value: Any) -> Any:
    """A query integer as written: digits only (pydantic alone would read "+0.0" or "1_0" as numbers)."""
    if isinstance(value, str) and not QUERY_INTEGER.fullmatch(value):
        raise ValueError("must be an integer written in digits")
    return value


DIGITS_ONLY = BeforeValidator(digits_only)  # in a query integer's Annotated[int, Query(), Field(...), DIGITS_ONLY]


def shown_id(value: str) -> str:
    """An id as echoed in a message: never more than 64 characters of whatever the client sent."""
    return value if len(value) <= 64 else value[:61] + "..."


def no_separators(word: str) -> str:
    if "," in word or "." in word:
        raise ValueError(f"{word!r} contains ',' or '.', which separate words in the prompt")
    return word


# Checked one by one, so that every bad entry of a list is reported, not the first alone.
Word = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64), AfterValidator(no_separators)
]


# The API has no tokenizer (it never loads the text model): it refuses prompts that surely cannot fit
# the text encoder's 77 tokens by a lower bound on their tokens. CLIP's BPE pre-splits text into
# letter runs, single digits and punctuation runs, and every piece is at least one token; anything
# that passes this bound but still does not fit is failed by the worker as `prompt_too_long`.
PROMPT_TOKENS = 77
PROMPT_FIXED_TOKENS = 6  # start, "a photo including" (3), ".", end
CLIP_PIECE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)


def min_tokens(text: str) -> int:
    """A lower bound on the CLIP BPE tokens of `text` (its pre-tokenizer pieces)."""
    return len(CLIP_PIECE.findall(text.lower()))


def check_prompt_fits(field: str, items: list[str], background_words: list[str] = ()) -> None:
    """Refuse items that cannot share one prompt "a photo including a, b, and c." (ValueError names the limit)."""
    words = [*items, *background_words]
    needed = PROMPT_FIXED_TOKENS + sum(min_tokens(word) for word in words) + len(words) - 1 + bool(background_words)
    if needed > PROMPT_TOKENS:
        raise ValueError(
            f"{field}: the prompt would need at least {needed} tokens but the text encoder holds "
            f"{PROMPT_TOKENS} (each word costs at least one token per word or punctuation run, plus "
            "one for its separator); use fewer or shorter words"
        )


def new_seed() -> int:
    return secrets.randbelow(2**31)


def unique_words(words: list[str], field: str) -> list[str]:
    seen: set[str] = set()
    for word in words:
        if word.lower() in seen:
            raise ValueError(f"{field}: {word!r} is given twice")
        seen.add(word.lower())
    return words


class Params(BaseModel):
    # Unknown fields are an error: a typo must not silently fall back to a default. Strict types: an
    # integer field takes integers only (not true, not 16.0), as the OpenAPI document says.
    model_config = ConfigDict(extra="forbid", strict=True)

    seed: int = Field(
        default_factory=new_seed,
        ge=0,
        lt=2**31,
        description="Seeds every random draw; the same seed gives the same masks.",
    )
    resolution: int = Field(
        RESOLUTION,
        ge=256,
        le=1024,
        multiple_of=64,
        description="Working resolution (the image is resized to it, aspect not kept).",
    )


class UnsupervisedParams(Params):
    kl_threshold: float = Field(
        DIFFSEG.kl_threshold, gt=0, le=10, description="tau: merge maps closer than this (symmetric KL)."
    )
    grid: int = Field(DIFFSEG.grid, ge=2, le=64, description="Anchors per side (M).")
    iterations: int = Field(DIFFSEG.iterations, ge=1, le=10, description="Merging iterations, the first included.")
    timestep: int = Field(DIFFSEG.timestep, ge=1, le=999, description="Diffusion timestep of the single UNet pass.")
    refine: bool = Field(DIFFSEG.refine, description="K-means refinement of the merged proposals.")
    vocabulary: list[Word] | None = Field(
        None, max_length=MAX_WORDS, description="Words to name the segments (cross-attention)."
    )

    @field_validator("vocabulary")
    @classmethod
    def _vocabulary(cls, value):
        if not value:
            return None
        check_prompt_fits("vocabulary", value)
        return unique_words(value, "vocabulary")

    @field_validator("grid")
    @classmethod
    def _grid_fits(cls, value, info):
        resolution = info.data.get("resolution", 512)
        if value > resolution // 8:
            raise ValueError(f"grid {value} exceeds the latent side {resolution // 8} at resolution {resolution}")
        return value


SELFCROSS_ONLY = ("background_words", "samples", "gate_threshold", "background_threshold")
MAX_CLASSES = 32


class TextParams(Params):
    classes: list[Word] = Field(
        min_length=1, max_length=MAX_CLASSES, description="Class names to find, 1 to 32, each up to 64 characters."
    )
    method: Literal["selfcross", "gem", "gem_refined", "cluster"] = Field(
        TEXT.method,
        description="selfcross: From Text to Mask (SD cross x self attention); gem: dense CLIP; "
        "gem_refined: GEM propagated by SD self-attention; cluster: DiffSeg segments "
        "named by GEM.",
    )
    background: bool = Field(
        TEXT.background, description="Add a background class (label_id 0) where no class is strong."
    )
    background_words: list[Word] | None = Field(
        None, max_length=8, description="selfcross: extra words in the prompt that absorb attention (never reported)."
    )
    samples: int = Field(TEXT.samples, ge=1, le=10, description="selfcross: noise draws averaged (the paper uses 10).")
    timestep: int | None = Field(
        None, ge=1, le=999, description="Default per method: selfcross 150, gem_refined and cluster 100; gem uses none."
    )
    gate_threshold: float | None = Field(
        TEXT.gate_threshold,
        ge=0,
        lt=1,
        description="selfcross: box gate level on the "
        "quantised class map (VOC 0.2, COCO 0.5); null turns the gate off.",
    )
    background_threshold: float = Field(
        TEXT.background_threshold,
        gt=0,
        le=1,
        description="selfcross: thr of the background "
        "(2 * thr - max)^2 (VOC 0.5, COCO 0.35); lower gives less background.",
    )

    @field_validator("classes")
    @classmethod
    def _classes(cls, value):
        return unique_words(value, "classes")

    @field_validator("background_words")
    @classmethod
    def _background_words(cls, value, info):
        if not value:
            return None
        unique_words(value, "background_words")
        classes = {c.lower() for c in info.data.get("classes") or []}
        clash = [word for word in value if word.lower() in classes]
        if clash:
            raise ValueError(f"background_words repeat classes: {clash}")
        return value

    @model_validator(mode="after")
    def _each_class_fits(self):
        # selfcross splits the classes over as many prompts as needed; each must fit with the background words.
        if self.method == "selfcross":
            for name in self.classes:
                check_prompt_fits("classes", [name], self.background_words or [])
        return self

    @model_validator(mode="after")
    def _method_timestep(self):
        if self.timestep is None:
            self.timestep = TEXT_TIMESTEPS[self.method]
        return self

    def foreign_fields(self) -> tuple[str, ...]:
        """The fields the chosen method does not read (gem has no SD pass, so no timestep either)."""
        if self.method == "selfcross":
            return ()
        return (*SELFCROSS_ONLY, "timestep") if self.method == "gem" else SELFCROSS_ONLY

    @model_validator(mode="after")
    def _only_own_fields(self):
        # A value the method would ignore is refused rather than silently dropped.
        given = [
            name for name in self.foreign_fields() if name in self.model_fields_set and getattr(self, name) is not None
        ]
        if given:
            only = " (selfcross only)" if given[0] in SELFCROSS_ONLY else ""
            raise ValueError(f"{given[0]}: not used by method {self.method!r}{only}")
        return self

    @model_serializer(mode="wrap")
    def _echo_own_fields(self, handler):
        """The job echoes the parameters its method reads, no others."""
        return {name: value for name, value in handler(self).items() if name not in self.foreign_fields()}


Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
Description = Annotated[str, StringConstraints(strip_whitespace=True, max_length=500)]


class Naming(BaseModel):
    """What people call a trained model or concept in listings (never in prompts: any text goes)."""

    name: Name | None = Field(
        None, description="Shown wherever it is listed; default: the part names (one-shot), the identifier (concepts)."
    )
    description: Description | None = Field(None, description="A longer note, up to 500 characters.")


MAX_PARTS = 31  # one prompt token per class ("part " * K) leaves room in 77 positions; 31 is plenty


class TrainParams(Params, Naming):
    labels: list[Word] = Field(
        min_length=1, max_length=MAX_PARTS, description="Part names for mask values 1..K-1 (0 is background)."
    )
    epochs: int = Field(ONESHOT.epochs, ge=1, le=2000)
    learning_rate: float = Field(ONESHOT.learning_rate, gt=0, le=10)
    crops_per_side: Literal[1, 2] = Field(
        ONESHOT.crops_per_side,
        description="Default for segmenting with this model: 1 for whole "
        "objects, 2 (400 px crops) for faces and fine parts.",
    )
    min_crop: float = Field(ONESHOT.min_crop, ge=0.5, le=1.0, description="Smallest random crop side, as a fraction.")

    @field_validator("labels")
    @classmethod
    def _labels(cls, value):
        return unique_words(value, "labels")


class OneshotSegmentParams(Params):
    crops_per_side: Literal[1, 2] | None = Field(None, description="Default: the model's.")
    resolution: int | None = Field(
        None, ge=256, le=1024, multiple_of=64, description="Default: the resolution the model was trained at."
    )


class OneshotModel(BaseModel):
    id: str
    name: str = Field(description="As given at training, else the part names.")
    description: str | None = None
    status: Literal["training", "ready", "failed"]
    labels: list[str] = Field(description="label_id -> name; 0 is background.")
    sd_model: str | None = Field(description="The SD model the vectors belong to (set when training starts).")
    created_at: datetime
    params: dict[str, Any]
    metrics: dict[str, Any] = Field(description="train_iou (best seen), loss, epochs.")
    train_job_id: str
    progress: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class OneshotModelList(BaseModel):
    models: list[OneshotModel]
    total: int


IDENTIFIER_PATTERN = r"^[A-Za-z0-9-]{1,32}$"
Identifier = Annotated[str, StringConstraints(strip_whitespace=True, pattern=IDENTIFIER_PATTERN)]
ClassWord = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=32, pattern=r"^[^<>,.]+$")]
Query = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class ConceptTrainParams(Params, Naming):
    identifier: Identifier = Field(description="Letters, digits and '-'; written <identifier> in queries.")
    class_word: ClassWord = Field(description="The object's category ('mug'); the embedding starts from it.")
    train_kv: bool = Field(
        CONCEPT.train_kv,
        description="Custom Diffusion (embedding + to_k/to_v of the cross-attention "
        "layers); false: Textual Inversion (the embedding alone).",
    )
    steps: int | None = Field(
        None,
        ge=1,
        le=5000,
        description="Default: 250 (Custom Diffusion), 3000 (Textual Inversion), as their public recipes.",
    )
    learning_rate: float | None = Field(
        None, gt=0, le=1, description="Default: 2e-5 (Custom Diffusion), 2e-3 (Textual Inversion)."
    )
    batch_size: int | None = Field(
        None, ge=1, le=8, description="Default: 2 (Custom Diffusion), 4 (Textual Inversion)."
    )
    num_vectors: int = Field(CONCEPT.num_vectors, ge=1, le=16, description="Vectors of the identifier.")


class ConceptImportParams(Naming):
    model_config = ConfigDict(extra="forbid", strict=True)

    identifier: Identifier
    class_word: ClassWord


class ReferringParams(Params):
    class_word: ClassWord = Field(description="The category of the instances ('mug').")
    queries: list[Query] = Field(
        min_length=1,
        max_length=REFERRING.max_queries,
        description="1 to 8 texts, each with at most one <identifier> of a concept: '<my-mug> mug', 'a red mug'.",
    )
    max_instances: int = Field(
        REFERRING.max_instances, ge=1, le=16, description="Upper bound of the instances the clustering finds."
    )
    timestep: int = Field(REFERRING.timestep, ge=1, le=999)

    @field_validator("queries")
    @classmethod
    def _one_concept_per_query(cls, value):
        for query in value:
            if len(set(identifiers_in(query))) > 1:
                raise ValueError(f"queries: {query!r} names more than one concept; use one <identifier> per query")
        return value


class Concept(BaseModel):
    id: str
    name: str = Field(description="As given at training or import, else the identifier.")
    description: str | None = None
    identifier: str
    class_word: str
    method: Literal["custom_diffusion", "textual_inversion"] | None = Field(
        description="Set when training starts or the import is read."
    )
    status: Literal["training", "importing", "ready", "failed"]
    sd_model: str | None
    vectors: int | None = None
    files: list[str] = Field(description="Diffusers files, GET /concepts/{id}/files/{name} when ready.")
    created_at: datetime
    params: dict[str, Any]
    metrics: dict[str, Any]
    job_id: str
    progress: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class ConceptList(BaseModel):
    concepts: list[Concept]
    total: int


class Progress(BaseModel):
    stage: str
    fraction: float = Field(ge=0, le=1)
    epoch: int | None = Field(None, description="Training only, like epochs, step, steps, loss and best_iou.")
    epochs: int | None = None
    step: int | None = None
    steps: int | None = None
    loss: float | None = None
    best_iou: float | None = None

    @model_serializer(mode="wrap")
    def _only_what_applies(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


class JobErrorBody(BaseModel):
    code: str
    message: str


class RLE(BaseModel):
    size: tuple[int, int] = Field(description="[height, width], COCO order.")
    counts: str = Field(description="COCO compressed RLE, column-major, as pycocotools encodes it.")


class Segment(BaseModel):
    id: int
    label: str | None
    label_id: int | None
    score: float | None
    area: int
    bbox: tuple[int, int, int, int] = Field(description="[x, y, width, height]")
    segmentation: RLE


class ResultImage(BaseModel):
    id: str = Field(description="The picture's id (SHA-256 of its bytes): send it as `image_id` to ask about it again.")
    width: int
    height: int


class SegmentationResult(BaseModel):
    image: ResultImage
    mask_format: Literal["coco_rle"] = "coco_rle"
    bbox_format: Literal["xywh"] = "xywh"
    segments: list[Segment]
    labels: list[str] | None = Field(None, description="Text and one-shot: label_id -> name, 0 = background.")
    passes: int | None = Field(None, description="selfcross: SD passes used (a long class list is split).")
    instances: int | None = Field(None, description="Referring: instances found in the object area.")
    instance_scores: list[list[float]] | None = Field(
        None, description="Referring: each query's mean attribution on each instance."
    )
    random_weights: bool = Field(
        False, description="True when the worker's model has random weights (tiny-random): the masks mean nothing."
    )
    timings_ms: dict[str, float]


JobStatusName = Literal["queued", "running", "succeeded", "failed", "canceled"]
JobKindName = Literal[tuple(KINDS)]  # the one table of job kinds (attnseg.queue)


class Job(BaseModel):
    id: str
    model_id: str | None = Field(None, description="One-shot jobs: the model trained or used.")
    concept_id: str | None = Field(None, description="Concept jobs: the concept trained or imported.")
    kind: JobKindName
    status: JobStatusName
    progress: Progress
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None = Field(description="When the job and its result are deleted.")
    params: dict[str, Any]
    result: dict[str, Any] | None = Field(None, description="A SegmentationResult (or training summary).")
    error: JobErrorBody | None = None


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class WorkerInfo(BaseModel):
    name: str
    host: str
    pid: int
    device: str
    dtype: str
    sd_model: str
    clip_model: str | None = None
    clip_pretrained: str | None = None
    queues: list[str] = Field(default_factory=list, description="The queues it serves, in priority order.")
    random_weights: bool
    weights_note: str | None = Field(
        None, description="What a locally built model's weights are (tiny-random, tiny-colour), in words."
    )
    state: str = Field(description="idle or busy")
    ready_at: datetime
    announced_at: datetime | None = Field(None, description="When this announcement was written.")
    model_busy_s: float | None = Field(
        None,
        description="Seconds its model thread has worked since it started; "
        "the rate between two announcements is its utilisation.",
    )
    prefetch_hits: int | None = Field(None, description="Jobs whose picture was decoded while the model was busy.")
    prefetch_misses: int | None = Field(None, description="Jobs whose picture was fetched when they started.")


class Readiness(BaseModel):
    ready: bool
    redis: bool
    key: Literal["not_needed", "missing", "refused", "accepted"] = Field(
        description="This request's API key: not needed (no keys configured), missing, refused or accepted."
    )
    workers: list[WorkerInfo] = Field(
        default_factory=list, description="Absent for callers without a key when keys are configured."
    )
    queues: dict[str, int] = Field(default_factory=dict, description="Queued jobs per queue; like workers.")
