"""Finding the 16 transformer blocks and capturing their attention without changing the UNet."""

from __future__ import annotations

import pytest
import torch

from workers.models.attention import (
    AttentionStore,
    CapturingAttnProcessor,
    capture_attention,
    head_mean_attention,
    transformer_blocks,
)
from workers.models.sd_ops import encode_prompts, unet_noise

ALL = tuple(range(1, 17))
TABLE = (  # docs/methods.md 0.2
    [
        "down_blocks.0.attentions.0",
        "down_blocks.0.attentions.1",
        "down_blocks.1.attentions.0",
        "down_blocks.1.attentions.1",
        "down_blocks.2.attentions.0",
        "down_blocks.2.attentions.1",
        "mid_block.attentions.0",
    ]
    + [f"up_blocks.{i}.attentions.{j}" for i in (1, 2, 3) for j in (0, 1, 2)]
)
R = 32  # latent grid of a 256 x 256 input


@pytest.fixture(scope="module")
def inputs(tiny_sd):
    """Two different latents (2, 4, R, R) and their prompts' embeddings (2, 77, 32)."""
    latents = torch.randn(2, 4, R, R, generator=torch.Generator().manual_seed(0))
    return latents, encode_prompts(tiny_sd, ["", "a photo of a dog"])


def run(sd, latents, text, store=None, **blocks):
    with torch.no_grad():
        if store is None:
            return unet_noise(sd, latents, 300, text)
        with capture_attention(sd.unet, store, **blocks):
            return unet_noise(sd, latents, 300, text)


def test_sixteen_blocks_in_table_order(tiny_sd):
    blocks = transformer_blocks(tiny_sd.unet)
    assert [b.number for b in blocks] == list(ALL)
    assert [b.name for b in blocks] == TABLE
    modules = dict(tiny_sd.unet.named_modules())
    for block in blocks:
        assert block.self_attention is modules[f"{block.name}.transformer_blocks.0.attn1"]
        assert block.cross_attention is modules[f"{block.name}.transformer_blocks.0.attn2"]


def test_unet_of_another_topology_is_refused():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(8, 8),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
        cross_attention_dim=8,
        layers_per_block=1,
        attention_head_dim=2,
    )
    with pytest.raises(ValueError, match="found 4"):
        transformer_blocks(unet)


