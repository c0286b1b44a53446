import pytest
import torch

from workers.methods.selfcross import (
    background_score,
    box_gate,
    class_cross_maps,
    minmax_per_class,
    propagate,
    segment,
    selfcross_scores,
)


def block_self_attention(regions: torch.Tensor) -> torch.Tensor:
    """(Q, Q) self-attention where every pixel attends uniformly to the pixels of its own region.

    regions: (g, g) integer region ids."""
    flat = regions.flatten()
    same = (flat[:, None] == flat[None, :]).float()
    return same / same.sum(1, keepdim=True)


def column_bands(grid: int, bounds: list[int]) -> torch.Tensor:
    """(grid, grid) region ids by column: columns [bounds[i], bounds[i+1]) are region i."""
    columns = torch.arange(grid)
    return (torch.bucketize(columns, torch.tensor(bounds[1:-1]), right=True)).expand(grid, grid)


def test_minmax_per_class():
    maps = torch.tensor([[2.0, 4.0, 6.0], [5.0, 5.0, 5.0], [-1.0, 0.0, 3.0]])
    scaled = minmax_per_class(maps)
    assert torch.allclose(scaled, torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.0, 0.0], [0.0, 0.25, 1.0]]))
    assert not scaled.isnan().any()
    assert minmax_per_class(torch.zeros(2, 4, 4)).eq(0).all()


def test_class_cross_maps_averages_span_and_weights_layers():
    # Maps vary along columns only. Class 0 is tokens [3, 5); class 1 is token 10.
    cross_r4 = torch.zeros(4, 4, 77)
    cross_r4[:, 0, 3] = 2.0  # token 3 at column 0, token 4 zero: the span mean is a one-hot column
    cross_r4[..., 10] = torch.rand(4, 4)
    cross_r8 = torch.zeros(2, 2, 77)
    cross_r8[:, 1, 3:5] = 1.0  # columns [0, 1], upsampled 2 -> 4: [0, 0.25, 0.75, 1]
    cross_r8[..., 10] = 0.5
    maps = class_cross_maps(
        {4: cross_r4.reshape(16, 77), 2: cross_r8.reshape(4, 77)}, {4: 4, 2: 1}, [(3, 5), (10, 11)], out_grid=4
    )
    assert maps.shape == (2, 4, 4)
    # (4 * [1, 0, 0, 0] + 1 * [0, .25, .75, 1]) / 5 = [.8, .05, .15, .2]; min-max -> [1, 0, 2/15, 1/5]
    expected_columns = torch.tensor([1.0, 0.0, 2 / 15, 1 / 5])
    assert torch.allclose(maps[0], expected_columns.expand(4, 4), atol=1e-6)
    assert maps[1].min() == 0 and maps[1].max() == 1


def test_class_cross_maps_constant_class_is_zero():
    cross = torch.ones(16, 77)
    maps = class_cross_maps({4: cross}, {4: 1}, [(1, 3)], out_grid=8)
    assert maps.shape == (1, 8, 8) and maps.eq(0).all()
    with pytest.raises(ValueError):
        class_cross_maps({4: torch.ones(15, 77)}, {4: 1}, [(1, 3)], out_grid=8)


def test_box_gate_two_blobs_give_two_boxes():
    cross = torch.zeros(1, 8, 8)
    cross[0, 1:3, 1:3] = 1.0
    cross[0, 5:7, 4:7] = 0.6
    expected = torch.zeros(1, 8, 8, dtype=torch.bool)
    expected[0, 1:3, 1:3] = True
    expected[0, 5:7, 4:7] = True
    assert torch.equal(box_gate(cross), expected)  # not the hull: (3, 3) stays closed


