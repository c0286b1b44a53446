"""The client's one request/response layer, without I/O ("sans-IO").

Requests are built by pure functions (`*_call`) and operations are generators: they yield a `Call`
(one HTTP request; the driver sends back the `httpx.Response`) or a `Sleep`, and return the parsed
answer. `Client` and `AsyncClient` are two thin drivers of the same generators, so retries,
long-polling and error mapping exist once. (The idea is the sans-IO pattern of h11 and httpcore.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from attnseg.client.errors import ApiError, JobCanceled, JobFailed, WaitTimeout, error_class
from attnseg.client.inputs import FieldPart, FilePart, ImageInput, PictureInput, file_part, picture_part
from attnseg.client.results import JobState, Progress

T = TypeVar("T")
RETRY_STATUSES = (429, 503)  # the API sends Retry-After with both; nothing was queued
MAX_RETRY_AFTER_S = 60.0  # never sleep longer than this on one Retry-After
BACKOFF_S = 1.0  # first pause when a 429/503 comes without Retry-After (doubles per attempt)
POLL_HOLD_S = 30.0  # long-poll hold (the API allows up to 60); with on_progress it answers at each change


@dataclass(frozen=True)
class Call:
    """One HTTP request. `hold_s` is how long the server may hold it (added to the read timeout)."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    data: dict[str, str] | None = None
    files: list[tuple[str, FilePart | FieldPart]] | None = None
    hold_s: float = 0.0


@dataclass(frozen=True)
class Sleep:
    seconds: float


Operation = Generator["Call | Sleep", "httpx.Response | None", T]


def package_version() -> str:
    try:
        return version("attnseg")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0"


