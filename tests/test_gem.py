"""GEM dense CLIP features (workers/methods/gem.py) and CLIP loading (workers/models/clip.py) on a tiny random CLIP.

The key check recomputes the GEM stream with a slow, loop-based reference that handles one image
as a plain (tokens, width) sequence, so no batch/sequence axis can be confused, and takes every
layer norm, projection and softmax by hand from the block weights.
"""

from __future__ import annotations

import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from workers.methods import gem
from workers.models.clip import (
    TINY_RANDOM_CONFIG,
    TINY_RANDOM_SEED,
    ModelUnavailableError,
    _cached_checkpoint,
    load_clip,
)

REFERENCE_SIZE = (64, 80)  # a 4 x 5 patch grid: non-square, and resampled down from 14 x 14


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("clip-cache")


@pytest.fixture(scope="module")
def clip32(cache_dir):
    return load_clip("tiny-random", device="cpu", dtype=torch.float32, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def clip64(cache_dir):
    # float64 so the reference comparison can be tight and a wrong port is far outside it.
    return load_clip("tiny-random", device="cpu", dtype=torch.float64, cache_dir=cache_dir)


def _images(batch, size, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=generator).to(dtype)


def _uint8_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --- the loop-based reference: one image, a (tokens, width) sequence, no batch axis ----------


def _layer_norm(ln, row):
    mean = row.mean()
    variance = ((row - mean) ** 2).mean()
    return (row - mean) / torch.sqrt(variance + ln.eps) * ln.weight + ln.bias


def _layer_norm_rows(ln, sequence):
    return torch.stack([_layer_norm(ln, row) for row in sequence])


def _softmax(scores):
    exp = torch.exp(scores - scores.max())
    return exp / exp.sum()


def _qkv_rows(block, sequence):
    """ln_1 of the sequence, and per token its q, k, v vectors (lists of (width,) tensors)."""
    width = sequence.shape[1]
    normed = _layer_norm_rows(block.ln_1, sequence)
    weights = block.attn.in_proj_weight.split(width)  # q, k, v rows of the packed projection
    biases = block.attn.in_proj_bias.split(width)
    q, k, v = ([weight @ row + bias for row in normed] for weight, bias in zip(weights, biases))
    return normed, q, k, v


def _head(rows, head, head_dim):
    return torch.stack([row[head * head_dim : (head + 1) * head_dim] for row in rows])  # (N, d)


def reference_embed(visual, image):
    """(3, H, W) -> (N, width) tokens after ln_pre, patch by patch."""
    patch = visual.patch_size[0]
    grid_h, grid_w = image.shape[1] // patch, image.shape[2] // patch
    tokens = [visual.class_embedding]
    for i in range(grid_h):
        for j in range(grid_w):
            pixels = image[:, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch]
            tokens.append((visual.conv1.weight * pixels).sum(dim=(1, 2, 3)))
    width = tokens[0].shape[0]
    old_grid = visual.grid_size
    position_grid = visual.positional_embedding[1:].T.reshape(1, width, *old_grid)
    position_grid = F.interpolate(
        position_grid, size=(grid_h, grid_w), mode="bicubic", antialias=True, align_corners=False
    )[0]
    positions = [visual.positional_embedding[0]]
    positions += [position_grid[:, i, j] for i in range(grid_h) for j in range(grid_w)]
    sequence = torch.stack([token + position for token, position in zip(tokens, positions)])
    return _layer_norm_rows(visual.ln_pre, sequence)


def reference_block(block, sequence):
    """The plain CLIP residual block, per token and per head."""
    heads = block.attn.num_heads
    head_dim = sequence.shape[1] // heads
    _, q, k, v = _qkv_rows(block, sequence)
    attended = []
    for i in range(len(sequence)):
        per_head = []
        for head in range(heads):
            keys, values = _head(k, head, head_dim), _head(v, head, head_dim)
            query = q[i][head * head_dim : (head + 1) * head_dim]
            weights = _softmax(keys @ query / math.sqrt(head_dim))
            per_head.append(weights @ values)
        attended.append(block.attn.out_proj.weight @ torch.cat(per_head) + block.attn.out_proj.bias)
    sequence = sequence + torch.stack(attended)
    hidden = _layer_norm_rows(block.ln_2, sequence) @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias
    hidden = hidden * torch.sigmoid(1.702 * hidden)  # QuickGELU (the tiny config has quick_gelu)
    return sequence + hidden @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias


def _reference_assign(rows, values, inv_temp):
    """One head: rows (N, d) of q, k or v; token by token, one iteration then assignment to v."""

    def similarities(token, tokens):
        return _softmax(inv_temp * torch.stack([token @ other for other in tokens]))

    normed = [row / row.norm() for row in rows]
    clustered = [similarities(token, normed) @ torch.stack(normed) for token in normed]
    normed = [row / row.norm() for row in clustered]
    return torch.stack([similarities(token, normed) @ values for token in normed])


def reference_self_self(block, sequence):
    """GEM's residual from the normal stream `sequence` entering `block`, per head."""
    heads = block.attn.num_heads
    head_dim = sequence.shape[1] // heads
    normed, q, k, v = _qkv_rows(block, sequence)
    inv_temp = torch.stack([row.norm() for row in normed]).mean() / math.sqrt(head_dim)
    per_head = []
    for head in range(heads):
        values = _head(v, head, head_dim)
        assigned = [_reference_assign(_head(rows, head, head_dim), values, inv_temp) for rows in (q, k, v)]
        per_head.append(sum(assigned) / 3)
    merged = torch.cat(per_head, dim=1)  # (N, width), heads in order
    return merged @ block.attn.out_proj.weight.T + block.attn.out_proj.bias


def reference_gem_features(visual, image):
    """(3, H, W) -> (h*w, D) L2-normalised GEM patch features, row-major over the grid."""
    blocks = list(visual.transformer.resblocks)
    first_gem = len(blocks) - (gem.GEM_DEPTH - 1)
    sequence = reference_embed(visual, image)
    for block in blocks[:first_gem]:
        sequence = reference_block(block, sequence)
    gem_stream = sequence
    for block in blocks[first_gem:]:
        gem_stream = gem_stream + reference_self_self(block, sequence)
        sequence = reference_block(block, sequence)
    projected = _layer_norm_rows(visual.ln_post, gem_stream) @ visual.proj
    return F.normalize(projected[1:], dim=-1)


@pytest.fixture(scope="module")
def reference(clip64):
    images = _images(2, REFERENCE_SIZE, torch.float64, seed=1)
    with torch.no_grad():
        expected = torch.stack([reference_gem_features(clip64.model.visual, image) for image in images])
    return images, expected  # (2, h*w, D)


def _as_token_rows(features):
    """(B, D, h, w) -> (B, h*w, D), row-major like the token order."""
    return features.flatten(2).transpose(1, 2)


# --- GEM against the reference --------------------------------------------------------------


def test_reference_block_matches_open_clip_block(clip64):
    # Validates the reference itself against open_clip's own (batch-first) block.
    block = clip64.model.visual.transformer.resblocks[0]
    sequence = _images(1, (17, 64), torch.float64)[0, 0]  # 17 tokens of width 64
    with torch.no_grad():
        assert torch.allclose(reference_block(block, sequence), block(sequence[None])[0], atol=1e-10)


def test_dense_features_match_loop_reference(clip64, reference):
    images, expected = reference
    features = gem.dense_features(clip64, images)
    assert features.shape == (2, TINY_RANDOM_CONFIG["embed_dim"], 4, 5)
    assert torch.allclose(_as_token_rows(features).double(), expected, atol=1e-6)


def test_sequence_first_port_is_caught(clip64, reference, monkeypatch):
    # The public GEM code transposes (N, B, C) -> (B, N, C) first; on open_clip 3.x batch-first
    # input that transpose makes attention run over the batch. Same shapes, no error, wrong values.
    images, expected = reference
    correct = gem.self_self_attention

    def sequence_first_port(attn, x):
        return correct(attn, x.transpose(0, 1)).transpose(0, 1)

    monkeypatch.setattr(gem, "self_self_attention", sequence_first_port)
    features = gem.dense_features(clip64, images)
    assert features.shape == (2, TINY_RANDOM_CONFIG["embed_dim"], 4, 5)
    assert (_as_token_rows(features).double() - expected).abs().max() > 1e-2


def test_normal_stream_is_clip_and_model_is_left_untouched(clip32):
    visual = clip32.model.visual
    images = _images(2, (224, 224))
    with torch.no_grad():
        before = clip32.model.encode_image(images)
        normal, gem_stream = gem.gem_forward(visual, images)
        gem.dense_features(clip32, images)
        after = clip32.model.encode_image(images)
    assert torch.allclose(normal[:, 0], before, atol=1e-5)
    assert torch.equal(before, after)
    assert gem_stream.shape == normal.shape == (2, 1 + 14 * 14, TINY_RANDOM_CONFIG["embed_dim"])
    assert not torch.allclose(gem_stream, normal, atol=1e-3)


def test_batch_of_two_equals_each_alone(clip32):
    images = _images(2, (448, 448), seed=3)
    together = gem.dense_features(clip32, images)
    alone = torch.cat([gem.dense_features(clip32, image[None]) for image in images])
    assert together.shape == (2, TINY_RANDOM_CONFIG["embed_dim"], 28, 28)
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(together.norm(dim=1), torch.ones(2, 28, 28), atol=1e-5)


def test_self_self_assignment_averages_values_within_planted_clusters():
    # Two groups of identical directions; a sharp temperature makes each token's attention
    # uniform over its own group, so it receives its group's mean value.
    directions = torch.eye(4)[:2]
    x = directions[[0, 0, 0, 1, 1]][None, None]  # (1, 1, 5, 4)
    v = torch.arange(5.0)[:, None].expand(5, 4)[None, None]
    out = gem.self_self_assignment(x, v, torch.tensor(100.0))
    expected = torch.tensor([1.0, 1.0, 1.0, 3.5, 3.5])[:, None].expand(5, 4)
    assert torch.allclose(out[0, 0], expected, atol=1e-4)


def test_position_embedding_resampling():
    position = torch.randn(1 + 14 * 14, 8)
    assert torch.equal(gem.resample_position_embedding(position, (14, 14), (14, 14)), position)
    constant = torch.cat([torch.zeros(1, 8), torch.full((14 * 14, 8), 0.5)])
    resampled = gem.resample_position_embedding(constant, (14, 14), (28, 20))
    assert resampled.shape == (1 + 28 * 20, 8)
    assert torch.equal(resampled[0], constant[0])  # class token kept
    assert torch.allclose(resampled[1:], torch.full((28 * 20, 8), 0.5), atol=1e-6)


# --- preprocessing, text, classification ----------------------------------------------------


def test_preprocess_resizes_and_normalises(clip32):
    gray = np.full((300, 200, 3), 128, dtype=np.uint8)
    pixels = gem.preprocess(clip32, gray)
    assert pixels.shape == (1, 3, 448, 448) and pixels.dtype == torch.float32
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD)
    expected = ((128 / 255 - mean) / std).view(1, 3, 1, 1).expand(1, 3, 448, 448)
    assert torch.allclose(pixels, expected, atol=1e-5)