def test_box_gate_fills_the_bounding_box_of_a_region():
    cross = torch.zeros(2, 8, 8)
    cross[0, 1:6, 2] = 1.0  # an L: a column and a row
    cross[0, 5, 2:7] = 1.0
    cross[1, 2, 2] = 1.0  # diagonal neighbours are one region (8-connected)
    cross[1, 3, 3] = 0.5
    gate = box_gate(cross)
    assert gate[0].sum() == 5 * 5 and gate[0, 1:6, 2:7].all()
    assert gate[1].sum() == 4 and gate[1, 2:4, 2:4].all()


def test_box_gate_region_touching_the_border_keeps_the_last_row_and_column():
    cross = torch.zeros(1, 8, 8)
    cross[0, 6:, 5:] = 1.0
    gate = box_gate(cross)
    assert gate[0, 6:, 5:].all() and gate.sum() == 2 * 3


def test_box_gate_threshold_is_relative_and_strict():
    cross = torch.zeros(1, 8, 8)
    cross[0, 0, 0] = 1.0
    cross[0, 4, 4] = 0.2  # exactly 0.2 * max: out
    cross[0, 6, 6] = 0.21
    gate = box_gate(cross)
    assert gate[0, 0, 0] and gate[0, 6, 6] and not gate[0, 4, 4] and gate.sum() == 2
    assert box_gate(cross * 0.5).equal(gate)
    assert box_gate(cross, fraction=0.1).sum() == 3


def test_box_gate_quantises_like_the_reference():
    # q = uint8(255 * map) > int(0.2 * 255) = 51: 0.202 quantises to 51 and is out (a float
    # comparison with 0.2 would keep it); 0.204 quantises to 52 and is in.
    cross = torch.zeros(1, 8, 8)
    cross[0, 0, 0] = 1.0
    cross[0, 3, 3] = 0.202
    cross[0, 6, 6] = 0.204
    gate = box_gate(cross)
    assert gate[0, 0, 0] and gate[0, 6, 6] and not gate[0, 3, 3] and gate.sum() == 2
    # The COCO gate 0.5: int(127.5) = 127, so 0.5 (q 127) is out and 0.502 (q 128) is in.
    cross[0, 3, 3], cross[0, 6, 6] = 0.5, 0.502
    coco = box_gate(cross, fraction=0.5)
    assert coco[0, 6, 6] and not coco[0, 3, 3] and coco.sum() == 2


def test_box_gate_normalises_each_map_first():
    cross = torch.full((1, 8, 8), 0.4)
    cross[0, 1, 1] = 0.5  # min-max: 0.4 -> 0, 0.5 -> 1
    assert box_gate(cross).sum() == 1


def test_box_gate_constant_map():
    assert not box_gate(torch.zeros(2, 8, 8)).any()


def test_propagate_lands_on_the_planted_region():
    regions = column_bands(8, [0, 4, 8])
    self_attn = block_self_attention(regions)
    cross = torch.zeros(2, 8, 8)
    cross[0, 0, 0] = 1.0  # top-left corner, in the left region
    cross[1, 7, 7] = 1.0  # bottom-right corner, in the right region
    sc = propagate(self_attn, cross.flatten(1)).view(2, 8, 8)
    assert torch.allclose(sc[0], (regions == 0).float())
    assert torch.allclose(sc[1], (regions == 1).float())


def test_propagate_power():
    self_attn = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]])
    cross = torch.tensor([[0.0, 0.0, 1.0]])
    # S c = [0, .5, 1]; S S c = [.25, .75, 1] -> min-max [0, 2/3, 1]
    assert torch.allclose(propagate(self_attn, cross, power=1), torch.tensor([[0.0, 0.5, 1.0]]))
    assert torch.allclose(propagate(self_attn, cross, power=2), torch.tensor([[0.0, 2 / 3, 1.0]]))


def test_gate_zeroes_the_key_columns_of_the_propagator():
    # The reference: (S @ S) with the key columns outside the box zeroed, then @ C.
    generator = torch.Generator().manual_seed(0)
    self_attn = (5 * torch.randn(36, 36, generator=generator)).softmax(1)  # peaked, like real maps
    cross = torch.rand(3, 36, generator=generator)
    gate = torch.rand(3, 36, generator=generator) > 0.5
    expected = torch.stack([((self_attn @ self_attn) * gate[c]) @ cross[c] for c in range(3)])
    assert torch.allclose(propagate(self_attn, cross, gate), minmax_per_class(expected), atol=1e-5)


