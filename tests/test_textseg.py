"""Text segmentation (workers/methods/textseg.py): planted signals for each step, invariants end to end on the
tiny random SD and CLIP at resolution 256 on a non-square image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workers.methods import selfcross, textseg
from workers.methods.prompts import PromptTooLongError, build_prompt
from workers.methods.selfcross import selfcross_draw
from workers.methods.textseg import (
    gem_channels,
    name_segments,
    propagate_class_maps,
    segment_text,
    split_classes,
)
from workers.models.attention import AttentionStore

CLASSES = ["cat", "dog", "big tree"]
HEIGHT, WIDTH = 90, 120
RESOLUTION = 256
# 30 names of 5 tokens each: 30 * (5 + 1 separator) tokens need three 77-token prompts.
LONG_CLASSES = [
    f"small {colour} {thing} with stripes"
    for colour in ("red", "green", "blue", "black", "white")
    for thing in ("car", "dog", "cat", "house", "tree", "boat")
]


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def runs(tiny_sd, tiny_clip, image):
    """Every method twice with the same seed; the first run also records its progress reports."""
    results = {}
    for method in textseg.METHODS:
        reports = []
        first = segment_text(
            tiny_sd,
            tiny_clip,
            image,
            CLASSES,
            method=method,
            resolution=RESOLUTION,
            report=lambda stage, fraction, reports=reports: reports.append((stage, fraction)),
        )
        second = segment_text(tiny_sd, tiny_clip, image, CLASSES, method=method, resolution=RESOLUTION)
        results[method] = (first, second, reports)
    return results


# --- end to end ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", textseg.METHODS)
def test_labels_at_image_size_with_scores_of_present_labels(runs, method):
    out, _, reports = runs[method]
    assert out.labels.shape == (HEIGHT, WIDTH) and out.labels.dtype == np.uint8  # narrowest
    assert 0 <= out.labels.min() and out.labels.max() <= len(CLASSES)
    assert set(out.scores) == set(np.unique(out.labels).tolist())
    assert all(math.isfinite(score) for score in out.scores.values())
    assert out.passes == {"selfcross": 1, "gem": 0, "gem_refined": 1, "cluster": 1}[method]
    assert out.timings_ms and all(ms >= 0 for ms in out.timings_ms.values())
    fractions = [fraction for _, fraction in reports]
    assert fractions == sorted(fractions) and all(0 <= f <= 1 for f in fractions)


@pytest.mark.parametrize("method", textseg.METHODS)
def test_same_seed_same_labels(runs, method):
    first, second, _ = runs[method]
    assert np.array_equal(first.labels, second.labels)
    assert first.scores == second.scores


def test_gem_labels_follow_the_classes(runs, tiny_clip, image):
    out = runs["gem"][0]
    # Reversing the class list reverses the class labels: channels are permuted, background stays 0.
    reversed_out = segment_text(None, tiny_clip, image, CLASSES[::-1], method="gem")
    relabelled = np.where(out.labels > 0, len(CLASSES) + 1 - out.labels, 0)
    assert np.array_equal(reversed_out.labels, relabelled)
    # Another class name gives other logits, so other scores.
    other = segment_text(None, tiny_clip, image, ["car", *CLASSES[1:]], method="gem")
    assert other.scores != out.scores
    # Without background every pixel gets a class.
    no_background = segment_text(None, tiny_clip, image, CLASSES, method="gem", background=False)
    assert no_background.labels.min() >= 1 and 0 not in no_background.scores


def test_selfcross_splits_a_long_class_list_and_averages_each_prompts_spans(tiny_sd, image, monkeypatch):
    prompts = split_classes(tiny_sd.tokenizer, LONG_CLASSES)
    seen = []
    real_selfcross_scores = selfcross.selfcross_scores

    def spy(cross_by_grid, layers_by_grid, self_attn, spans, *args, **kwargs):
        scores = real_selfcross_scores(cross_by_grid, layers_by_grid, self_attn, spans, *args, **kwargs)
        seen.append((spans, scores.shape[0]))
        return scores

    monkeypatch.setattr(selfcross, "selfcross_scores", spy)
    out = segment_text(tiny_sd, None, image, LONG_CLASSES, resolution=RESOLUTION, background=False)
    assert out.passes == len(prompts) >= 2
    assert [spans for spans, _ in seen] == [prompt.class_spans for prompt in prompts]
    assert sum(count for _, count in seen) == len(LONG_CLASSES)  # a map for every class id
    assert out.labels.shape == (HEIGHT, WIDTH)
    assert 1 <= out.labels.min() and out.labels.max() <= len(LONG_CLASSES)


def test_selfcross_draws_use_consecutive_seeds_and_are_averaged(tiny_sd, image, monkeypatch):
    """The UNet pass is replaced by planted stores: draw i (seed + i) plants class i's region."""
    grid = RESOLUTION // 8 // 2  # the self layer's grid
    seeds = []

    def planted_pass(sd, latents, prompts, timestep, draw_seeds, concepts=None):
        (seed,) = draw_seeds  # one image
        seeds.append((seed, timestep))
        column = seed - 10  # draw 0 -> column 0, draw 1 -> column 1
        cross = torch.zeros(1, grid, grid, 77)
        for start, end in prompts[0].class_spans:
            cross[0, :, column, start:end] = 1.0
        store = AttentionStore()
        store.add("cross", cross.reshape(1, grid * grid, 77))
        store.add("self", torch.eye(grid * grid)[None])
        return store

    monkeypatch.setattr(textseg, "selfcross_pass", planted_pass)
    out = segment_text(tiny_sd, None, image, ["cat", "dog"], samples=2, seed=10, resolution=RESOLUTION)
    assert seeds == [(10, 150), (11, 150)]
    # Each draw's maps are one-hot columns; their mean is 0.5 on columns 0 and 1, so background
    # (1 - 0.5)^2 = 0.25 loses there and wins elsewhere, and the two classes tie (lowest label wins).
    assert 0.38 < out.scores[1] <= 0.5  # label 1 holds where 0.5-ish beats (1 - value)^2
    assert 0 in out.scores and 2 not in out.scores

    # The thresholds reach the steps: gate level as given, and a background threshold of 0.75
    # gives bg = (1.5 - 0.5)^2 = 1 on the class columns, so background wins everywhere.
    gates = []
    scores = selfcross.selfcross_scores
    monkeypatch.setattr(selfcross, "selfcross_scores", lambda *args: gates.append(args[4]) or scores(*args))
    out = segment_text(
        tiny_sd,
        None,
        image,
        ["cat", "dog"],
        samples=2,
        seed=10,
        resolution=RESOLUTION,
        gate_threshold=0.5,
        background_threshold=0.75,
    )
    assert gates == [0.5, 0.5] and set(out.scores) == {0}


