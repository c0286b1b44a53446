"""Personalized referring segmentation (workers/methods/referring.py): each pure step on planted
inputs, the whole pipeline on a planted scene (the UNet pass replaced by attention maps that follow
the concept's vector), and a real run on the tiny SD 1.x and 2.x models.

Why planted: a concept trained in a few CPU steps on a random tiny UNet cannot be made to pick one
of two look-alike objects reliably (its attention carries no colour). So the signal is planted in
the concept's vector and in the attention maps, and the tests check that the pipeline turns it into
the right instance and assignment.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.methods import referring
from workers.methods.referring import (
    assign_queries,
    eigengap_count,
    instance_labels,
    instance_scores,
    object_area,
    query_prompt,
    query_span,
    segment_referring,
    spectral_instances,
)
from workers.models.attention import AttentionStore
from workers.models.concept import Concept
from workers.models.concept_hooks import cross_attention_layers

GRID = 8  # the self layer's grid at resolution 128
HEIGHT, WIDTH = 48, 64


def block_self_attention(regions: torch.Tensor) -> torch.Tensor:
    """(Q, Q): every position attends uniformly to the positions of its own region."""
    flat = regions.flatten()
    same = (flat[:, None] == flat[None, :]).float()
    return same / same.sum(1, keepdim=True)


def scene_regions() -> torch.Tensor:
    """(8, 8): 0 table, 1 a red mug (left), 2 a blue mug (right): two look-alikes of one class."""
    regions = torch.zeros(GRID, GRID, dtype=torch.long)
    regions[2:6, 0:3] = 1
    regions[2:6, 5:8] = 2
    return regions


# --- pure steps ------------------------------------------------------------------------------


def test_object_area_is_where_the_class_beats_the_background():
    sc = torch.tensor([[0.9, 0.2], [0.5, 0.3]])  # bg = (1 - sc)^2: 0.01, 0.64, 0.25, 0.49
    assert object_area(sc).tolist() == [[True, False], [True, False]]
    assert object_area(sc, threshold=0.35).tolist() == [[True, False], [True, True]]  # (0.7 - 0.3)^2 = 0.16


def test_eigengap_counts_the_blocks():
    regions = torch.tensor([0] * 5 + [1] * 6 + [2] * 4)
    affinity = block_self_attention(regions).double().numpy() + 1e-3
    assert eigengap_count(affinity) == 3
    assert eigengap_count(affinity, max_count=2) <= 2
    assert eigengap_count(np.ones((6, 6))) == 1
    assert eigengap_count(np.ones((1, 1))) == 1


def test_spectral_instances_separate_the_instances_inside_the_area():
    regions = scene_regions()
    self_attn = block_self_attention(regions) * 0.98 + 0.02 / regions.numel()  # a little leakage everywhere
    area = (regions > 0).flatten()
    instances = spectral_instances(self_attn, area, seed=0)
    assert (instances[~area] == -1).all()
    # Numbered by first position in row-major order: the left mug's (2, 0) comes first.
    assert torch.equal(instances.view(GRID, GRID)[regions == 1], torch.zeros(12, dtype=torch.long))
    assert torch.equal(instances.view(GRID, GRID)[regions == 2], torch.ones(12, dtype=torch.long))
    assert (spectral_instances(self_attn, torch.zeros_like(area)) == -1).all()
    one = spectral_instances(self_attn, (regions == 1).flatten())
    assert set(one[(regions == 1).flatten()].tolist()) == {0}


def test_instance_scores_are_means_over_each_instance():
    instances = torch.tensor([-1, 0, 0, 1])
    attributions = torch.tensor([[9.0, 1.0, 3.0, 5.0], [0.0, 0.0, 0.0, 1.0]])
    assert torch.allclose(instance_scores(attributions, instances, 2), torch.tensor([[2.0, 5.0], [0.0, 1.0]]))
    nothing = instance_scores(attributions, torch.full((4,), -1), 0)  # no object area: no instance
    assert nothing.shape == (2, 0) and assign_queries(nothing) == [None, None]
    assert instance_labels(torch.full((4,), -1), [None, None], 0).tolist() == [0, 0, 0, 0]


def test_one_query_takes_its_best_instance_several_are_assigned_jointly():
    assert assign_queries(torch.tensor([[0.2, 0.7, 0.4]])) == [1]
    # Each query alone prefers instance 0; jointly 0.85 + 0.8 beats 0.9 + 0.3.
    scores = torch.tensor([[0.9, 0.8], [0.85, 0.3]])
    assert assign_queries(scores) == [1, 0]
    assert assign_queries(torch.tensor([[0.1], [0.9]])) == [None, 0]  # more queries than instances
    assert assign_queries(torch.zeros(2, 0)) == [None, None]


def test_instance_labels_put_queries_first_then_the_others():
    instances = torch.tensor([-1, 0, 1, 2, 2])
    labels = instance_labels(instances, [2, None], 3)
    assert labels.tolist() == [0, 3, 4, 1, 1]  # query 1 -> instance 2; instances 0 and 1 follow (3, 4)


@pytest.mark.parametrize(
    "query, span",
    [
        ("<my-mug> mug", "<my-mug> mug"),
        ("a <my-mug> Mug with cola", "<my-mug> Mug"),
        ("<my-mug> on the left", "<my-mug>"),
        ("a red mug", "mug"),
        ("the red cup", "the red cup"),
    ],
)
def test_query_span(query, span):
    start, end = query_span(query, "mug")
    assert query[start:end] == span


def test_query_prompt_spans_the_identifier_and_the_class(tiny_sd):
    prompt = query_prompt(tiny_sd.tokenizer, "a  <my-mug> mug with cola", "mug", {"my-mug": 2})
    assert prompt.text == "a <my-mug> mug with cola"
    start, end = prompt.class_spans[0]
    assert prompt.concept_positions == {"my-mug": [start, start + 1]}
    assert prompt.ids[start + 2 : end] == tiny_sd.tokenizer("mug", add_special_tokens=False)["input_ids"]


# --- the pipeline on a planted scene -------------------------------------------------------


COLOURS = {0: (0.5, 0.4, 0.3), 1: (1.0, 0.0, 0.0), 2: (0.0, 0.0, 1.0)}  # table, red mug, blue mug


def planted_pass(calls: list):
    """A stand-in for the SelfCross UNet pass: self-attention groups the scene's regions; a class
    span attends to both mugs, except a concept's span, which attends by the dot product of the
    concept's vector with each position's colour (the planted signal), and "blue" to the blue mug."""
    regions = scene_regions()
    colours = torch.tensor([COLOURS[int(r)] for r in regions.flatten()])  # (64, 3)

    def run(sd, latents, prompts, timestep, seed, concepts=None):
        calls.append(([prompt.text for prompt in prompts], sorted(concepts or {})))
        cross = torch.full((len(prompts), GRID * GRID, 77), 0.01)
        for row, prompt in enumerate(prompts):
            ((start, end),) = prompt.class_spans
            if prompt.concept_positions:
                (identifier,) = prompt.concept_positions
                attention = colours @ concepts[identifier].vectors[0, :3]
            elif "blue" in prompt.text:
                attention = (regions.flatten() == 2).float()
            else:
                attention = (regions.flatten() > 0).float()
            cross[row, :, start:end] = attention[:, None]
        store = AttentionStore()
        store.add("cross", cross)
        store.add("self", block_self_attention(regions)[None].expand(len(prompts), -1, -1))
        return store

    return run


def concept_of(colour) -> Concept:
    """A concept whose vector's first three values are the colour of the photographed mug."""
    vectors = torch.zeros(1, 32)
    vectors[0, :3] = torch.tensor(colour)
    return Concept("my-mug", "mug", vectors, None)