def client_options(base_url: str, api_key: str | None, timeout: float) -> dict:
    """Keyword arguments for `httpx.Client`/`httpx.AsyncClient`."""
    headers = {"User-Agent": f"attnseg-client/{package_version()}"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return {"base_url": base_url, "headers": headers, "timeout": timeout}


def request_arguments(call: Call, timeout: float) -> dict:
    """Keyword arguments for `httpx.Client.request`, the read timeout stretched by the server's hold."""
    return {
        "method": call.method,
        "url": call.path,
        "params": call.params,
        "data": call.data,
        "files": call.files,
        "timeout": httpx.Timeout(timeout, read=timeout + call.hold_s),
    }


def form_fields(params: dict[str, Any]) -> dict[str, str]:
    """Parameters -> form fields: None left out (the server's default), lists as JSON arrays, bools as words."""
    fields = {}
    for name, value in params.items():
        if value is None:
            continue
        if isinstance(value, bool):
            fields[name] = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            fields[name] = json.dumps(list(value))
        else:
            fields[name] = str(value)
    return fields


def segment_path(*parts: str) -> str:
    return "/" + "/".join(quote(str(part), safe="") for part in parts)


def unsupervised_call(image: PictureInput, params: dict) -> Call:
    return Call("POST", "/segment/unsupervised", data=form_fields(params), files=[picture_part(image)])


def names(value: str | Sequence[str]) -> list[str]:
    """One name or several (a lone string is one name, not its letters)."""
    return [value] if isinstance(value, str) else list(value)


def text_call(image: PictureInput, classes: str | Sequence[str], method: str, params: dict) -> Call:
    fields = form_fields({"classes": names(classes), "method": method, **params})
    return Call("POST", "/segment/text", data=fields, files=[picture_part(image)])


def as_list(value: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One picture or several: a list or tuple is several; anything else (a path, an array) is one."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def train_call(images, masks, labels: str | Sequence[str], params: dict) -> Call:
    images, masks = as_list(images), as_list(masks)
    files = [("images", file_part(image, f"image{i}")) for i, image in enumerate(images)]
    files += [("masks", file_part(mask, f"mask{i}", mask=True)) for i, mask in enumerate(masks)]
    return Call("POST", "/oneshot/train", data=form_fields({"labels": names(labels), **params}), files=files)


def referring_call(image: PictureInput, class_word: str, queries: str | Sequence[str], params: dict) -> Call:
    fields = form_fields({"class_word": class_word, "queries": names(queries), **params})
    return Call("POST", "/segment/referring", data=fields, files=[picture_part(image)])


def concept_train_call(photos, identifier: str, class_word: str, masks, params: dict) -> Call:
    files = [("images", file_part(photo, f"photo{i}")) for i, photo in enumerate(as_list(photos))]
    if masks is not None:
        files += [("masks", file_part(mask, f"mask{i}", mask=True)) for i, mask in enumerate(as_list(masks))]
    fields = form_fields({"identifier": identifier, "class_word": class_word, **params})
    return Call("POST", "/concepts/train", data=fields, files=files)


def concept_import_call(identifier: str, class_word: str, embeddings, weights=None, params: dict | None = None) -> Call:
    """embeddings, weights: paths or file bytes (diffusers' learned_embeds / Custom Diffusion weights);
    params: name, description."""
    files = [("embeddings", file_part(embeddings, "learned_embeds.safetensors"))]
    if weights is not None:
        files.append(("weights", file_part(weights, "pytorch_custom_diffusion_weights.safetensors")))
    return Call(
        "POST",
        "/concepts/import",
        data=form_fields({"identifier": identifier, "class_word": class_word, **(params or {})}),
        files=files,
    )


def concept_call(concept_id: str, method: str = "GET") -> Call:
    return Call(method, segment_path("concepts", concept_id))


def concepts_call(offset: int = 0, limit: int = 50) -> Call:
    return Call("GET", "/concepts", params={"offset": offset, "limit": limit})


def concept_file_call(concept_id: str, name: str) -> Call:
    return Call("GET", segment_path("concepts", concept_id, "files", name))


def oneshot_segment_call(model_id: str, image: PictureInput, params: dict) -> Call:
    return Call(
        "POST",
        segment_path("oneshot", model_id, "segment"),
        data=form_fields(params),
        files=[picture_part(image)],
    )


def job_call(job_id: str, hold_s: float = 0.0, progress: bool = False) -> Call:
    """GET /jobs/{id}; with hold_s a long-poll, answered early on any progress when `progress`."""
    params = {"wait": hold_s, **({"progress": "true"} if progress else {})} if hold_s else None
    return Call("GET", segment_path("jobs", job_id), params=params, hold_s=hold_s)


def cancel_call(job_id: str) -> Call:
    return Call("DELETE", segment_path("jobs", job_id))


def overlay_call(job_id: str) -> Call:
    return Call("GET", segment_path("jobs", job_id, "overlay.png"))


def model_call(model_id: str, method: str = "GET") -> Call:
    return Call(method, segment_path("oneshot", model_id))


def models_call(offset: int = 0, limit: int = 50) -> Call:
    return Call("GET", "/oneshot", params={"offset": offset, "limit": limit})


def retry_delay(response: httpx.Response, attempt: int) -> float:
    """Seconds to wait before retry `attempt` (0-based): Retry-After (seconds or an HTTP date), else backoff."""
    seconds = header_seconds(response.headers.get("retry-after"))
    if seconds is None:
        seconds = BACKOFF_S * 2**attempt
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def header_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds()
    except (TypeError, ValueError):
        return None


def api_error(response: httpx.Response) -> ApiError:
    """An error response -> the typed error, from the API's envelope (or the raw text from a proxy)."""
    try:
        body = response.json()["error"]
        code, message, field = body["code"], body["message"], body.get("field")
    except (ValueError, KeyError, TypeError):
        code, message, field = f"http_{response.status_code}", response.text[:300] or response.reason_phrase, None
    return error_class(response.status_code)(
        response.status_code, code, message, field, retry_after=header_seconds(response.headers.get("retry-after"))
    )


def request(call: Call, retries: int) -> Operation[httpx.Response]:
    """Send `call`; on 429/503 wait as told and resend, at most `retries` times; raise typed errors."""
    for attempt in range(retries + 1):
        response = yield call
        assert response is not None, "the driver answers every Call with its response"
        if response.status_code in RETRY_STATUSES and attempt < retries:
            yield Sleep(retry_delay(response, attempt))
            continue
        if response.is_error:
            raise api_error(response)
        return response
    raise AssertionError("unreachable")


def read_json(call: Call, retries: int) -> Operation[dict]:
    return (yield from request(call, retries)).json()


def submit_for_record(call: Call, retries: int) -> Operation[tuple[dict, dict]]:
    """Submit a job that makes a record (a one-shot model's training, a concept's training or import),
    then read the record, created with the job: (job, record)."""
    job = yield from read_json(call, retries)
    record = concept_call(job["concept_id"]) if job.get("concept_id") else model_call(job["model_id"])
    return job, (yield from read_json(record, retries))


def finished(state: JobState) -> JobState:
    """A final state -> itself when it succeeded, else JobFailed / JobCanceled with the job's error."""
    if state.status == "succeeded":
        return state
    error = state.error or {}
    kind = JobCanceled if state.status == "canceled" else JobFailed
    raise kind(
        state.id,
        error.get("code", state.status),
        error.get("message", f"the job is {state.status}"),
        error.get("field"),
        job=state,
    )


def wait_job(
    state: JobState,
    timeout: float | None,
    on_progress: Callable[[Progress], Any] | None,
    retries: int,
    observe: Callable[[JobState], Any],
) -> Operation[JobState]:
    """Long-poll until the job ends. `observe` sees every reading; `on_progress` each change of progress."""
    deadline = None if timeout is None else time.monotonic() + timeout
    seen = None
    while True:
        if on_progress is not None and state.progress != seen:
            seen = state.progress
            on_progress(seen)
        if state.done:
            return finished(state)
        hold = POLL_HOLD_S
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(f"job {state.id} is still {state.status} after {timeout} s")
            hold = min(hold, left)
        state = JobState.from_api(
            (yield from read_json(job_call(state.id, hold, progress=on_progress is not None), retries))
        )
        observe(state)


def wait_record(
    job_id: str,
    record_call: Call,
    in_the_making: bool,
    timeout: float | None,
    on_progress: Callable[[Progress], Any] | None,
    retries: int,
) -> Operation[dict]:
    """Wait for the job that makes a record (a model's training, a concept's training or import) while
    `in_the_making`, then read the record; JobFailed / JobCanceled if that job, or the record, failed."""
    if in_the_making:
        job = JobState.from_api((yield from read_json(job_call(job_id), retries)))
        yield from wait_job(job, timeout, on_progress, retries, observe=lambda _: None)
    record = yield from read_json(record_call, retries)
    if record["status"] == "failed":
        error = record.get("error") or {}
        raise JobFailed(job_id, error.get("code", "failed"), error.get("message", "training failed"))
    return record