def test_prompt_too_long_for_one_class_raises(tiny_sd, image):
    with pytest.raises(PromptTooLongError):
        segment_text(tiny_sd, None, image, ["cat", "dog " * 80])


def test_bad_arguments(tiny_clip, image):
    with pytest.raises(ValueError, match="unknown method"):
        segment_text(None, tiny_clip, image, CLASSES, method="nope")
    with pytest.raises(ValueError, match="at least one class"):
        segment_text(None, tiny_clip, image, [], method="gem")
    with pytest.raises(ValueError, match="CLIP"):
        segment_text(None, None, image, CLASSES, method="gem")
    with pytest.raises(ValueError, match="Stable Diffusion"):
        segment_text(None, tiny_clip, image, CLASSES, method="gem_refined")


# --- selfcross steps ----------------------------------------------------------------------


def test_split_classes_is_greedy_and_every_prompt_fits(tiny_sd):
    tokenizer = tiny_sd.tokenizer
    background_words = ["river", "sky"]
    prompts = split_classes(tokenizer, LONG_CLASSES, background_words)
    assert len(prompts) >= 2
    assert [name for prompt in prompts for name in prompt.class_names] == LONG_CLASSES
    assert all(len(prompt.ids) <= tokenizer.model_max_length for prompt in prompts)
    assert all(prompt.background_words == background_words for prompt in prompts)
    start = 0
    for prompt in prompts[:-1]:  # greedy: the next class would not have fitted
        end = start + len(prompt.class_names)
        with pytest.raises(PromptTooLongError):
            build_prompt(tokenizer, LONG_CLASSES[start : end + 1], background_words)
        start = end
    assert len(split_classes(tokenizer, CLASSES)) == 1
    with pytest.raises(PromptTooLongError):
        split_classes(tokenizer, ["cat", "dog " * 80])


