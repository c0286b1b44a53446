"""The API fills in defaults before queueing; the Python API has its own. They must agree."""

import inspect

from service.schemas import TEXT_METHOD_TIMESTEP, TextParams, UnsupervisedParams
from workers.methods import textseg
from workers.methods.unsupervised import segment_unsupervised


def python_defaults(function) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(function).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def api_defaults(model) -> dict:
    return {name: field.default for name, field in model.model_fields.items() if field.default_factory is None}


def test_unsupervised_defaults_agree():
    api, python = api_defaults(UnsupervisedParams), python_defaults(segment_unsupervised)
    for name in ("kl_threshold", "grid", "iterations", "timestep", "resolution", "refine", "vocabulary"):
        assert api[name] == python[name], name


def test_text_defaults_agree():
    api, python = api_defaults(TextParams), python_defaults(textseg.segment_text)
    for name in ("method", "background", "samples", "resolution"):
        assert api[name] == python[name], name
    assert TEXT_METHOD_TIMESTEP == textseg.DEFAULT_TIMESTEPS


def test_torch_threads_default_to_the_cpus_shared_by_the_workers(monkeypatch):
    from attnseg import settings

    monkeypatch.setattr(settings, "usable_cpus", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert settings.Settings(workers_per_host=3).torch_threads == 5
    assert settings.Settings(workers_per_host=32).torch_threads == 1
    assert settings.Settings(workers_per_host=3, torch_threads=7).torch_threads == 7
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # an explicit OpenMP setting is kept
    assert settings.Settings(workers_per_host=3).torch_threads == 2
