"""Concepts as the API sees them: records shown with their job's state, identifiers in queries
resolved to the caller's concepts, and the checks on uploads made before anything is queued."""

from __future__ import annotations

from contextlib import contextmanager

from pydantic import BaseModel

from attnseg import concept_store
from attnseg.concept_files import (
    ConceptFileError,
    check_embedding_shape,
    check_kv_shapes,
    embedding_key,
    identifiers_in,
    kv_layers,
)
from attnseg.concept_store import UPLOAD_PREFIX, IdentifierTakenError, store
from attnseg.settings import Settings
from attnseg.tensor_files import TensorFileError, declared_shapes
from attnseg.workers_registry import ready_workers
from service.errors import ApiError
from service.records import with_job_state
from service.schemas import shown_id, valid_id
from service.submissions import part_name
from service.submit import checked_mask
from service.uploads import CheckedImage, check_image, decode_mask

MIN_PHOTOS, MAX_PHOTOS = 3, 20
IN_THE_MAKING = ("training", "importing")


def concept_view(connection, record: dict, settings: Settings) -> dict:
    view = {**record, "progress": None, "files": [f for f in record["files"] if not f.startswith(UPLOAD_PREFIX)]}
    view["name"] = record.get("name") or record["identifier"]  # unnamed (and older) concepts
    view.setdefault("description", None)
    if record["status"] in IN_THE_MAKING:
        with_job_state(connection, view, record["job_id"], settings)
    return view


def get_record(connection, concept_id: str, tenant: str) -> dict:
    """The tenant's concept; 404 for an unknown id and for another tenant's (existence is not revealed)."""
    record = store.get(connection, concept_id, owner=tenant) if valid_id(concept_id) else None
    if record is None:
        raise ApiError(404, "not_found", f"no concept with id '{shown_id(concept_id)}'", field="concept_id")
    return record


def create_record(connection, concept_id: str, owner: str, identifier: str, class_word: str, **fields) -> dict:
    try:
        return concept_store.create(
            connection, concept_id, owner=owner, identifier=identifier, class_word=class_word, **fields
        )
    except IdentifierTakenError as exc:
        raise ApiError(
            409, "identifier_taken", f"{exc}; delete it or choose another identifier", field="identifier"
        ) from None


def usable_record(connection, owner: str, identifier: str, settings: Settings, field: str) -> dict:
    """The owner's concept `<identifier>` as shown; 422 if there is none, 409 if it failed."""
    record = concept_store.by_identifier(connection, owner, identifier)
    if record is None:
        raise ApiError(
            422,
            "unknown_concept",
            f"<{identifier}> is not a concept of yours: train or import it "
            "first (POST /concepts/train, /concepts/import)",
            field=field,
        )
    view = concept_view(connection, record, settings)
    if view["status"] == "failed":
        raise ApiError(
            409,
            "concept_failed",
            f"concept <{identifier}> failed: {(view['error'] or {}).get('message', 'unknown error')}",
            field=field,
        )
    return view


def resolve_concepts(
    connection, owner: str, texts: list[str], settings: Settings, field: str, *, one_pass: bool = False
) -> tuple[dict[str, str], str | None]:
    """identifier -> concept id for every `<identifier>` in texts, and the training job to wait for
    (a concept still training may be used: the job then waits for it). 422 for an unknown
    identifier, or with one_pass (all texts in one UNet pass) for two Custom Diffusion concepts, whose
    attention weights would replace the same projections; 409 for a failed concept or for two
    concepts still in the making."""
    found: dict[str, str] = {}
    waiting: list[str] = []
    weighted: list[str] = []
    for identifier in dict.fromkeys(name for text in texts for name in identifiers_in(text)):
        view = usable_record(connection, owner, identifier, settings, field)
        if view["status"] in IN_THE_MAKING:
            waiting.append(view["job_id"])
        if view["method"] == "custom_diffusion":
            weighted.append(f"<{identifier}>")
        found[identifier] = view["id"]
    if one_pass and len(weighted) > 1:
        raise ApiError(
            422,
            "invalid_field",
            f"{', '.join(weighted)} are Custom Diffusion concepts: one request can "
            "use only one of them (Textual Inversion concepts combine freely)",
            field=field,
        )
    if len(waiting) > 1:
        raise ApiError(
            409,
            "concepts_not_ready",
            "more than one of these concepts is still being made; wait for them (GET /concepts/{id})",
            field=field,
        )
    return found, (waiting[0] if waiting else None)


