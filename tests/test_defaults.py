"""The API fills in defaults before queueing; the Python API has its own. Both read attnseg.defaults;
these tests check that every parameter the two share agrees."""

import inspect
import typing

from attnseg.defaults import TEXT_TIMESTEPS
from service.schemas import (
    ConceptTrainParams,
    ReferringParams,
    TextParams,
    TrainParams,
    UnsupervisedParams,
)
from workers.methods import textseg
from workers.methods.concepts import train_concept
from workers.methods.oneshot import segment_oneshot, train_oneshot
from workers.methods.referring import segment_referring
from workers.methods.unsupervised import segment_unsupervised


def python_defaults(function) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(function).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def api_defaults(model) -> dict:
    return {name: field.default for name, field in model.model_fields.items() if field.default_factory is None}


def assert_agree(model, function, names):
    api, python = api_defaults(model), python_defaults(function)
    for name in names:
        assert api[name] == python[name], name


def test_unsupervised_defaults_agree():
    names = ("kl_threshold", "grid", "iterations", "timestep", "resolution", "refine", "vocabulary")
    assert_agree(UnsupervisedParams, segment_unsupervised, names)


def test_text_defaults_agree():
    names = ("method", "background", "samples", "resolution", "gate_threshold", "background_threshold")
    assert_agree(TextParams, textseg.segment_text, names)
    # One function per API method, and a default timestep for each.
    assert typing.get_args(TextParams.model_fields["method"].annotation) == textseg.METHODS == tuple(TEXT_TIMESTEPS)


def test_training_and_referring_defaults_agree():
    assert_agree(TrainParams, train_oneshot, ("epochs", "learning_rate", "min_crop", "resolution"))
    assert TrainParams.model_fields["crops_per_side"].default == python_defaults(segment_oneshot)["crops_per_side"]
    assert_agree(ConceptTrainParams, train_concept, ("train_kv", "steps", "learning_rate", "batch_size", "num_vectors"))
    assert_agree(ReferringParams, segment_referring, ("max_instances", "timestep", "resolution"))


def test_torch_threads_default_to_the_cpus_shared_by_the_workers(monkeypatch):
    from attnseg import settings

    monkeypatch.setattr(settings, "usable_cpus", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert settings.Settings(workers_per_host=3).torch_threads == 5
    assert settings.Settings(workers_per_host=32).torch_threads == 1
    assert settings.Settings(workers_per_host=3, torch_threads=7).torch_threads == 7
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # an explicit OpenMP setting is kept
    assert settings.Settings(workers_per_host=3).torch_threads == 2
