import pytest
import torch

from workers.methods.prompts import (
    PromptTooLongError,
    build_prompt,
    mean_over_spans,
    pad_ids,
    word_spans,
)
from workers.models.tiny_random import clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


def own_ids(tokenizer, name):
    return tokenizer(name, add_special_tokens=False)["input_ids"]


def span_tokens(tokenizer, prompt, span):
    return tokenizer.convert_ids_to_tokens(prompt.ids[span[0] : span[1]])


def test_tokenizer_matches_clip_ids(tokenizer):
    # Hand-checked against open_clip's SimpleTokenizer.
    assert tokenizer("a photo including car seat, car.")["input_ids"] == [
        49406,
        320,
        1125,
        2814,
        1615,
        4922,
        267,
        1615,
        269,
        49407,
    ]


def test_prompt_text_and_ids(tokenizer):
    prompt = build_prompt(tokenizer, ["bottle", "chair", "sofa"])
    assert prompt.text == "a photo including bottle, chair, sofa."
    assert prompt.ids == tokenizer(prompt.text)["input_ids"]
    assert prompt.class_names == ["bottle", "chair", "sofa"]
    assert prompt.spans == [(4, 5), (6, 7), (8, 9)]  # BOS, a, photo, including, bottle, ",", ...


def test_background_words_joining_rule(tokenizer):
    prompt = build_prompt(tokenizer, ["train", "cat"], ["railway", "track"])
    assert prompt.text == "a photo including train, cat, railway, and track."
    assert prompt.ids == tokenizer(prompt.text)["input_ids"]
    assert [span_tokens(tokenizer, prompt, span) for span in prompt.class_spans] == [["train</w>"], ["cat</w>"]]
    assert [span_tokens(tokenizer, prompt, span) for span in prompt.background_spans] == [
        ["railway</w>"],
        ["track</w>"],
    ]
    assert prompt.class_names == ["train", "cat"]
    assert prompt.background_words == ["railway", "track"]

    single = build_prompt(tokenizer, ["cat"], ["tree"])
    assert single.text == "a photo including cat, and tree."
    assert span_tokens(tokenizer, single, single.background_spans[0]) == ["tree</w>"]


@pytest.mark.parametrize("name", ["person with clothes", "traffic light", "tv monitor screen"])
def test_multi_token_class(tokenizer, name):
    prompt = build_prompt(tokenizer, ["dog", name, "cat"])
    start, end = prompt.class_spans[1]
    assert end - start == len(name.split())
    assert prompt.ids[start:end] == own_ids(tokenizer, name)
    assert tokenizer.decode(prompt.ids[start:end]) == name
    assert span_tokens(tokenizer, prompt, prompt.class_spans[2]) == ["cat</w>"]


@pytest.mark.parametrize("classes", [["car", "car seat"], ["car seat", "car"], ["car seat", "car", "car"]])
def test_names_inside_other_names(tokenizer, classes):
    prompt = build_prompt(tokenizer, classes)
    assert prompt.ids == tokenizer(prompt.text)["input_ids"]
    assert len(set(prompt.spans)) == len(classes)
    for name, (start, end) in zip(classes, prompt.spans):
        assert tokenizer.decode(prompt.ids[start:end]) == name
    # Each class's span starts after the previous class's span and its separator.
    starts = [start for start, _ in prompt.spans]
    ends = [end for _, end in prompt.spans]
    assert all(start == end + 1 for start, end in zip(starts[1:], ends[:-1]))


def test_class_that_occurs_in_the_prefix(tokenizer):
    prompt = build_prompt(tokenizer, ["photo"])
    assert prompt.spans == [(4, 5)]  # not the "photo" of "a photo including" at position 2


def test_punctuation_in_names(tokenizer):
    prompt = build_prompt(tokenizer, ["mr. potato-head", "dog"])
    assert prompt.ids == tokenizer(prompt.text)["input_ids"]
    assert span_tokens(tokenizer, prompt, prompt.spans[0]) == ["mr</w>", ".</w>", "potato</w>", "-</w>", "head</w>"]
    assert span_tokens(tokenizer, prompt, prompt.spans[1]) == ["dog</w>"]


