"""DiffSeg post-processing on planted attention structure and hand-checkable cases."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workers.methods import diffseg

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def planted_regions(side: int = 64) -> torch.Tensor:
    """(side, side) labels: four quadrants and an irregular blob (ellipse plus a bar) across
    three of them."""
    regions = torch.zeros(side, side, dtype=torch.long)
    half = side // 2
    regions[:half, half:] = 1
    regions[half:, :half] = 2
    regions[half:, half:] = 3
    i, j = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    ellipse = (i - 30) ** 2 / 14**2 + (j - 26) ** 2 / 9**2 < 1
    bar = ((i - 40).abs() < 5) & ((j - 36).abs() < 12)
    regions[ellipse | bar] = 4
    return regions


def planted_attention(regions: torch.Tensor, *, leak=0.3, peak=0.5, sigma=4.0, noise=0.2, seed=0) -> torch.Tensor:
    """Row-stochastic (P, P) attention of a planted segmentation: each pixel's map is a mix of
    uniform over its region and a Gaussian peak around it (inside its region), plus a uniform
    leak over the whole image and multiplicative noise."""
    side = regions.shape[0]
    flat = regions.flatten()
    same = (flat[:, None] == flat[None, :]).float()
    i, j = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    position = torch.stack([i.flatten(), j.flatten()], 1).float()
    local = torch.exp(-(torch.cdist(position, position) ** 2) / (2 * sigma**2)) * same
    attn = (1 - leak) * (
        (1 - peak) * same / same.sum(1, keepdim=True) + peak * local / local.sum(1, keepdim=True)
    ) + leak / flat.numel()
    attn *= 1 + noise * torch.rand(attn.shape, generator=torch.Generator().manual_seed(seed))
    return attn / attn.sum(1, keepdim=True)


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two label maps are equal up to a relabelling."""
    pairs = torch.unique(torch.stack([a.flatten(), b.flatten()]), dim=1).shape[1]
    return pairs == len(a.unique()) == len(b.unique())


@pytest.fixture(scope="module")
def planted():
    regions = planted_regions()
    return regions, planted_attention(regions)


# Blocky layout: exact at every grid 64, 32, 16, 8, so downsampling keeps the same structure.
COARSE_LAYOUT = torch.tensor(
    [
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 4, 4, 4, 1, 1, 1],
        [0, 0, 4, 4, 4, 4, 1, 1],
        [0, 4, 4, 4, 0, 1, 1, 1],
        [2, 2, 4, 2, 3, 3, 3, 3],
        [2, 2, 2, 2, 3, 3, 3, 3],
        [2, 2, 2, 2, 3, 3, 3, 3],
        [2, 2, 2, 2, 3, 3, 3, 3],
    ]
)


def blocky_regions(side: int) -> torch.Tensor:
    block = side // 8
    return COARSE_LAYOUT.repeat_interleave(block, 0).repeat_interleave(block, 1)


# ---- merge on planted structure ------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.5, 0.8, 1.1, 1.5])
def test_merge_recovers_planted_regions_across_threshold_band(planted, tau):
    regions, attn = planted
    labels = diffseg.merge(attn, kl_threshold=tau)
    assert labels.shape == (64, 64) and labels.dtype == torch.int64
    assert same_partition(labels, regions)
    assert labels.unique().tolist() == list(range(5))


def test_threshold_outside_band_over_or_under_segments(planted):
    """The band above is honest: below it regions split, above it everything merges."""
    regions, attn = planted
    assert len(diffseg.merge(attn, kl_threshold=0.3).unique()) > 5
    assert len(diffseg.merge(attn, kl_threshold=1.9).unique()) == 1


def test_merge_output_size_and_first_appearance_numbering(planted):
    regions, attn = planted
    labels = diffseg.merge(attn, kl_threshold=1.0, output_size=(128, 128))
    assert labels.shape == (128, 128)
    assert torch.equal(labels, diffseg.relabel_by_first_appearance(labels))
    # Bilinear upsampling may move a curved boundary by a pixel; away from boundaries the
    # labels are the nearest-upsampled regions.
    expected = regions.repeat_interleave(2, 0).repeat_interleave(2, 1)
    neighbourhood = F.max_pool2d(expected[None].float(), 3, 1, 1), -F.max_pool2d(-expected[None].float(), 3, 1, 1)
    interior = (neighbourhood[0] == neighbourhood[1])[0]
    assert interior.float().mean() > 0.9
    assert same_partition(labels[interior], expected[interior])