def test_encode_classes_uses_prompt_and_normalises(clip32):
    embeddings = gem.encode_classes(clip32, ["dog", "traffic light"])
    assert embeddings.shape == (2, TINY_RANDOM_CONFIG["embed_dim"])
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2), atol=1e-5)
    with torch.no_grad():
        direct = clip32.model.encode_text(clip32.tokenizer(["a photo of a traffic light."]))
    assert torch.allclose(embeddings[1], F.normalize(direct, dim=-1)[0], atol=1e-5)


def test_class_logits_follow_the_classes(clip32):
    image = _uint8_image(120, 160)
    logits = gem.class_logits(clip32, image, ["dog", "cat", "sky"])
    assert logits.shape == (3, 28, 28)
    assert logits.abs().max() <= 1 + 1e-5  # cosine similarities
    swapped = gem.class_logits(clip32, image, ["sky", "dog", "cat"])
    assert torch.allclose(swapped, logits[[2, 0, 1]], atol=1e-5)
    other = gem.class_logits(clip32, image, ["dog", "cat", "road"])
    assert torch.allclose(other[:2], logits[:2], atol=1e-5)
    assert not torch.allclose(other[2], logits[2], atol=1e-3)


def test_class_probabilities_softmax_over_classes():
    logits = torch.tensor([0.30, 0.28, 0.20]).view(3, 1, 1).expand(3, 2, 2)
    probs = gem.class_probabilities(logits)  # s = 0.01: softmax([30, 28, 20])
    expected = torch.softmax(torch.tensor([30.0, 28.0, 20.0]), dim=0)
    assert torch.allclose(probs[:, 0, 0], expected, atol=1e-6)
    assert torch.allclose(probs.sum(dim=0), torch.ones(2, 2), atol=1e-6)
    flatter = gem.class_probabilities(logits, temperature=0.1)
    assert flatter.max() < probs.max()


