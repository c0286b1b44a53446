"""The blocking client: a thin driver of the operations in `protocol` over `httpx.Client`."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from attnseg.client import protocol
from attnseg.client.inputs import ImageInput, PictureInput
from attnseg.client.results import (
    ConceptState,
    ConceptView,
    JobState,
    JobView,
    ModelState,
    ModelView,
    Progress,
    Result,
    segmentation_result,
)

ProgressCallback = Callable[[Progress], Any]


class Client:
    """`Client("http://127.0.0.1:8000", api_key=None)`; use as a context manager or call `close()`.

    Submitting returns a `Job` at once; `job.result()` waits (long-poll) and gives the `Result`.
    429/503 answers are retried up to `retries` times, after the server's Retry-After.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        transport: httpx.BaseTransport | None = None,
    ):
        self.timeout = timeout
        self.retries = retries
        self._http = httpx.Client(**protocol.client_options(base_url, api_key, timeout), transport=transport)

    def _run(self, operation: protocol.Operation):
        """Drive an operation: send its calls, sleep its sleeps, return its value."""
        reply = None
        while True:
            try:
                step = operation.send(reply)
            except StopIteration as done:
                return done.value
            if isinstance(step, protocol.Sleep):
                time.sleep(step.seconds)
                reply = None
            else:
                reply = self._http.request(**protocol.request_arguments(step, self.timeout))

    def _json(self, call: protocol.Call) -> dict:
        return self._run(protocol.read_json(call, self.retries))

    def segment_unsupervised(self, image: PictureInput, **params) -> Job:
        """DiffSeg. params: kl_threshold, grid, iterations, timestep, resolution, refine, vocabulary, seed."""
        return Job(self, self._json(protocol.unsupervised_call(image, params)))

    def segment_text(self, image: PictureInput, classes: Sequence[str], method: str = "selfcross", **params) -> Job:
        """One segment per class found, plus background. params: background, background_words, samples,
        timestep, resolution, seed (and what the server adds)."""
        return Job(self, self._json(protocol.text_call(image, classes, method, params)))

    def train_oneshot(
        self,
        images: ImageInput | Sequence[ImageInput],
        masks: ImageInput | Sequence[ImageInput],
        labels: Sequence[str],
        **params,
    ) -> OneshotModel:
        """Train a one-shot part model from picture(s) and mask(s) of class ids; `labels` names ids 1..K-1.
        params: name, description, epochs, learning_rate, crops_per_side, min_crop, resolution, seed."""
        call = protocol.train_call(images, masks, labels, params)
        _, model = self._run(protocol.submit_for_record(call, self.retries))
        return OneshotModel(self, model)

    def oneshot_model(self, model_id: str) -> OneshotModel:
        return OneshotModel(self, self._json(protocol.model_call(model_id)))

    def oneshot_models(self, offset: int = 0, limit: int = 50) -> list[OneshotModel]:
        """Your one-shot models, newest first."""
        return [OneshotModel(self, body) for body in self._json(protocol.models_call(offset, limit))["models"]]

    def oneshot_segment(self, model_id: str, image: PictureInput, **params) -> Job:
        """Segment into a one-shot model's parts (allowed while it trains). params: crops_per_side, resolution, seed."""
        return Job(self, self._json(protocol.oneshot_segment_call(model_id, image, params)))

    def segment_referring(self, image: PictureInput, class_word: str, queries: Sequence[str], **params) -> Job:
        """The instance of `class_word` each query refers to; queries may name concepts (`concept.query`,
        "a <my-mug> mug with cola"). params: max_instances, resolution, seed."""
        return Job(self, self._json(protocol.referring_call(image, class_word, queries, params)))

    def train_concept(
        self,
        photos: Sequence[ImageInput],
        identifier: str,
        class_word: str,
        masks: Sequence[ImageInput] | None = None,
        **params,
    ) -> Concept:
        """Learn `<identifier>` from 3 to 20 photos of one object (masks: non-zero = the object, optional).
        params: name, description, train_kv (Custom Diffusion, default; False: Textual Inversion), steps,
        learning_rate, batch_size, num_vectors, resolution, seed."""
        call = protocol.concept_train_call(photos, identifier, class_word, masks, params)
        return Concept(self, self._run(protocol.submit_for_record(call, self.retries))[1])

    def import_concept(self, identifier: str, class_word: str, embeddings, weights=None, **params) -> Concept:
        """A concept trained elsewhere: diffusers' learned_embeds file (and Custom Diffusion weights), as
        paths or bytes; the worker checks them against its model. params: name, description."""
        call = protocol.concept_import_call(identifier, class_word, embeddings, weights, params)
        return Concept(self, self._run(protocol.submit_for_record(call, self.retries))[1])

    def concept(self, concept_id: str) -> Concept:
        return Concept(self, self._json(protocol.concept_call(concept_id)))

    def concepts(self, offset: int = 0, limit: int = 50) -> list[Concept]:
        """Your concepts, newest first."""
        return [Concept(self, body) for body in self._json(protocol.concepts_call(offset, limit))["concepts"]]

    def job(self, job_id: str) -> Job:
        return Job(self, self._json(protocol.job_call(job_id)))

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job, or ask a running one to stop; returns its state right after."""
        return Job(self, self._json(protocol.cancel_call(job_id)))

    def overlay(self, job_id: str) -> bytes:
        """PNG of the picture with the succeeded job's segments drawn and labelled."""
        return self._run(protocol.request(protocol.overlay_call(job_id), self.retries)).content

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_) -> None:
        self.close()