def test_merge_with_refinement_keeps_planted_regions(planted):
    regions, attn = planted
    assert same_partition(diffseg.merge(attn, kl_threshold=1.0, refine=True), regions)


def test_refined_centres_are_a_lloyd_fixed_point(planted):
    _, attn = planted
    start = diffseg.proposals(attn, kl_threshold=0.3)  # over-segmented start
    centres = diffseg.refine_proposals(attn, start)
    nearest = torch.cdist(attn, centres).argmin(1)
    means = torch.stack([attn[nearest == k].mean(0) for k in range(len(centres))])
    torch.testing.assert_close(means, centres, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("tau", [0.5, 1.0, 1.5])
def test_transposed_input_gives_transposed_labels(planted, tau):
    _, attn = planted
    transpose = torch.arange(64 * 64).view(64, 64).T.flatten()
    labels = diffseg.merge(attn, kl_threshold=tau)
    labels_t = diffseg.merge(attn[transpose][:, transpose], kl_threshold=tau)
    assert same_partition(labels_t, labels.T)


def test_first_iteration_is_transpose_equivariant(planted):
    """Anchors form a symmetric grid, so transposing permutes the first proposals exactly."""
    _, attn = planted
    side, grid = 64, 16
    transpose = torch.arange(side * side).view(side, side).T.flatten()
    anchors = diffseg.anchor_indices(side, grid)
    first = diffseg.anchor_proposals(attn, anchors, 1.0)
    first_t = diffseg.anchor_proposals(attn[transpose][:, transpose], anchors, 1.0)
    anchor_t = torch.arange(grid * grid).view(grid, grid).T.flatten()
    torch.testing.assert_close(first_t, first[anchor_t][:, transpose])


@pytest.mark.parametrize("tau", [0.8, 1.0, 1.5])
def test_merge_via_aggregate_of_downsampled_planted_structure(tau):
    maps = {g: planted_attention(blocky_regions(g), seed=g) for g in (64, 32, 16, 8)}
    labels = diffseg.merge(diffseg.aggregate(maps), kl_threshold=tau)
    assert same_partition(labels, blocky_regions(64))


@pytest.mark.parametrize("device", DEVICES)
def test_merge_is_device_agnostic(planted, device):
    regions, attn = planted
    labels = diffseg.merge(attn.to(device), kl_threshold=1.0)
    assert labels.device.type == device
    assert same_partition(labels.cpu(), regions)


# ---- aggregate ----------------------------------------------------------------------------


def random_stochastic(rows: int, generator: torch.Generator) -> torch.Tensor:
    maps = torch.rand(rows, rows, generator=generator) ** 3
    return maps / maps.sum(1, keepdim=True)


def bilinear_matrix(source: int, target: int) -> torch.Tensor:
    """(target, source) 1-D bilinear resampling weights, align_corners=False, by hand."""
    weights = torch.zeros(target, source, dtype=torch.float64)
    for x in range(target):
        position = max((x + 0.5) * source / target - 0.5, 0.0)
        low = math.floor(position)
        high = min(low + 1, source - 1)
        weights[x, low] += 1 - (position - low)
        weights[x, high] += position - low
    return weights


def aggregate_by_loops(maps: dict, weights: dict) -> torch.Tensor:
    side = max(maps)
    total = sum(weights.values())
    out = torch.zeros(side * side, side * side, dtype=torch.float64)
    for g, attn in maps.items():
        resample = bilinear_matrix(g, side)
        for row in range(side):
            for col in range(side):
                query = (row * g // side) * g + col * g // side
                key_map = resample @ attn[query].double().view(g, g) @ resample.T
                out[row * side + col] += weights[g] / total * (key_map / key_map.sum()).flatten()
    return out / out.sum(1, keepdim=True)


def test_aggregate_matches_loop_implementation():
    generator = torch.Generator().manual_seed(1)
    maps = {4: random_stochastic(16, generator), 2: random_stochastic(4, generator)}
    expected = aggregate_by_loops(maps, {4: 4.0, 2: 2.0})
    torch.testing.assert_close(diffseg.aggregate(maps).double(), expected, rtol=1e-5, atol=1e-7)
    custom = {4: 1.0, 2: 3.0}
    torch.testing.assert_close(
        diffseg.aggregate(maps, custom).double(), aggregate_by_loops(maps, custom), rtol=1e-5, atol=1e-7
    )


def test_aggregate_rows_sum_to_one():
    generator = torch.Generator().manual_seed(2)
    maps = {g: random_stochastic(g * g, generator) for g in (16, 8, 4, 2)}
    out = diffseg.aggregate(maps)
    assert out.shape == (256, 256)
    torch.testing.assert_close(out.sum(1), torch.ones(256))
    assert (out >= 0).all()


def test_aggregate_single_grid_returns_itself():
    attn = random_stochastic(64, torch.Generator().manual_seed(3))
    torch.testing.assert_close(diffseg.aggregate({8: attn}), attn)


def test_aggregate_rejects_grid_not_dividing_largest():
    with pytest.raises(ValueError):
        diffseg.aggregate({6: torch.eye(36), 4: torch.eye(16)})


# ---- distance and anchors -----------------------------------------------------------------


def test_kl_distance_matches_double_loop_and_has_no_nan_with_zeros():
    generator = torch.Generator().manual_seed(4)
    x = torch.rand(5, 12, generator=generator, dtype=torch.float64)
    y = torch.rand(7, 12, generator=generator, dtype=torch.float64)
    x[0, :3] = 0.0  # exact zeros where y is positive, and the other way round
    y[1, 5:9] = 0.0
    x, y = x / x.sum(1, keepdim=True), y / y.sum(1, keepdim=True)
    expected = torch.zeros(5, 7, dtype=torch.float64)
    for n in range(5):
        for m in range(7):
            log_ratio = x[n].clamp_min(1e-12).log() - y[m].clamp_min(1e-12).log()
            expected[n, m] = 0.5 * ((x[n] - y[m]) * log_ratio).sum()
    distance = diffseg.kl_distance(x, y)
    assert distance.dtype == torch.float64
    torch.testing.assert_close(distance, expected)
    distance32 = diffseg.kl_distance(x.float(), y.float())
    assert distance32.dtype == torch.float32 and not distance32.isnan().any()
    torch.testing.assert_close(distance32.double(), expected, rtol=1e-4, atol=1e-4)


def test_kl_distance_symmetric_with_zero_diagonal():
    generator = torch.Generator().manual_seed(5)
    x = torch.rand(20, 64, generator=generator) ** 4
    x[3, 10:] = 0.0
    x = x / x.sum(1, keepdim=True)
    distance = diffseg.kl_distance(x, x)
    torch.testing.assert_close(distance, distance.T)
    torch.testing.assert_close(distance.diagonal(), torch.zeros(20), rtol=0, atol=1e-5)
    assert (distance >= 0).all()


def test_anchor_indices():
    anchors = diffseg.anchor_indices(64, 16)
    axis = list(range(1, 62, 4))
    assert anchors.tolist() == [r * 64 + c for r in axis for c in axis]
    assert diffseg.anchor_indices(32, 16).tolist()[:3] == [0, 2, 4]  # step 2, start 0
    assert diffseg.anchor_indices(64, 1).tolist() == [31 * 64 + 31]


# ---- greedy merging -----------------------------------------------------------------------

A = torch.tensor([0.8, 0.1, 0.1], dtype=torch.float64)
B = torch.tensor([0.1, 0.8, 0.1], dtype=torch.float64)
C = torch.tensor([0.45, 0.45, 0.1], dtype=torch.float64)


def test_greedy_iteration_lets_groups_overlap():
    distance = diffseg.kl_distance(torch.stack([A, B]), torch.stack([B, C]))
    assert distance[0, 0] > 1.0 and distance[0, 1] < 1.0 and distance[1, 1] < 1.0
    merged = diffseg.merge_proposals(torch.stack([A, B, C]), 1.0)
    torch.testing.assert_close(merged, torch.stack([(A + C) / 2, (B + C) / 2]))


def test_greedy_iteration_follows_index_order():
    merged = diffseg.merge_proposals(torch.stack([C, A, B]), 1.0)
    torch.testing.assert_close(merged, torch.stack([(A + B + C) / 3]))


# ---- output step and naming ---------------------------------------------------------------


def test_relabel_by_first_appearance():
    labels = torch.tensor([[5, 5, 2], [7, 2, 5]])
    assert diffseg.relabel_by_first_appearance(labels).tolist() == [[0, 0, 1], [2, 1, 0]]


@pytest.mark.parametrize("seed", range(6))
def test_relabel_matches_a_sort_by_first_position(seed):
    labels = torch.randint(0, 9, (37, 23), generator=torch.Generator().manual_seed(seed)) * 3
    flat = labels.flatten().tolist()
    order = list(dict.fromkeys(flat))  # values in order of first appearance
    expected = torch.tensor([order.index(v) for v in flat]).view(37, 23)
    assert torch.equal(diffseg.relabel_by_first_appearance(labels), expected)


def upsampled_argmax(proposals: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    side = math.isqrt(proposals.shape[1])
    up = F.interpolate(proposals.view(1, -1, side, side), size=size, mode="bilinear", align_corners=False)
    return up[0].argmax(0)


def test_chunked_argmax_matches_direct_argmax():
    proposals = torch.rand(70, 64, generator=torch.Generator().manual_seed(6))  # > one chunk
    assert torch.equal(diffseg.proposals_to_labels(proposals, (20, 24)), upsampled_argmax(proposals, (20, 24)))
    assert torch.equal(diffseg.proposals_to_labels(proposals), proposals.argmax(0).view(8, 8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(12))
def test_bilinear_argmax_is_the_argmax_of_the_upsampled_maps(seed, device):
    """Decided cells and evaluated borders together give exactly F.interpolate's argmax, ties included."""
    generator = torch.Generator().manual_seed(seed)
    count, side = int(torch.randint(1, 25, (1,), generator=generator)), [4, 8, 16, 28][seed % 4]
    maps = torch.rand(count, 1, side, side, generator=generator)
    if seed % 3:  # smooth maps: large decided regions, as real proposals
        maps = F.avg_pool2d(maps, 5, 1, 2, count_include_pad=False)
    if seed % 4 == 1:
        maps[count // 2] = maps[0]  # exact ties go to the lower index
    proposals = maps.flatten(1).to(device)
    size = (
        int(torch.randint(side, 150, (1,), generator=generator)),
        int(torch.randint(1, 150, (1,), generator=generator)),
    )
    assert torch.equal(diffseg.proposals_to_labels(proposals, size), upsampled_argmax(proposals, size))


def test_bilinear_argmax_at_photo_size():
    """Smooth proposals (mostly decided cells) at a photo's size: the same labels as upsampling them all."""
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    centres = torch.rand(12, 2, generator=torch.Generator().manual_seed(2)) * 64
    maps = torch.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 200)
    assert torch.equal(
        diffseg.proposals_to_labels(maps.flatten(1), (1200, 1600)), upsampled_argmax(maps.flatten(1), (1200, 1600))
    )


def test_segment_word_scores():
    labels = torch.tensor([[0, 0, 1], [1, 1, 1]])
    word_maps = torch.tensor(
        [
            [[1.0, 0.0, 0.2], [0.2, 0.2, 0.2]],
            [[0.0, 0.5, 0.5], [0.5, 0.5, 0.1]],
        ]
    )
    scores = diffseg.segment_word_scores(labels, word_maps)
    assert scores.argmax(1).tolist() == [0, 1]
    assert scores[0, 0].item() == pytest.approx(0.5)
    assert scores[1, 1].item() == pytest.approx(0.4)


def test_segment_word_scores_upsamples_small_maps():
    labels = torch.zeros(8, 8, dtype=torch.long)
    labels[:, 4:] = 1
    word_maps = torch.zeros(2, 2, 2)
    word_maps[0, :, 0] = 1.0  # word 0 lives on the left, word 1 on the right
    word_maps[1, :, 1] = 1.0
    assert diffseg.segment_word_scores(labels, word_maps).argmax(1).tolist() == [0, 1]


@pytest.mark.parametrize(
    "values, dtype",
    [([0, 3, 255], np.uint8), ([0, 256], np.uint16), ([-1, 5], np.int8), ([0, 70000], np.uint32)],
)
def test_label_maps_leave_in_the_narrowest_type(values, dtype):
    from workers.methods import label_maps

    labels = torch.tensor(values).reshape(1, -1)
    out = label_maps.to_numpy(labels)
    assert out.dtype == dtype and out.tolist() == [values]
