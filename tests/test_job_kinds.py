"""The one table of job kinds (attnseg.queue.KINDS) and the worker code it names agree."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from attnseg.queue import KINDS, QUEUES, job_kind
from workers.engine import concept_jobs, jobs
from workers.engine.batch import Batch
from workers.engine.dispatch import batch_of, handlings, picture_side, queues_with_pictures, resolve

JOB_MODULES = (jobs, concept_jobs)


def test_every_kind_resolves_to_its_job_function():
    for name, kind in KINDS.items():
        assert kind.name == name and kind.queue in QUEUES
        function = resolve(kind.func)
        assert callable(function)
        assert function.job_kind == name, f"{kind.func} is decorated as {function.job_kind!r}, registered as {name!r}"


def test_every_job_function_is_registered():
    registered = {kind.func for kind in KINDS.values()}
    for module in JOB_MODULES:
        for attribute, value in vars(module).items():
            if inspect.isfunction(value) and hasattr(value, "job_kind") and value.__module__ == module.__name__:
                assert f"{module.__name__}.{attribute}" in registered
                assert KINDS[value.job_kind].func == f"{module.__name__}.{attribute}"


def test_picture_sides_and_batches_resolve():
    for kind in KINDS.values():
        handling = handlings()[kind.func]
        assert handling.picture_side is None or callable(handling.picture_side)
        assert handling.batch is None or (isinstance(handling.batch, Batch) and handling.batch.kind == kind.name)
        assert batch_of(kind.func) is handling.batch
    batched = {kind.name for kind in KINDS.values() if kind.batch}
    assert {"unsupervised", "text"} <= batched
    assert all(KINDS[name].picture_side for name in batched)  # the batch path decodes pictures first
    assert queues_with_pictures() == {KINDS["unsupervised"].queue}


def test_picture_side_by_function():
    assert picture_side(KINDS["unsupervised"].func, {"resolution": 384}) == 384
    assert picture_side(KINDS["text"].func, {"resolution": 256, "method": "selfcross"}) == 256
    assert picture_side(KINDS["text"].func, {"resolution": 256, "method": "gem"}) >= 256
    assert picture_side(KINDS["concept_train"].func, {}) is None
    assert picture_side("somewhere.else", {}) is None


def test_unknown_kind_is_refused():
    assert job_kind("text") is KINDS["text"]
    with pytest.raises(ValueError, match="unknown job kind 'txet'"):
        job_kind("txet")


def test_the_api_names_the_same_kinds():
    """The job object's `kind` in the committed OpenAPI document lists exactly the registered kinds."""
    document = json.loads((Path(__file__).resolve().parent.parent / "openapi" / "openapi.json").read_text())
    assert document["components"]["schemas"]["Job"]["properties"]["kind"]["enum"] == list(KINDS)