def test_punctuation_touching_a_separator_keeps_the_class_tokens(tokenizer):
    # Tokenized as one text, "c++," ends in the token "+,"; the span keeps the class's own tokens.
    prompt = build_prompt(tokenizer, ["c++", "dog"])
    start, end = prompt.spans[0]
    assert prompt.ids[start:end] == own_ids(tokenizer, "c++")
    assert prompt.ids[end] == own_ids(tokenizer, ",")[0]
    assert span_tokens(tokenizer, prompt, prompt.spans[1]) == ["dog</w>"]


def test_uppercase_and_whitespace(tokenizer):
    messy = build_prompt(tokenizer, ["  Traffic \t LIGHT ", "Dog"])
    clean = build_prompt(tokenizer, ["traffic light", "dog"])
    assert messy.text == "a photo including Traffic LIGHT, Dog."
    assert messy.ids == clean.ids
    assert messy.spans == clean.spans
    assert messy.class_names == ["  Traffic \t LIGHT ", "Dog"]  # reported as given


def test_prompt_that_exactly_fits(tokenizer):
    # BOS + 3 prefix tokens + 36 classes + 35 commas + "." + EOS = 77.
    prompt = build_prompt(tokenizer, ["cat"] * 36)
    assert len(prompt.ids) == 77
    assert prompt.ids == tokenizer(prompt.text)["input_ids"]
    assert prompt.spans[-1] == (74, 75)


def test_prompt_one_token_over(tokenizer):
    classes = ["cat"] * 35 + ["traffic light"]
    with pytest.raises(PromptTooLongError) as caught:
        build_prompt(tokenizer, classes)
    error = caught.value
    text = "a photo including " + ", ".join(classes) + "."
    assert error.needed == len(tokenizer(text)["input_ids"]) == 78
    assert error.limit == 77
    assert "78" in str(error) and "77" in str(error) and "'traffic light' (2)" in str(error)
    assert isinstance(error, ValueError)


def test_background_words_count_toward_the_limit(tokenizer):
    with pytest.raises(PromptTooLongError) as caught:
        build_prompt(tokenizer, ["cat"] * 36, ["tree"])
    assert caught.value.needed == 80  # ", and tree"
    assert "1 of the 80 tokens are background words" in str(caught.value)
    assert str(caught.value).count("'cat'") == 1


def test_invalid_classes(tokenizer):
    with pytest.raises(ValueError):
        build_prompt(tokenizer, [])
    with pytest.raises(ValueError, match="no tokens"):
        build_prompt(tokenizer, ["cat", "   "])


def test_word_spans_is_the_same_prompt(tokenizer):
    prompt = word_spans(tokenizer, ["sky", "traffic light"])
    assert prompt == build_prompt(tokenizer, ["sky", "traffic light"])
    assert prompt.spans == [(4, 5), (6, 8)]


def test_pad_ids(tokenizer):
    prompt = build_prompt(tokenizer, ["cat"])
    padded = pad_ids(prompt, tokenizer)
    assert padded.shape == (1, 77) and padded.dtype == torch.long
    assert padded[0, : len(prompt.ids)].tolist() == prompt.ids
    assert (padded[0, len(prompt.ids) :] == tokenizer.pad_token_id).all()
    assert padded[0].tolist() == tokenizer(prompt.text, padding="max_length", max_length=77)["input_ids"]


def test_mean_over_spans():
    maps = torch.zeros(2, 3, 77)
    maps[..., 4] = 1.0
    maps[..., 5] = 3.0
    maps[0, 0, 10] = 6.0
    means = mean_over_spans(maps, [(4, 6), (5, 6), (9, 12)])
    assert means.shape == (2, 3, 3)
    assert torch.allclose(means[..., 0], torch.full((2, 3), 2.0))
    assert torch.allclose(means[..., 1], torch.full((2, 3), 3.0))
    assert means[0, 0, 2] == 2.0 and means[1, 2, 2] == 0.0
    with pytest.raises(ValueError):
        mean_over_spans(maps, [(5, 5)])
    with pytest.raises(ValueError):
        mean_over_spans(maps, [(70, 78)])
