"""Concepts on the tiny random SD models (docs/methods.md 2.4): the hook points change nothing they
should not, training moves only the concept's own tensors, files round-trip in diffusers' formats,
and shapes are checked against the model."""

from __future__ import annotations

import io
import json
import struct
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

from attnseg.concept_files import EMBEDDINGS_FILE, KV_FILE, ConceptFileError, check_shapes
from attnseg.tensor_files import TensorFileError, safetensors_shapes
from tests.support import deflate_bomb
from workers.methods.concepts import class_word_embedding, train_concept
from workers.methods.passes import encode_with_concepts
from workers.methods.prompts import build_prompt
from workers.methods.textseg import segment_text
from workers.models.attention import AttentionStore, CapturingAttnProcessor, capture_attention
from workers.models.concept import Concept, ConceptMismatchError, check_concept, concept_shapes
from workers.models.concept_hooks import concept_attention, cross_attention_layers, token_embeddings
from workers.models.sd_ops import encode_prompts, unet_noise

RESOLUTION = 128


def photo(colour=(220, 30, 30), size=48) -> np.ndarray:
    image = np.full((size, size, 3), 120, np.uint8)
    image[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = colour
    return image


def snapshot(sd) -> dict[str, torch.Tensor]:
    return {
        f"{part}.{name}": tensor.clone()
        for part in ("unet", "text_encoder", "vae")
        for name, tensor in getattr(sd, part).state_dict().items()
    }


def unchanged(sd, before: dict[str, torch.Tensor]) -> bool:
    after = snapshot(sd)
    stock = not any(
        isinstance(p, CapturingAttnProcessor) or type(p).__name__ == "ConceptAttnProcessor"
        for p in sd.unet.attn_processors.values()
    )
    grads = all(
        p.grad is None and not p.requires_grad for part in (sd.unet, sd.text_encoder, sd.vae) for p in part.parameters()
    )
    return stock and grads and after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def random_kv(sd, seed=0, scale=1.0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (
            layer.to_k.weight + scale * torch.randn(layer.to_k.weight.shape, generator=generator),
            layer.to_v.weight + scale * torch.randn(layer.to_v.weight.shape, generator=generator),
        )
        for name, layer in cross_attention_layers(sd.unet).items()
    }


@pytest.fixture(scope="module")
def trained(tiny_sd):
    before = snapshot(tiny_sd)
    progress = []
    concept = train_concept(
        tiny_sd,
        [photo(), photo()[:, ::-1].copy()],
        "my-mug",
        "mug",
        steps=2,
        batch_size=1,
        learning_rate=1e-2,
        resolution=RESOLUTION,
        seed=0,
        report=lambda **p: progress.append(p),
    )
    return concept, before, progress


# --- hook points ---------------------------------------------------------------------------


def test_token_embeddings_replace_only_the_given_positions(tiny_sd):
    ids = tiny_sd.tokenizer(["a photo of a mug"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    layer = tiny_sd.text_encoder.get_input_embeddings()
    table = layer.weight.clone()
    positions = torch.zeros(1, 77, dtype=torch.bool)
    positions[0, 2] = True
    values = torch.full((1, 77, 32), 3.0)
    with torch.no_grad(), token_embeddings(tiny_sd.text_encoder, positions, values):
        replaced = layer(ids)
    plain = layer(ids)
    assert torch.equal(replaced[0, 2], torch.full((32,), 3.0))
    assert torch.equal(replaced[0, :2], plain[0, :2]) and torch.equal(replaced[0, 3:], plain[0, 3:])
    assert torch.equal(layer.weight, table) and not layer._forward_hooks  # nothing left behind


def test_concept_attention_with_the_resident_weights_changes_nothing(tiny_sd):
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = encode_prompts(tiny_sd, ["", "a photo of a mug"])
    same = {
        name: (layer.to_k.weight, layer.to_v.weight) for name, layer in cross_attention_layers(tiny_sd.unet).items()
    }
    with torch.no_grad():
        plain = unet_noise(tiny_sd, latents, 300, text)
        with concept_attention(tiny_sd.unet, same):
            wrapped = unet_noise(tiny_sd, latents, 300, text)
        with concept_attention(tiny_sd.unet, random_kv(tiny_sd)):
            other = unet_noise(tiny_sd, latents, 300, text)
    assert torch.equal(plain, wrapped) and not torch.equal(plain, other)


def test_concept_attention_inside_capture_records_the_concepts_attention(tiny_sd):
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = encode_prompts(tiny_sd, ["a photo of a mug"])
    kv = random_kv(tiny_sd)
    store, again = AttentionStore(), AttentionStore()
    before = dict(tiny_sd.unet.attn_processors)
    with torch.no_grad():
        with concept_attention(tiny_sd.unet, kv):
            expected = unet_noise(tiny_sd, latents, 300, text)
        with capture_attention(tiny_sd.unet, store, cross_blocks=(5,)), concept_attention(tiny_sd.unet, kv):
            captured = unet_noise(tiny_sd, latents, 300, text)
        with capture_attention(tiny_sd.unet, again, cross_blocks=(5,)):
            unet_noise(tiny_sd, latents, 300, text)
    assert torch.equal(expected, captured)
    assert not torch.allclose(store.mean("cross", 4), again.mean("cross", 4))  # keys from the concept's to_k
    assert dict(tiny_sd.unet.attn_processors) == before


def test_processors_come_back_after_an_error(tiny_sd):
    before = dict(tiny_sd.unet.attn_processors)
    with pytest.raises(RuntimeError), concept_attention(tiny_sd.unet, random_kv(tiny_sd)):
        raise RuntimeError("boom")
    assert dict(tiny_sd.unet.attn_processors) == before
    with (
        pytest.raises(KeyError, match="no cross-attention layers"),
        concept_attention(tiny_sd.unet, {"x.attn2": (1, 2)}),
    ):
        pass


def test_identifier_expands_to_its_vectors_inside_the_span(tiny_sd):
    prompt = build_prompt(tiny_sd.tokenizer, ["<my-mug> mug", "table"], vector_counts={"my-mug": 2})
    mug = tiny_sd.tokenizer("mug", add_special_tokens=False)["input_ids"]
    start, end = prompt.class_spans[0]
    assert prompt.concept_positions == {"my-mug": [start, start + 1]} and end - start == 2 + len(mug)
    assert prompt.ids[start + 2 : end] == mug
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with_concept = encode_with_concepts(tiny_sd, [prompt], {"my-mug": vectors})
        other = encode_with_concepts(tiny_sd, [prompt], {"my-mug": vectors + 1})
    assert not torch.allclose(with_concept[0, start:], other[0, start:])
    assert torch.equal(with_concept[0, :start], other[0, :start])  # causal: earlier tokens do not see it
    with pytest.raises(ValueError, match="<other> is not a known concept"):
        build_prompt(tiny_sd.tokenizer, ["<other> mug"], vector_counts={"my-mug": 1})


# --- training ------------------------------------------------------------------------------


def test_training_moves_the_concept_and_nothing_else(tiny_sd, trained):
    concept, before, _ = trained
    assert unchanged(tiny_sd, before)
    start = class_word_embedding(tiny_sd, "mug", 1)
    assert concept.vectors.shape == (1, 32) and not torch.equal(concept.vectors, start)
    layers = cross_attention_layers(tiny_sd.unet)
    assert set(concept.kv) == set(layers) and len(layers) == 16
    moved = [not torch.equal(k, layers[name].to_k.weight) for name, (k, _) in concept.kv.items()]
    assert all(moved)
    assert concept.sd_model == tiny_sd.model_id and concept.metrics["steps"] == 2


def test_training_reports_steps(trained):
    _, _, progress = trained
    assert [p["step"] for p in progress] == [1, 2] and all(p["steps"] == 2 for p in progress)
    assert [p["fraction"] for p in progress] == [0.5, 1.0] and all(np.isfinite(p["loss"]) for p in progress)


def test_textual_inversion_learns_the_embedding_alone_and_is_seeded(tiny_sd):
    before = snapshot(tiny_sd)
    kwargs = dict(train_kv=False, steps=1, batch_size=1, learning_rate=1e-2, resolution=RESOLUTION)
    first = train_concept(tiny_sd, [photo()], "my-cup", "cup", seed=3, **kwargs)
    again = train_concept(tiny_sd, [photo()], "my-cup", "cup", seed=3, **kwargs)
    assert first.kv is None and torch.equal(first.vectors, again.vectors)
    assert not torch.equal(first.vectors, class_word_embedding(tiny_sd, "cup", 1))
    assert unchanged(tiny_sd, before)


def test_mask_weights_the_loss(tiny_sd):
    mask = np.zeros((48, 48), np.uint8)
    mask[12:36, 12:36] = 1
    kwargs = dict(train_kv=False, steps=1, batch_size=1, learning_rate=1e-2, resolution=RESOLUTION, seed=0)
    plain = train_concept(tiny_sd, [photo()], "a", "mug", **kwargs)
    masked = train_concept(tiny_sd, [photo()], "a", "mug", masks=[mask], **kwargs)
    assert plain.metrics["loss"] != masked.metrics["loss"]
    with pytest.raises(ValueError, match="some object pixels"):
        train_concept(tiny_sd, [photo()], "a", "mug", masks=[np.zeros((48, 48), np.uint8)], **kwargs)


def test_an_exception_from_report_stops_training_cleanly(tiny_sd):
    before = snapshot(tiny_sd)

    def cancel(**progress):
        raise InterruptedError

    with pytest.raises(InterruptedError):
        train_concept(tiny_sd, [photo()], "a", "mug", steps=5, batch_size=1, resolution=RESOLUTION, report=cancel)
    assert unchanged(tiny_sd, before)


def test_a_concept_job_leaves_the_resident_model_bit_identical(tiny_sd, trained):
    concept, _, _ = trained
    before = snapshot(tiny_sd)
    image = photo(size=64)
    with_concept = segment_text(
        tiny_sd, None, image, ["<my-mug> mug"], concepts={"my-mug": concept}, resolution=RESOLUTION
    )
    assert unchanged(tiny_sd, before)
    plain = segment_text(tiny_sd, None, image, ["mug"], resolution=RESOLUTION)
    assert with_concept.labels.shape == plain.labels.shape == (64, 64)
    with pytest.raises(ValueError, match="'selfcross' only"):
        segment_text(tiny_sd, None, image, ["<my-mug> mug"], method="gem", concepts={"my-mug": concept})


# --- files ---------------------------------------------------------------------------------


def test_files_round_trip_in_diffusers_format(trained):
    concept, _, _ = trained
    files = concept.files()
    assert set(files) == {EMBEDDINGS_FILE, KV_FILE}
    shapes = safetensors_shapes(files[EMBEDDINGS_FILE])
    assert shapes == {"<my-mug>": [1, 32]}
    kv_shapes = safetensors_shapes(files[KV_FILE])
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_custom_diffusion.weight" in kv_shapes
    loaded = Concept.from_files(files, "my-mug", "mug")
    assert torch.equal(loaded.vectors, concept.vectors)
    assert all(torch.equal(loaded.kv[n][0], k) and torch.equal(loaded.kv[n][1], v) for n, (k, v) in concept.kv.items())
    assert loaded.files() == files  # export again: the same bytes


def torch_bytes(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def test_reads_the_diffusers_bin_files(tiny_sd, trained):
    concept, _, _ = trained
    # textual_inversion.py's legacy .bin (a (D,) tensor), Custom Diffusion's <new1>.bin and weights .bin
    # with the empty self-attention processor entries save_attn_procs writes.
    weights = {
        f"{name}.processor.to_{p}_custom_diffusion.weight": w
        for name, (k, v) in concept.kv.items()
        for p, w in (("k", k), ("v", v))
    }
    weights["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"] = {}
    files = {EMBEDDINGS_FILE: torch_bytes({"<new1>": concept.vectors[0]}), KV_FILE: torch_bytes(weights)}
    loaded = Concept.from_files(files, "whatever", "mug")
    assert loaded.vectors.shape == (1, 32) and torch.equal(loaded.vectors[0], concept.vectors[0])
    assert set(loaded.kv) == set(concept.kv)
    check_concept(tiny_sd, loaded)


def test_never_unpickles_code():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(TensorFileError, match="not a torch tensor file"):
        Concept.from_files({EMBEDDINGS_FILE: torch_bytes({"<x>": Evil()})}, "x", "mug")


def test_wrong_width_and_wrong_layers_are_refused(tiny_sd, tiny_sd2, trained):
    concept, _, _ = trained
    with pytest.raises(ConceptMismatchError, match="32 wide but the text encoder of tiny-random-sd2 is 48 wide"):
        check_concept(tiny_sd2, concept)
    wide = Concept("w", "mug", torch.zeros(1, 48), None)
    with pytest.raises(ConceptMismatchError, match="48 wide"):
        check_concept(tiny_sd, wide)
    check_concept(tiny_sd2, wide)  # an SD 2.x-width embedding fits the SD 2.x model
    odd = Concept(
        "o",
        "mug",
        torch.zeros(1, 32),
        {"mid_block.attentions.0.transformer_blocks.0.attn2": (torch.zeros(32, 32), torch.zeros(32, 32))},
    )
    with pytest.raises(ConceptMismatchError, match=r"needs \[64, 32\]"):
        check_concept(tiny_sd, odd)
    with pytest.raises(ConceptFileError, match="train_q_out"):
        Concept.from_files(
            {
                EMBEDDINGS_FILE: concept.files()[EMBEDDINGS_FILE],
                KV_FILE: save_safetensors({"a.attn2.processor.to_q_custom_diffusion.weight": torch.zeros(2, 2)}),
            },
            "my-mug",
            "mug",
        )


def test_concept_shapes_describe_the_model(tiny_sd2):
    shapes = concept_shapes(tiny_sd2)
    assert shapes["text_width"] == 48 and len(shapes["cross_attention"]) == 16
    assert shapes["cross_attention"]["mid_block.attentions.0.transformer_blocks.0.attn2"] == [64, 48]
    json.dumps(shapes)  # announced by the worker as JSON


def test_sd2_trains_and_checks_a_concept(tiny_sd2):
    concept = train_concept(tiny_sd2, [photo()], "my-mug", "mug", steps=1, batch_size=1, resolution=RESOLUTION)
    assert concept.vectors.shape == (1, 48) and concept.kv["mid_block.attentions.0.transformer_blocks.0.attn2"][
        0
    ].shape == (64, 48)
    check_concept(tiny_sd2, Concept.from_files(concept.files(), "my-mug", "mug"))


def test_safetensors_header_without_torch():
    data = save_safetensors({"<a>": torch.zeros(2, 7)}, metadata={"format": "pt"})
    assert safetensors_shapes(data) == {"<a>": [2, 7]}
    with pytest.raises(TensorFileError, match="header length"):
        safetensors_shapes(b"PK\x03\x04 a zip")
    with pytest.raises(TensorFileError, match="must be a JSON object"):
        safetensors_shapes(struct.pack("<Q", 3) + b"[1]")
    with pytest.raises(ConceptFileError, match="7 wide"):
        check_shapes([2, 7], None, {"text_width": 8, "cross_attention": {}}, "m")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("write", [save_safetensors, torch_bytes])
def test_non_finite_values_are_refused(value, write):
    vectors = torch.zeros(1, 32)
    vectors[0, 3] = value
    with pytest.raises(TensorFileError, match="'<x>' holds NaN or infinite values"):
        Concept.from_files({EMBEDDINGS_FILE: write({"<x>": vectors})}, "x", "mug")


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.uint8, torch.complex64])
def test_torch_files_of_non_float_tensors_are_refused(dtype):
    with pytest.raises(TensorFileError, match=f"'<x>' has dtype {dtype}; concepts are floating point"):
        Concept.from_files({EMBEDDINGS_FILE: torch_bytes({"<x>": torch.zeros(1, 32, dtype=dtype)})}, "x", "mug")


def test_a_deflate_bomb_is_refused_before_torch_reads_it(monkeypatch):
    # A small tensor's torch file whose storage member is replaced by one that inflates to 256 MiB.
    small = zipfile.ZipFile(io.BytesIO(torch_bytes({"<x>": torch.zeros(1, 4)})))
    members = tuple((name, small.read(name)) for name in small.namelist() if name != "archive/data/0")

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load must not see the file")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(TensorFileError, match="add up to 268435"):
        Concept.from_files({EMBEDDINGS_FILE: deflate_bomb(members)}, "x", "mug")


def test_declared_storage_sizes_are_checked_on_the_meta_device(monkeypatch):
    """The pickle's declared sizes are bounded before any storage is read."""
    monkeypatch.setattr("workers.models.concept.MAX_TENSOR_BYTES", 100)
    with pytest.raises(TensorFileError, match="the tensors declare 128 bytes"):
        Concept.from_files({EMBEDDINGS_FILE: torch_bytes({"<x>": torch.zeros(1, 32)})}, "x", "mug")
