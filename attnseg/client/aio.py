"""The asyncio client: the same operations as `Client` (see `protocol`), driven over `httpx.AsyncClient`."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

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
    Result,
    segmentation_result,
)
from attnseg.client.sync import ProgressCallback


class AsyncClient:
    """`async with AsyncClient(url) as client: job = await client.segment_unsupervised(...)`; as `Client`."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.timeout = timeout
        self.retries = retries
        self._http = httpx.AsyncClient(**protocol.client_options(base_url, api_key, timeout), transport=transport)

    async def _run(self, operation: protocol.Operation):
        reply = None
        while True:
            try:
                step = operation.send(reply)
            except StopIteration as done:
                return done.value
            if isinstance(step, protocol.Sleep):
                await asyncio.sleep(step.seconds)
                reply = None
            else:
                reply = await self._http.request(**protocol.request_arguments(step, self.timeout))

    async def _json(self, call: protocol.Call) -> dict:
        return await self._run(protocol.read_json(call, self.retries))

    async def segment_unsupervised(self, image: PictureInput, **params) -> AsyncJob:
        return AsyncJob(self, await self._json(protocol.unsupervised_call(image, params)))

    async def segment_text(
        self, image: PictureInput, classes: Sequence[str], method: str = "selfcross", **params
    ) -> AsyncJob:
        return AsyncJob(self, await self._json(protocol.text_call(image, classes, method, params)))

    async def train_oneshot(
        self,
        images: ImageInput | Sequence[ImageInput],
        masks: ImageInput | Sequence[ImageInput],
        labels: Sequence[str],
        **params,
    ) -> AsyncOneshotModel:
        call = protocol.train_call(images, masks, labels, params)
        _, model = await self._run(protocol.submit_for_record(call, self.retries))
        return AsyncOneshotModel(self, model)

    async def oneshot_model(self, model_id: str) -> AsyncOneshotModel:
        return AsyncOneshotModel(self, await self._json(protocol.model_call(model_id)))

    async def oneshot_models(self, offset: int = 0, limit: int = 50) -> list[AsyncOneshotModel]:
        return [
            AsyncOneshotModel(self, body) for body in (await self._json(protocol.models_call(offset, limit)))["models"]
        ]

    async def oneshot_segment(self, model_id: str, image: PictureInput, **params) -> AsyncJob:
        return AsyncJob(self, await self._json(protocol.oneshot_segment_call(model_id, image, params)))

    async def segment_referring(
        self, image: PictureInput, class_word: str, queries: Sequence[str], **params
    ) -> AsyncJob:
        return AsyncJob(self, await self._json(protocol.referring_call(image, class_word, queries, params)))

    async def train_concept(
        self,
        photos: Sequence[ImageInput],
        identifier: str,
        class_word: str,
        masks: Sequence[ImageInput] | None = None,
        **params,
    ) -> AsyncConcept:
        call = protocol.concept_train_call(photos, identifier, class_word, masks, params)
        return AsyncConcept(self, (await self._run(protocol.submit_for_record(call, self.retries)))[1])

    async def import_concept(
        self, identifier: str, class_word: str, embeddings, weights=None, **params
    ) -> AsyncConcept:
        call = protocol.concept_import_call(identifier, class_word, embeddings, weights, params)
        return AsyncConcept(self, (await self._run(protocol.submit_for_record(call, self.retries)))[1])

    async def concept(self, concept_id: str) -> AsyncConcept:
        return AsyncConcept(self, await self._json(protocol.concept_call(concept_id)))

    async def concepts(self, offset: int = 0, limit: int = 50) -> list[AsyncConcept]:
        return [
            AsyncConcept(self, body) for body in (await self._json(protocol.concepts_call(offset, limit)))["concepts"]
        ]

    async def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, await self._json(protocol.job_call(job_id)))

    async def cancel(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, await self._json(protocol.cancel_call(job_id)))

    async def overlay(self, job_id: str) -> bytes:
        return (await self._run(protocol.request(protocol.overlay_call(job_id), self.retries))).content

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_) -> None:
        await self.aclose()


class AsyncJob(JobView):
    """As `Job`, with coroutines."""

    def __init__(self, client: AsyncClient, body: dict):
        self.client = client
        self.state = JobState.from_api(body)

    async def refresh(self) -> AsyncJob:
        self.state = (await self.client.job(self.id)).state
        return self

    async def wait(self, timeout: float | None = None, on_progress: ProgressCallback | None = None) -> AsyncJob:
        await self.client._run(protocol.wait_job(self.state, timeout, on_progress, self.client.retries, self._observe))
        return self

    async def result(self, timeout: float | None = None) -> Result:
        return segmentation_result((await self.wait(timeout)).state)

    async def cancel(self) -> AsyncJob:
        self.state = (await self.client.cancel(self.id)).state
        return self

    async def overlay(self) -> bytes:
        return await self.client.overlay(self.id)


class AsyncOneshotModel(ModelView):
    """As `OneshotModel`, with coroutines."""

    def __init__(self, client: AsyncClient, body: dict):
        self.client = client
        self.state = ModelState.from_api(body)

    async def refresh(self) -> AsyncOneshotModel:
        self.state = (await self.client.oneshot_model(self.id)).state
        return self

    async def wait(
        self, timeout: float | None = None, on_progress: ProgressCallback | None = None
    ) -> AsyncOneshotModel:
        self.state = ModelState.from_api(
            await self.client._run(
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

    async def segment(self, image: PictureInput, **params) -> AsyncJob:
        return await self.client.oneshot_segment(self.id, image, **params)

    async def delete(self) -> None:
        await self.client._run(protocol.request(protocol.model_call(self.id, "DELETE"), self.client.retries))


class AsyncConcept(ConceptView):
    """As `Concept`, with coroutines."""

    def __init__(self, client: AsyncClient, body: dict):
        self.client = client
        self.state = ConceptState.from_api(body)

    async def refresh(self) -> AsyncConcept:
        self.state = (await self.client.concept(self.id)).state
        return self

    async def wait(self, timeout: float | None = None, on_progress: ProgressCallback | None = None) -> AsyncConcept:
        self.state = ConceptState.from_api(
            await self.client._run(
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

    async def file(self, name: str) -> bytes:
        call = protocol.concept_file_call(self.id, name)
        return (await self.client._run(protocol.request(call, self.client.retries))).content

    async def delete(self) -> None:
        await self.client._run(protocol.request(protocol.concept_call(self.id, "DELETE"), self.client.retries))