def test_all_blocks_land_on_four_grids(tiny_sd, inputs):
    latents, text = inputs
    store = AttentionStore()
    run(tiny_sd, latents[:1], text[:1], store, self_blocks=ALL, cross_blocks=ALL)
    for kind in ("self", "cross"):
        assert store.grids(kind) == [R // 8, R // 4, R // 2, R]
        assert [store.count(kind, g) for g in (R, R // 2, R // 4, R // 8)] == [5, 5, 5, 1]
    assert store.mean("self", R).shape == (1, R * R, R * R)
    assert store.mean("cross", R // 8).shape == (1, (R // 8) ** 2, 77)
    store.clear()
    assert store.grids("self") == [] and store.count("self", R) == 0


def test_capture_leaves_unet_output_bit_identical(tiny_sd, inputs):
    latents, text = inputs
    plain = run(tiny_sd, latents, text)
    captured = run(tiny_sd, latents, text, AttentionStore(), self_blocks=ALL, cross_blocks=ALL, cross_logit_blocks=ALL)
    assert torch.equal(plain, captured)


def test_maps_are_row_stochastic(tiny_sd, inputs):
    latents, text = inputs
    store = AttentionStore()
    run(tiny_sd, latents, text, store, self_blocks=ALL, cross_blocks=ALL)
    for kind in ("self", "cross"):
        for grid in store.grids(kind):
            maps = store.mean(kind, grid)
            assert maps.dtype == torch.float32 and (maps >= 0).all()
            assert torch.allclose(maps.sum(-1), torch.ones(maps.shape[:2]), atol=1e-5)


def test_rows_record_only_the_selected_sample(tiny_sd, inputs):
    latents, text = inputs
    batch, single = AttentionStore(rows=slice(1, 2)), AttentionStore()
    run(tiny_sd, latents, text, batch, self_blocks=(1, 7, 16), cross_blocks=(5, 12))
    run(tiny_sd, latents[1:], text[1:], single, self_blocks=(1, 7, 16), cross_blocks=(5, 12))
    for kind in ("self", "cross"):
        assert batch.grids(kind) == single.grids(kind)
        for grid in single.grids(kind):
            assert batch.mean(kind, grid).shape[0] == 1
            assert torch.allclose(batch.mean(kind, grid), single.mean(kind, grid), atol=1e-6)


def test_captured_maps_match_a_direct_computation(tiny_sd, inputs):
    latents, text = inputs
    cross = transformer_blocks(tiny_sd.unet)[6].cross_attention  # block 7, grid R/8
    seen = {}
    hook = cross.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(x=args[0], text=kwargs["encoder_hidden_states"]),
        with_kwargs=True,
    )
    store = AttentionStore()
    try:
        run(tiny_sd, latents, text, store, cross_blocks=(7,), cross_logit_blocks=(7,))
    finally:
        hook.remove()
    heads = cross.heads
    q = cross.to_q(seen["x"]).unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, H, Q, d)
    k = cross.to_k(seen["text"]).unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, H, 77, d)
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    assert torch.allclose(store.mean("cross_logits", R // 8), logits.mean(1), atol=1e-5)
    assert torch.allclose(store.mean("cross", R // 8), logits.softmax(-1).mean(1), atol=1e-6)


def test_head_mean_attention_matches_all_heads_at_once():
    gen = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 3, 5, 4, generator=gen), torch.randn(2, 3, 6, 4, generator=gen)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1, ..., 4:] = False  # second sample may not look at the last two keys
    probs, logits = head_mean_attention(query, key, 0.5, mask, logits=True)
    scores = query @ key.transpose(-1, -2) * 0.5
    assert torch.allclose(logits, scores.mean(1))
    assert torch.allclose(probs, scores.masked_fill(~mask, float("-inf")).softmax(-1).mean(1))
    assert (probs[1, :, 4:] == 0).all()
    one_head_probs, one_head_logits = head_mean_attention(query[:, :1], key[:, :1], 0.5, logits=True)
    assert torch.allclose(one_head_logits.softmax(-1), one_head_probs)


@pytest.mark.parametrize("heads_at_once", [1, 2, 3, 8])
def test_head_mean_attention_any_head_grouping_same_maps(heads_at_once):
    """Scaling q first and grouping heads change only rounding (within 1e-6 of scaling the scores)."""
    gen = torch.Generator().manual_seed(1)
    query, key = torch.randn(2, 8, 64, 16, generator=gen), torch.randn(2, 8, 77, 16, generator=gen)
    additive = torch.zeros(2, 1, 1, 77).masked_fill_(torch.arange(77) > 60, -10000.0)
    probs, logits = head_mean_attention(query, key, 0.25, additive, logits=True, heads_at_once=heads_at_once)
    scores = query @ key.transpose(-1, -2) * 0.25
    assert torch.allclose(logits, scores.mean(1), atol=1e-6)
    assert torch.allclose(probs, (scores + additive).softmax(-1).mean(1), atol=1e-6)


def test_processors_restored_after_exit_and_after_an_error(tiny_sd, inputs):
    latents, text = inputs
    before = dict(tiny_sd.unet.attn_processors)
    with capture_attention(tiny_sd.unet, AttentionStore(), self_blocks=(3,), cross_blocks=(8,)):
        during = tiny_sd.unet.attn_processors
        changed = {name for name in before if during[name] is not before[name]}
        assert changed == {
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor",
            "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
        }
        assert all(isinstance(during[name], CapturingAttnProcessor) for name in changed)
    assert all(tiny_sd.unet.attn_processors[n] is p for n, p in before.items())

    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(tiny_sd.unet, AttentionStore(), self_blocks=ALL, cross_logit_blocks=ALL):
            raise RuntimeError("boom")
    assert all(tiny_sd.unet.attn_processors[n] is p for n, p in before.items())

    with pytest.raises(ValueError, match="17"):
        with capture_attention(tiny_sd.unet, AttentionStore(), self_blocks=(17,)):
            pass


def test_keep_grad_lets_gradients_reach_the_text(tiny_sd, inputs):
    latents, text = inputs
    text = text.clone().requires_grad_(True)
    weights = torch.randn(1, (R // 2) ** 2, 77, generator=torch.Generator().manual_seed(1))
    trained, detached = AttentionStore(rows=slice(1, 2), keep_grad=True), AttentionStore()
    with capture_attention(tiny_sd.unet, trained, cross_blocks=(11, 12), cross_logit_blocks=(11, 12)):
        unet_noise(tiny_sd, latents, 300, text)
    with capture_attention(tiny_sd.unet, detached, cross_blocks=(11,)):
        unet_noise(tiny_sd, latents, 300, text)
    assert not detached.mean("cross", R // 2).requires_grad
    loss = (trained.mean("cross", R // 2) * weights).sum() + trained.mean("cross_logits", R // 2).square().mean()
    loss.backward()
    assert text.grad[0].abs().sum() == 0  # the unconditional row was not recorded
    assert text.grad[1].abs().sum() > 0


def test_maps_are_computed_in_fp32_under_autocast():
    gen = torch.Generator().manual_seed(0)
    query, key = torch.randn(1, 2, 64, 16, generator=gen), torch.randn(1, 2, 64, 16, generator=gen)
    expected = head_mean_attention(query, key, 0.25, logits=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = head_mean_attention(query, key, 0.25, logits=True)
    for got, want in zip(under_autocast, expected):
        assert got.dtype == torch.float32 and torch.equal(got, want)