def require_selfcross(concepts: dict[str, str], params: BaseModel) -> None:
    """422 when a request names concepts with a method other than selfcross (the only one using them)."""
    method = getattr(params, "method", "selfcross")
    if concepts and method != "selfcross":
        raise ApiError(
            422, "invalid_field", f"concepts work with method 'selfcross' only, not '{method}'", field="method"
        )


def announced_shapes(connection) -> tuple[dict, str] | None:
    """The concept shapes (and model) a ready worker announced, or None when no worker is up."""
    for worker in ready_workers(connection):
        if worker.get("concept_shapes"):
            return worker["concept_shapes"], worker["sd_model"]
    return None


def precheck_files(connection, identifier: str, embeddings: bytes, weights: bytes | None) -> None:
    """Check the uploads from their headers, here, before anything is queued (attnseg.tensor_files):
    a malformed or oversized file, and a safetensors file whose contents or shapes do not fit a ready
    worker's model, are 422s. A torch zip's tensors are in its pickle: the worker checks those."""
    expected = announced_shapes(connection)
    with refused_as("embeddings"):
        embedding_shapes = declared_shapes(embeddings)
        if embedding_shapes is not None:
            shape = embedding_shapes[embedding_key(embedding_shapes, identifier)]
            if expected is not None:
                check_embedding_shape(shape, *expected)
    if weights is None:
        return
    with refused_as("weights"):
        weight_shapes = declared_shapes(weights)
        if weight_shapes is not None:
            kv = kv_layers(weight_shapes)
            if expected is not None:
                check_kv_shapes(kv, *expected)


@contextmanager
def refused_as(field: str):
    """A ConceptFileError or TensorFileError inside becomes a 422 naming the file's field."""
    try:
        yield
    except (ConceptFileError, TensorFileError) as exc:
        raise ApiError(422, "invalid_concept", str(exc), field=field) from None


def check_photo_count(images: list, masks: list) -> None:
    """422 unless MIN_PHOTOS to MAX_PHOTOS photos come with one mask each or none."""
    if not MIN_PHOTOS <= len(images) <= MAX_PHOTOS:
        raise ApiError(
            422,
            "invalid_field",
            f"give {MIN_PHOTOS} to {MAX_PHOTOS} photos of the object, got {len(images)}",
            field="images",
        )
    if masks and len(masks) != len(images):
        raise ApiError(
            422,
            "invalid_field",
            f"{len(images)} images but {len(masks)} masks: give one mask per image, in the same order, or none",
            field="masks",
        )


def check_photos(images: list[tuple[str, bytes]], settings: Settings) -> list[CheckedImage]:
    return [
        check_image(data, max_pixels=settings.max_image_pixels, field=part_name("images", i, name))
        for i, (name, data) in enumerate(images)
    ]


def check_object_masks(
    masks: list[tuple[str, bytes]], photos: list[CheckedImage], settings: Settings
) -> list[CheckedImage]:
    """Each mask (non-zero = the object) of its photo's size with some object pixels, as a 0/255 PNG;
    decoded one at a time (memory stays that of the largest)."""
    object_masks = []
    for index, ((name, data), photo) in enumerate(zip(masks, photos)):
        field = part_name("masks", index, name)
        mask = decode_mask(data, max_pixels=settings.max_image_pixels, field=field) > 0
        if mask.shape != (photo.height, photo.width) or not mask.any():
            raise ApiError(
                422,
                "invalid_mask",
                f"{field} must have its photo's size {photo.width}x{photo.height} and some object pixels (non-zero)",
                field=field,
            )
        object_masks.append(checked_mask(mask.view("uint8") * 255))
    return object_masks