class Job(JobView):
    """A submitted job: `wait()`, `result()`, `cancel()`, `overlay()`; `state` is the last reading."""

    def __init__(self, client: Client, body: dict):
        self.client = client
        self.state = JobState.from_api(body)

    def refresh(self) -> Job:
        self.state = self.client.job(self.id).state
        return self

    def wait(self, timeout: float | None = None, on_progress: ProgressCallback | None = None) -> Job:
        """Block until the job ends (JobFailed / JobCanceled if it did not succeed, WaitTimeout after
        `timeout` s); `on_progress(Progress)` is called on each change."""
        self.client._run(protocol.wait_job(self.state, timeout, on_progress, self.client.retries, self._observe))
        return self

    def result(self, timeout: float | None = None) -> Result:
        """Wait if needed, then the segmentation `Result`."""
        return segmentation_result(self.wait(timeout).state)

    def cancel(self) -> Job:
        self.state = self.client.cancel(self.id).state
        return self

    def overlay(self) -> bytes:
        return self.client.overlay(self.id)


class OneshotModel(ModelView):
    """A one-shot part model: `wait()` for its training, then `segment(image)` (also allowed before)."""

    def __init__(self, client: Client, body: dict):
        self.client = client
        self.state = ModelState.from_api(body)

    def refresh(self) -> OneshotModel:
        self.state = self.client.oneshot_model(self.id).state
        return self

    def wait(self, timeout: float | None = None, on_progress: ProgressCallback | None = None) -> OneshotModel:
        """Block until training ends; `on_progress` sees epoch, epochs, loss and best_iou. JobFailed if it failed."""
        self.state = ModelState.from_api(
            self.client._run(
                protocol.wait_record(
                    self.state.train_job_id,
                    protocol.model_call(self.id),
                    self.status == "training",
                    timeout,
                    on_progress,
                    self.client.retries,
                )
            )
        )
        return self

    def segment(self, image: PictureInput, **params) -> Job:
        return self.client.oneshot_segment(self.id, image, **params)

    def delete(self) -> None:
        """Delete the model (a training still under way is canceled)."""
        self.client._run(protocol.request(protocol.model_call(self.id, "DELETE"), self.client.retries))


class Concept(ConceptView):
    """A concept (your object): `wait()` for its training or import, then refer to it as `concept.query`
    in `segment_referring` queries and `segment_text` classes."""

    def __init__(self, client: Client, body: dict):
        self.client = client
        self.state = ConceptState.from_api(body)

    def refresh(self) -> Concept:
        self.state = self.client.concept(self.id).state
        return self

    def wait(self, timeout: float | None = None, on_progress: ProgressCallback | None = None) -> Concept:
        """Block until it is ready; `on_progress` sees step, steps and loss. JobFailed if it failed."""
        self.state = ConceptState.from_api(
            self.client._run(
                protocol.wait_record(
                    self.state.job_id,
                    protocol.concept_call(self.id),
                    self.status in ("training", "importing"),
                    timeout,
                    on_progress,
                    self.client.retries,
                )
            )
        )
        return self

    def file(self, name: str) -> bytes:
        """One of `state.files` (diffusers format: load_textual_inversion / load_attn_procs, or import again)."""
        return self.client._run(
            protocol.request(protocol.concept_file_call(self.id, name), self.client.retries)
        ).content

    def delete(self) -> None:
        """Delete it and its files (a training still under way is canceled)."""
        self.client._run(protocol.request(protocol.concept_call(self.id, "DELETE"), self.client.retries))