def test_background_channel_formula():
    probs = torch.tensor([[0.05, 0.5], [0.02, 0.3], [0.93, 0.2]]).view(3, 1, 2)
    probs = torch.cat([probs, torch.full((3, 1, 2), 0.04)], dim=1)  # second row: max 0.04
    background = gem.background_channel(probs)
    assert background.shape == (1, 2, 2)
    # max(0, 1 - max_c - 0.8): maxima 0.93, 0.5 -> 0; 0.04 -> 0.16
    assert torch.allclose(background, torch.tensor([[[0.0, 0.0], [0.16, 0.16]]]), atol=1e-6)


# --- loading ------------------------------------------------------------------------------


def test_tiny_random_round_trip_gives_identical_outputs(clip32, cache_dir):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_RANDOM_SEED)
        in_memory = open_clip.CLIP(**TINY_RANDOM_CONFIG).eval()
    images = _images(1, (224, 224), seed=4)
    tokens = clip32.tokenizer(["a photo of a dog."])
    with torch.no_grad():
        assert torch.equal(clip32.model.encode_image(images), in_memory.encode_image(images))
        assert torch.equal(clip32.model.encode_text(tokens), in_memory.encode_text(tokens))
    reloaded = load_clip("tiny-random", device="cpu", dtype=torch.float32, cache_dir=cache_dir)
    assert torch.equal(gem.dense_features(reloaded, images), gem.dense_features(clip32, images))
    assert reloaded.describe() == {
        "clip_model": "tiny-random",
        "clip_pretrained": "random-seed-0",
        "random_weights": True,
    }
    # The saved folder is also a valid local checkpoint for `pretrained`.
    from_folder = load_clip("any", str(cache_dir / "tiny-random-clip"), device="cpu", dtype=torch.float32)
    assert torch.equal(gem.dense_features(from_folder, images), gem.dense_features(clip32, images))
    assert from_folder.random_weights  # the folder's marker says so, whatever the name