def test_gate_stops_weak_leakage():
    # Region rows 0-1 strong, rows 2-3 weak (below 0.2), rows 4-7 silent.
    regions = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])[:, None].expand(8, 8)
    self_attn = block_self_attention(regions)
    cross = torch.zeros(1, 8, 8)
    cross[0, :2] = 1.0
    cross[0, 2:4] = 0.1
    ungated = propagate(self_attn, cross.flatten(1)).view(8, 8)
    gated = propagate(self_attn, cross.flatten(1), box_gate(cross).flatten(1)).view(8, 8)
    assert torch.allclose(ungated[2:4], torch.full((2, 8), 0.1))
    assert torch.allclose(gated, (regions == 0).float())


def test_background_score():
    sc = torch.tensor([[0.2, 0.9], [0.4, 0.1]])
    assert torch.allclose(background_score(sc), torch.tensor([[0.36, 0.01]]))
    assert torch.allclose(background_score(sc, threshold=0.4), torch.tensor([[0.16, 0.01]]))
    # COCO's 0.35: (0.7 - max)^2.
    assert torch.allclose(background_score(sc, threshold=0.35), torch.tensor([[0.09, 0.04]]))


def test_segment_background_wins_where_every_class_is_weak():
    sc = torch.full((2, 4, 4), 0.1)
    sc[0, :2, :2] = 1.0
    sc[1, 2:, 2:] = 0.8
    scores = torch.cat([background_score(sc), sc])
    labels = segment(scores, (8, 12))
    assert labels.shape == (8, 12) and labels.dtype == torch.long
    assert labels[1, 1] == 1 and labels[6, 10] == 2
    assert labels[1, 10] == 0 and labels[6, 1] == 0  # both classes at 0.1: bg 0.81


def test_selfcross_scores_end_to_end():
    # Self grid 8 (R/2) with three column bands; cross at grids 4 (4 layers) and 2 (1 layer).
    regions = column_bands(8, [0, 3, 5, 8])
    cross_r4 = torch.zeros(4, 4, 77)
    cross_r8 = torch.zeros(2, 2, 77)
    cross_r4[0, 0, 5] = cross_r8[0, 0, 5] = 1.0  # class 1 ("cat", token 5): top-left
    cross_r4[3, 3, 7:9] = cross_r8[1, 1, 7:9] = 1.0  # class 2 (tokens 7, 8): bottom-right
    cross_r4[..., 10] = cross_r8[..., 10] = 0.3  # class 3: the same everywhere
    cross = {4: cross_r4.reshape(16, 77), 2: cross_r8.reshape(4, 77)}
    layers = {4: 4, 2: 1}
    self_attn = block_self_attention(regions)
    sc = selfcross_scores(cross, layers, self_attn, [(5, 6), (7, 9), (10, 11)])
    assert sc.shape == (3, 8, 8)
    assert torch.allclose(sc[0], (regions == 0).float())
    assert torch.allclose(sc[1], (regions == 2).float())
    assert sc[2].eq(0).all()

    # The coarse grid spreads class 1 into the middle band; only the gate keeps it out.
    ungated = selfcross_scores(cross, layers, self_attn, [(5, 6)], gate_fraction=None)
    assert (ungated[0][regions == 1] > 0).all()

    draws = torch.stack([sc, sc]).mean(0)
    labels = segment(torch.cat([background_score(draws), draws]), (16, 16))
    expected = torch.tensor([1, 0, 2])[regions].repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(labels, expected)
    with pytest.raises(ValueError):
        selfcross_scores(cross, layers, torch.ones(63, 63), [(5, 6)])
