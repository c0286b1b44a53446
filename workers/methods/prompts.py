"""Text prompts for the SD-based text methods, with the token span of every class (methods 2.1, 2.2).

The prompt is built piece by piece ("a photo including", each class, the separators, "."), and each
piece is tokenized on its own. A class's span is then known from the construction order, not
searched for: "car" and "car seat", a class named "photo" (which also occurs in the prefix) or the
same name twice all get their own span, and the ids inside a span are exactly the class tokenized
alone (the token-id subsequence of methods 2.1). CLIP's pre-tokenizer splits at spaces and between
letters and punctuation, so the pieces' ids concatenated equal the tokenizer's ids for the whole text;
the one exception is punctuation touching a separator ("c++" then "," is "+," in one token), where the
concatenation keeps the class's own tokens. Encode `Prompt.ids` (see `pad_ids`), never re-tokenize
`Prompt.text`.

A concept's identifier written `<identifier>` inside a class ("<my-mug> mug") takes as many
positions as the concept has vectors (methods 2.4); `Prompt.concept_positions` says where, and the
text encoder gets the vectors there (workers.models.concept_hooks.token_embeddings). The class's
span covers the identifier and the words around it.
"""

from dataclasses import dataclass, field

import torch

from attnseg.concept_files import IDENTIFIER

PROMPT_PREFIX = "a photo including"


@dataclass
class Prompt:
    """A tokenized prompt.

    text: the prompt as written.
    ids: token ids with BOS and EOS, unpadded (at most the encoder's 77).
    spans: [start, end) token positions in the encoder's 77 positions, one per item: the classes in
        order, then the background words.
    class_names: the reported classes (the first len(class_names) spans).
    background_words: words that only steer attention away from the classes; never reported.
    concept_positions: identifier -> its placeholder positions, in order (one per vector).
    """

    text: str
    ids: list[int]
    spans: list[tuple[int, int]]
    class_names: list[str]
    background_words: list[str] = field(default_factory=list)
    concept_positions: dict[str, list[int]] = field(default_factory=dict)

    @property
    def class_spans(self) -> list[tuple[int, int]]:
        return self.spans[: len(self.class_names)]

    @property
    def background_spans(self) -> list[tuple[int, int]]:
        return self.spans[len(self.class_names) :]


class PromptTooLongError(ValueError):
    """The prompt needs more tokens than the text encoder holds.

    needed: tokens the prompt needs, BOS and EOS included; limit: the encoder's length (77);
    token_counts: (item, tokens) for every class and background word, in prompt order.
    """

    def __init__(self, needed: int, limit: int, token_counts: list[tuple[str, int]], num_classes: int):
        self.needed = needed
        self.limit = limit
        self.token_counts = token_counts
        distinct_classes = dict(token_counts[:num_classes])
        longest = sorted(distinct_classes.items(), key=lambda item: -item[1])[:5]
        listing = ", ".join(f"'{name}' ({count})" for name, count in longest)
        background_tokens = sum(count for _, count in token_counts[num_classes:])
        message = (
            f"the prompt needs {needed} tokens but the text encoder holds {limit}: drop or shorten "
            f"classes to save {needed - limit} tokens (each class costs its tokens plus 1 for the "
            f"separator; longest classes in tokens: {listing})"
        )
        if background_tokens:
            message += f"; {background_tokens} of the {needed} tokens are background words"
        super().__init__(message)


def prompt_pieces(classes: list[str], background_words: list[str] = ()) -> list[tuple[str, int | None]]:
    """The prompt as (text, item index or None for fixed text) pieces; "".join gives the prompt.

    Exact rule: items = classes + background words, each with its whitespace collapsed to single
    spaces. Without background words: "a photo including " + ", ".join(classes) + ".".
    With background words: "a photo including " + ", ".join(items[:-1]) + ", and " + items[-1] + ".",
    e.g. "a photo including cat, dog, tree, and river." (one background word: "a photo including
    cat, and tree."). The reference builds "cat, , and tree." for a single background word; we don't.
    """
    items = [" ".join(item.split()) for item in [*classes, *background_words]]
    pieces: list[tuple[str, int | None]] = [(PROMPT_PREFIX + " ", None)]
    for index, item in enumerate(items):
        if index > 0:
            before_last_background = bool(background_words) and index == len(items) - 1
            pieces.append((", and " if before_last_background else ", ", None))
        pieces.append((item, index))
    pieces.append((".", None))
    return pieces