def test_real_tokenizer(clip32):
    assert isinstance(clip32.tokenizer, open_clip.tokenizer.SimpleTokenizer)
    ids = clip32.tokenizer(["a photo of a dog."])[0]
    # CLIP's BPE ids: BOS, a, photo, of, a, dog, ".", EOS, then zero padding to 77.
    assert ids[:8].tolist() == [49406, 320, 1125, 539, 320, 1929, 269, 49407]
    assert ids.shape == (77,) and (ids[8:] == 0).all()


def test_unavailable_tag_offline_raises_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError) as error:
        load_clip("ViT-B-16-quickgelu", "metaclip_400m", device="cpu", dtype=torch.float32, cache_dir=tmp_path)
    # cache_dir=tmp_path: an empty cache, so a developer's own HF cache cannot satisfy the lookup
    message = str(error.value)
    assert "ViT-B-16-quickgelu" in message and "metaclip_400m" in message
    assert "ATTNSEG_CLIP_PRETRAINED" in message and "HF_HOME" in message


def test_missing_checkpoint_path_and_unknown_tag(tmp_path):
    with pytest.raises(ModelUnavailableError, match="no such file"):
        load_clip("ViT-B-16-quickgelu", str(tmp_path / "missing.bin"), device="cpu", dtype=torch.float32)
    with pytest.raises(ModelUnavailableError, match="open_clip_config.json"):
        load_clip("ViT-B-16-quickgelu", str(tmp_path), device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="metaclip_400m"):  # the message lists the known tags
        load_clip("ViT-B-16-quickgelu", "no_such_tag", device="cpu", dtype=torch.float32)


def test_offline_lookup_finds_weights_in_hf_cache(tmp_path):
    # The HF hub cache layout a previous download leaves: refs/main -> snapshots/<commit>/<file>.
    repo = tmp_path / "models--timm--vit_base_patch16_clip_224.metaclip_400m"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"weights")
    tag_cfg = open_clip.get_pretrained_cfg("ViT-B-16-quickgelu", "metaclip_400m")
    assert _cached_checkpoint(tag_cfg, tmp_path) == str(snapshot / "open_clip_model.safetensors")
    assert _cached_checkpoint(tag_cfg, tmp_path / "empty") is None