@pytest.mark.parametrize("colour, instance_label", [((1.0, 0.0, 0.0), 1), ((0.0, 0.0, 1.0), 2)])
def test_the_concept_picks_its_mug_among_two_look_alikes(tiny_sd, monkeypatch, colour, instance_label):
    calls = []
    monkeypatch.setattr(referring, "selfcross_pass", planted_pass(calls))
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    out = segment_referring(
        tiny_sd, image, "mug", ["<my-mug> mug"], concepts={"my-mug": concept_of(colour)}, resolution=128
    )
    assert out.instances == 2
    regions = scene_regions().repeat_interleave(HEIGHT // GRID, 0).repeat_interleave(WIDTH // GRID, 1).numpy()
    other = 3 - instance_label
    assert (out.labels[regions == instance_label] == 1).mean() > 0.9  # the query's segment: its mug
    assert (out.labels[regions == other] == 2).mean() > 0.9  # the other mug: an unlabelled instance
    assert (out.labels[regions == 0] == 0).mean() > 0.9
    assert out.scores[1] == pytest.approx(1.0)
    assert calls == [(["a photo including mug."], []), (["<my-mug> mug"], ["my-mug"])]


def test_several_queries_are_assigned_jointly(tiny_sd, monkeypatch):
    calls = []
    monkeypatch.setattr(referring, "selfcross_pass", planted_pass(calls))
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    # "a mug" attends to both mugs equally: alone it would take the first (the red one, the concept's);
    # assigned jointly with the concept's query it gets the other.
    queries = ["<my-mug> mug", "a mug"]
    out = segment_referring(
        tiny_sd, image, "mug", queries, concepts={"my-mug": concept_of((1.0, 0.0, 0.0))}, resolution=128
    )
    regions = scene_regions().repeat_interleave(HEIGHT // GRID, 0).repeat_interleave(WIDTH // GRID, 1).numpy()
    assert (out.labels[regions == 1] == 1).mean() > 0.9 and (out.labels[regions == 2] == 2).mean() > 0.9
    assert np.allclose(out.instance_scores, [[1.0, 0.0], [1.0, 1.0]], atol=1e-5)
    alone = segment_referring(tiny_sd, image, "mug", ["a mug"], resolution=128)
    assert (alone.labels[regions == 1] == 1).mean() > 0.9
    # A concept without attention weights (Textual Inversion) shares the plain queries' pass.
    assert calls[1] == (queries, ["my-mug"])


def test_bad_queries_are_refused(tiny_sd):
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    with pytest.raises(ValueError, match="1 to 8 queries"):
        segment_referring(tiny_sd, image, "mug", [])
    with pytest.raises(ValueError, match="more than one concept"):
        segment_referring(tiny_sd, image, "mug", ["<a> and <b>"])
    with pytest.raises(ValueError, match="not a known concept"):
        segment_referring(tiny_sd, image, "mug", ["<a> mug"], resolution=128)


# --- on the tiny models ----------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny_sd", "tiny_sd2"])
def test_referring_runs_on_both_topologies(request, model):
    sd = request.getfixturevalue(model)
    width = sd.text_encoder.get_input_embeddings().weight.shape[1]
    generator = torch.Generator().manual_seed(0)
    kv = {
        name: (
            layer.to_k.weight + 0.1 * torch.randn(layer.to_k.weight.shape, generator=generator),
            layer.to_v.weight.clone(),
        )
        for name, layer in cross_attention_layers(sd.unet).items()
    }
    concept = Concept("my-mug", "mug", torch.randn(2, width, generator=generator), kv)
    image = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    queries = ["a <my-mug> mug with cola", "a red mug"]
    out = segment_referring(sd, image, "mug", queries, concepts={"my-mug": concept}, resolution=128)
    again = segment_referring(sd, image, "mug", queries, concepts={"my-mug": concept}, resolution=128)
    assert out.labels.shape == (HEIGHT, WIDTH) and out.labels.dtype == np.uint8  # narrowest
    assert 0 <= out.labels.min() and out.labels.max() <= len(queries) + out.instances
    assert np.array_equal(out.labels, again.labels) and out.scores == again.scores
    assert set(out.scores) <= {1, 2} and 1 <= out.instances <= 8
    assert {"latent", "unet", "cluster", "queries"} <= set(out.timings_ms)