def tokenize_text(tokenizer, text: str, vector_counts: dict[str, int]) -> tuple[list[int], dict[str, list[int]]]:
    """Token ids of text without BOS/EOS, each `<identifier>` as vector_counts[identifier] placeholder
    ids (the unknown token: the text encoder's embedding of it is replaced), and the placeholders'
    offsets in those ids per identifier. Raises ValueError for an identifier not in vector_counts."""
    ids: list[int] = []
    positions: dict[str, list[int]] = {}
    for index, part in enumerate(IDENTIFIER.split(text)):
        if index % 2 == 0:  # literal text between identifiers
            ids.extend(tokenizer(part, add_special_tokens=False)["input_ids"] if part.strip() else [])
            continue
        if part not in vector_counts:
            raise ValueError(f"<{part}> is not a known concept")
        positions.setdefault(part, []).extend(range(len(ids), len(ids) + vector_counts[part]))
        ids.extend([tokenizer.unk_token_id] * vector_counts[part])
    return ids, positions


def prompt_from_pieces(
    tokenizer,
    pieces: list[tuple[str, int | None]],
    names: list[str],
    num_classes: int,
    vector_counts: dict[str, int] | None = None,
) -> Prompt:
    """Tokenize pieces (text, item index or None for fixed text), "".join(texts) being the prompt.

    names: the items (classes, then background words); item i's span is its piece's tokens.
    Raises ValueError for an item without tokens, PromptTooLongError when the ids (BOS and EOS
    included) exceed tokenizer.model_max_length.
    """
    ids = [tokenizer.bos_token_id]
    spans: list[tuple[int, int]] = []
    token_counts: list[tuple[str, int]] = []
    concept_positions: dict[str, list[int]] = {}
    for text, item_index in pieces:
        piece_ids, piece_positions = tokenize_text(tokenizer, text, vector_counts or {})
        for identifier, offsets in piece_positions.items():
            concept_positions.setdefault(identifier, []).extend(len(ids) + offset for offset in offsets)
        if item_index is not None:
            name = names[item_index]
            if not piece_ids:
                raise ValueError(f"'{name}' has no tokens")
            spans.append((len(ids), len(ids) + len(piece_ids)))
            token_counts.append((name, len(piece_ids)))
        ids.extend(piece_ids)
    ids.append(tokenizer.eos_token_id)
    limit = tokenizer.model_max_length
    if len(ids) > limit:
        raise PromptTooLongError(len(ids), limit, token_counts, num_classes)
    text = "".join(text for text, _ in pieces)
    return Prompt(text, ids, spans, list(names[:num_classes]), list(names[num_classes:]), concept_positions)


def build_prompt(
    tokenizer, classes: list[str], background_words: list[str] = (), vector_counts: dict[str, int] | None = None
) -> Prompt:
    """Tokenize the selfcross prompt (methods 2.2) and locate every class's tokens.

    tokenizer: SD's CLIPTokenizer (bos/eos ids and model_max_length are read from it).
    vector_counts: identifier -> vectors of the concepts the classes may name as `<identifier>`.
    Raises ValueError for no classes, an item without tokens or an unknown identifier,
    PromptTooLongError when the ids (BOS and EOS included) exceed tokenizer.model_max_length.
    """
    if not classes:
        raise ValueError("at least one class is needed")
    background_words = list(background_words)
    names = [*classes, *background_words]
    return prompt_from_pieces(tokenizer, prompt_pieces(classes, background_words), names, len(classes), vector_counts)


def word_spans(tokenizer, words: list[str]) -> Prompt:
    """DiffSeg's vocabulary naming (methods 1.10) uses the same prompt: words as classes, no
    background words; `Prompt.class_spans` maps each word to its tokens."""
    return build_prompt(tokenizer, words)


def pad_ids(prompt: Prompt, tokenizer) -> torch.Tensor:
    """(1, model_max_length) LongTensor of the prompt's ids padded with the tokenizer's pad id
    (EOS for SD 1.x, "!" for SD 2.x), ready for the text encoder."""
    length = tokenizer.model_max_length
    padded = prompt.ids + [tokenizer.pad_token_id] * (length - len(prompt.ids))
    return torch.tensor([padded], dtype=torch.long)


def mean_over_spans(maps: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """Average token maps over each span.

    maps: (..., T) with T token positions (77); spans: C [start, end) pairs.
    Returns (..., C).
    """
    for start, end in spans:
        if not 0 <= start < end <= maps.shape[-1]:
            raise ValueError(f"span ({start}, {end}) is empty or outside {maps.shape[-1]} tokens")
    return torch.stack([maps[..., start:end].mean(-1) for start, end in spans], dim=-1)