def test_selfcross_draw_averages_exactly_each_prompts_class_spans(tiny_sd):
    """Class tokens attend to their own column band; the tokens right before and after every span
    attend to a decoy band. With S = identity the SelfCross maps are exactly the class bands."""
    grid = 8
    prompts = [
        build_prompt(tiny_sd.tokenizer, ["red sports car", "dog"]),
        build_prompt(tiny_sd.tokenizer, ["traffic light"]),
    ]
    bands = [(0, 2), (2, 4), (4, 6)]  # columns of the classes, in order over the prompts
    decoy = (6, 8)
    cross = torch.zeros(len(prompts), grid, grid, 77)
    expected = torch.zeros(len(bands), grid, grid)
    class_index = 0
    for row, prompt in enumerate(prompts):
        for start, end in prompt.class_spans:
            first, last = bands[class_index]
            cross[row, :, first:last, start:end] = 1.0
            cross[row, :, decoy[0] : decoy[1], [start - 1, end]] = 1.0
            expected[class_index, :, first:last] = 1.0
            class_index += 1
    store = AttentionStore()
    store.add("cross", cross.reshape(len(prompts), grid * grid, 77))
    store.add("self", torch.eye(grid * grid).expand(len(prompts), -1, -1))
    assert torch.equal(selfcross_draw(store, prompts), expected)


# --- GEM-based steps ----------------------------------------------------------------------


def test_gem_channels_background_is_the_voc_recipe():
    logits = torch.zeros(20, 2, 2)
    logits[3, 0, 0] = 1.0  # one confident pixel; the rest is 20 classes tied
    plain = gem_channels(logits, background=False)
    assert torch.allclose(plain, torch.softmax(logits / 0.01, dim=0))
    channels = gem_channels(logits, background=True)
    probs = torch.softmax(logits / 0.1, dim=0)
    assert channels.shape == (21, 2, 2)
    assert torch.allclose(channels[1:], probs)
    assert torch.allclose(channels[0], (1 - probs.max(0).values - 0.8).clamp(min=0))
    winners = channels.argmax(0)
    assert winners[0, 0] == 4  # the confident class (channel 1 + 3)
    assert (winners.flatten()[1:] == 0).all()  # tied pixels: max 0.05 < 0.1, background wins


def test_propagate_class_maps_is_row_normalised_transpose():
    generator = torch.Generator().manual_seed(0)
    self_attention = torch.rand(16, 16, generator=generator).softmax(1)
    class_maps = torch.rand(3, 4, 4, generator=generator)
    transition = self_attention.T / self_attention.T.sum(1, keepdim=True)
    expected = (transition @ class_maps.flatten(1).T).T.reshape(3, 4, 4)
    assert torch.allclose(propagate_class_maps(self_attention, class_maps), expected, atol=1e-6)


def test_propagate_class_maps_averages_within_attention_blocks():
    regions = torch.arange(4).div(2, rounding_mode="floor").expand(4, 4).flatten()  # left / right halves
    same = (regions[:, None] == regions[None, :]).float()
    self_attention = same / same.sum(1, keepdim=True)
    class_maps = torch.arange(16.0).view(1, 4, 4)
    out = propagate_class_maps(self_attention, class_maps)[0]
    left, right = class_maps[0, :, :2].mean(), class_maps[0, :, 2:].mean()
    assert torch.allclose(out[:, :2], left.expand(4, 2)) and torch.allclose(out[:, 2:], right.expand(4, 2))


def test_bicubic_argmax_matches_direct_argmax_over_several_chunks():
    channels = torch.rand(textseg.diffseg.UPSAMPLE_CHUNK + 7, 6, 6, generator=torch.Generator().manual_seed(1))
    direct = F.interpolate(channels[None], size=(13, 17), mode="bicubic", align_corners=False)[0].argmax(0)
    assert torch.equal(textseg.diffseg.proposals_to_labels(channels.flatten(1), (13, 17), mode="bicubic"), direct)


def test_name_segments_picks_the_channel_with_the_highest_mean():
    segments = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]])
    channels = torch.zeros(3, 4, 4)
    channels[0, 2:] = 0.9  # background channel wins the bottom segment
    channels[2, :, :2] = 0.6
    channels[1, :, 2:] = 0.7
    channels[2, :, 2:] = 0.5
    assert name_segments(segments, channels).tolist() == [2, 1, 0]


def test_label_scores_are_means_of_each_labels_own_channel():
    labels = torch.tensor([[1, 1, 3, 3], [1, 1, 3, 3]])
    channels = torch.zeros(3, 2, 4)  # labels 1, 2, 3 (no background: first label 1)
    channels[0] = torch.tensor([[0.2, 0.4, 9.0, 9.0], [0.6, 0.8, 9.0, 9.0]])
    channels[1] = 5.0  # label 2 is absent: no score
    channels[2, :, 2:] = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    assert textseg.diffseg.label_scores(labels, channels, first_label=1) == pytest.approx({1: 0.5, 3: 0.5})
