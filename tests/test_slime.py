"""SLiMe's tensor steps against hand-computed values and planted signals (docs/methods.md section 3)."""

import math

import pytest
import torch

from workers.methods.slime import (
    Canvas,
    augment,
    class_weights,
    crop_boxes,
    crop_scores,
    cross_entropy_loss,
    gaussian_blur,
    keep_and_gate,
    learned_embeddings,
    mean_iou,
    mse_loss,
    part_crop_box,
    rescaled_was,
    rotate_pair,
    sd_loss,
    select_token_maps,
    slime_loss,
    weighted_self_attention,
)

LN3 = math.log(3.0)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# Two pixels a, b; logits make p(a) = [3/4, 1/4] and p(b) = [1/4, 3/4]; a is background, b part 1.
TWO_PIXEL_LOGITS = torch.tensor([[[LN3, 0.0]], [[0.0, LN3]]])  # (K=2, 1, 2)
TWO_PIXEL_MASK = torch.tensor([[0, 1]])
# Query a attends only to itself; query b attends half to a, half to b (rows are queries).
TWO_PIXEL_SELF_ATTN = torch.tensor([[1.0, 0.0], [0.5, 0.5]])


# --- losses --------------------------------------------------------------------------------------


def test_class_weights_background_one_parts_inverse_frequency_absent_zero():
    mask = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 2, 2]])  # 8 bg, 6 of 1, 2 of 2
    weights = class_weights(mask, num_classes=4)  # part 3 absent
    # 8 non-background pixels: part 1 -> 8/6, part 2 -> 8/2.
    assert torch.allclose(weights, torch.tensor([1.0, 4 / 3, 4.0, 0.0]))


def test_cross_entropy_is_torch_weighted_mean():
    logits = torch.tensor([[[0.0, 0.0]], [[0.0, LN3]]])  # p_0(a) = 1/2, p_1(b) = 3/4
    weights = torch.tensor([1.0, 3.0])
    expected = (1 * math.log(2) + 3 * math.log(4 / 3)) / (1 + 3)
    assert cross_entropy_loss(logits, TWO_PIXEL_MASK, weights).item() == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_ignores_absent_class_weight():
    # An absent class's weight only changes the denominator if a pixel has that label.
    logits = torch.randn(3, 2, 2)
    mask = torch.tensor([[0, 1], [1, 0]])
    with_absent = cross_entropy_loss(logits, mask, torch.tensor([1.0, 2.0, 0.0]))
    other_absent_weight = cross_entropy_loss(logits, mask, torch.tensor([1.0, 2.0, 5.0]))
    assert with_absent.item() == pytest.approx(other_absent_weight.item())


def test_weighted_self_attention_reads_rows_as_queries():
    probs = torch.tensor([[[0.75, 0.25]], [[0.25, 0.75]]])
    was = weighted_self_attention(probs, TWO_PIXEL_SELF_ATTN)
    # WAS_0(a) = 0.75; WAS_0(b) = 0.5 * 0.75 + 0.5 * 0.25 = 0.5; WAS_1 = 1 - WAS_0.
    assert torch.allclose(was, torch.tensor([[[0.75, 0.5]], [[0.25, 0.5]]]))


def test_mse_loss_has_factor_k():
    # WAS from the test above; onehot = [[1, 0]], [[0, 1]].
    # Squared errors: 0.25^2, 0.5^2, 0.25^2, 0.5^2 -> sum 0.625 -> mean 0.15625 -> times K = 2.
    loss = mse_loss(TWO_PIXEL_LOGITS, TWO_PIXEL_SELF_ATTN, TWO_PIXEL_MASK)
    assert loss.item() == pytest.approx(0.3125, rel=1e-6)


def test_mse_loss_k_factor_with_three_classes_and_uniform_probs():
    # Zero logits -> p = 1/3 everywhere; identity self-attention keeps it. Per pixel the errors
    # are (2/3)^2 once and (1/3)^2 twice = 6/9; mean over 3 entries = 2/9; times K = 3 -> 2/3.
    loss = mse_loss(torch.zeros(3, 2, 2), torch.eye(4), torch.tensor([[0, 1], [2, 2]]))
    assert loss.item() == pytest.approx(2 / 3, rel=1e-6)


def test_sd_loss_uses_guidance_100():
    eps_uncond = torch.ones(4, 2, 2)
    eps_cond = torch.full((4, 2, 2), 1.02)  # guided prediction 1 + 100 * 0.02 = 3
    eps = torch.tensor([3.0, 1.0]).repeat(8).view(4, 2, 2)  # errors 0 and 2 alternate
    assert sd_loss(eps_uncond, eps_cond, eps).item() == pytest.approx((0 + 4) / 2, rel=1e-5)
    assert sd_loss(eps_uncond, eps_cond, eps, guidance=1.0).item() == pytest.approx(
        ((1.02 - 3) ** 2 + (1.02 - 1) ** 2) / 2, rel=1e-5
    )


def test_slime_loss_combines_ce_mse_and_sd():
    eps_uncond, eps_cond, eps = torch.zeros(4, 2, 2), torch.full((4, 2, 2), 0.01), torch.full((4, 2, 2), 0.5)
    total, parts = slime_loss(TWO_PIXEL_LOGITS, TWO_PIXEL_SELF_ATTN, TWO_PIXEL_MASK, eps_uncond, eps_cond, eps)
    ce = math.log(4 / 3)  # weights [1, 1/1]; each pixel's true class has p = 3/4
    mse = 0.3125
    sd = (100 * 0.01 - 0.5) ** 2
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert parts["mse"].item() == pytest.approx(mse, rel=1e-6)
    assert parts["sd"].item() == pytest.approx(sd, rel=1e-5)
    assert total.item() == pytest.approx(ce + mse + 0.005 * sd, rel=1e-6)


def test_slime_loss_gradient_reaches_logits():
    logits = torch.randn(3, 4, 4, requires_grad=True)
    self_attn = torch.rand(16, 16).softmax(dim=1)
    mask = torch.randint(0, 3, (4, 4))
    eps = torch.randn(4, 4, 4)
    total, _ = slime_loss(logits, self_attn, mask, eps, eps, eps)
    total.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


# --- learned embeddings --------------------------------------------------------------------------


def test_learned_embeddings_places_vectors_and_only_they_get_gradients():
    base = torch.randn(77, 8, requires_grad=True)
    vectors = torch.randn(3, 8, requires_grad=True)  # K = 4
    out = learned_embeddings(base, vectors)
    assert out.shape == (77, 8)
    assert torch.equal(out[0], base[0]) and torch.equal(out[1:4], vectors) and torch.equal(out[4:], base[4:])

    out.sum().backward()
    assert base.grad is None
    assert torch.equal(vectors.grad, torch.ones(3, 8))


def test_learned_embeddings_background_and_padding_do_not_move_vectors():
    vectors = torch.randn(2, 8, requires_grad=True)
    out = learned_embeddings(torch.randn(77, 8), vectors)
    (out[0].sum() + out[3:].sum()).backward()
    assert torch.equal(vectors.grad, torch.zeros(2, 8))


def test_learned_embeddings_follow_vector_dtype():
    out = learned_embeddings(torch.randn(77, 8, dtype=torch.float16), torch.randn(2, 8))
    assert out.dtype == torch.float32


def test_mean_iou_over_classes_present_in_ground_truth():
    mask = torch.tensor([[0, 0], [1, 1]])
    pred = torch.tensor([[0, 2], [1, 1]])  # class 2 is absent from the mask: not averaged
    # background: intersection 1, union 2; part 1: 2 / 2.
    assert mean_iou(pred, mask, num_classes=3) == pytest.approx((0.5 + 1.0) / 2)
    assert mean_iou(mask, mask, num_classes=3) == 1.0


# --- augmentation --------------------------------------------------------------------------------


def two_part_example(size: int = 512):
    """Image and mask with a left-middle strip (part 1) and a central block (part 2)."""
    mask = torch.zeros(size, size, dtype=torch.long)
    s = size // 512
    mask[206 * s : 306 * s, 0 : 40 * s] = 1
    mask[200 * s : 320 * s, 220 * s : 300 * s] = 2
    image = torch.rand(3, size, size)
    return image, mask


def test_augment_shapes_and_determinism():
    image, mask = torch.rand(3, 300, 200), torch.randint(0, 3, (300, 200))
    first = augment(image, mask, generator=seeded(7), part_cycle=0, latent_size=64)
    again = augment(image, mask, generator=seeded(7), part_cycle=0, latent_size=64)
    other = augment(image, mask, generator=seeded(8), part_cycle=0, latent_size=64)
    assert first[0].shape == (3, 512, 512) and first[0].dtype == torch.float32
    assert first[1].shape == (64, 64) and first[1].dtype == torch.long
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_augment_mask_keeps_original_labels():
    image, mask = torch.rand(3, 96, 96), torch.tensor([1, 3, 7]).repeat(96 * 32).view(96, 96)  # no 0
    for seed in range(12):
        _, out = augment(image, mask, generator=seeded(seed), size=128, part_cycle=seed, latent_size=16)
        assert set(out.unique().tolist()) <= {0, 1, 3, 7}  # 0 only from rotation padding


def test_augment_crop_keeps_the_cycled_part():
    image, mask = two_part_example()
    for seed in range(6):
        # Parts present are [1, 2]; cycle 0 picks the small strip at the border, which a random
        # crop of side >= 0.7 would often cut.
        _, out = augment(image, mask, generator=seeded(seed), part_cycle=0, latent_size=64)
        assert (out == 1).any()


def test_part_crop_box_keeps_over_30_percent_of_the_part():
    _, mask = two_part_example()
    part = mask == 1
    for seed in range(40):
        top, left, height, width = part_crop_box(mask, 1, generator=seeded(seed), min_crop=0.6)
        assert height == width and 0.6 * 512 - 1 <= height <= 512
        assert 0 <= top <= 512 - height and 0 <= left <= 512 - width
        assert part[top : top + height, left : left + width].sum() / part.sum() > 0.3


def test_part_crop_box_falls_back_to_whole_image_when_impossible():
    mask = torch.zeros(64, 64, dtype=torch.long)
    mask[0, 0] = mask[0, 63] = mask[63, 0] = mask[63, 63] = 1  # a crop of side < 64 holds <= 1/4
    assert part_crop_box(mask, 1, generator=seeded(0), min_crop=0.7, tries=20) == (0, 0, 64, 64)


def test_part_crop_box_without_parts_takes_first_random_box():
    box = part_crop_box(torch.zeros(64, 64, dtype=torch.long), None, generator=seeded(3), min_crop=0.7)
    assert box[2] < 64  # a random crop, not the fallback


def test_gaussian_blur_keeps_constants_and_mass():
    image = torch.rand(3, 8, 8)
    assert torch.equal(gaussian_blur(image, 1), image)
    constant = torch.full((3, 9, 9), 0.25)
    assert torch.allclose(gaussian_blur(constant, 5), constant)
    impulse = torch.zeros(3, 9, 9)
    impulse[:, 4, 4] = 1
    blurred = gaussian_blur(impulse, 3)
    assert torch.allclose(blurred.sum(dim=(1, 2)), torch.ones(3))
    assert blurred[0, 4, 4] < 1 and blurred[0, 3, 4] > 0


def test_rotate_by_90_matches_rot90_and_by_0_is_identity():
    image, mask = torch.rand(3, 6, 6), torch.randint(0, 4, (6, 6))
    same_image, same_mask = rotate_pair(image, mask, 0.0)
    assert torch.allclose(same_image, image, atol=1e-6) and torch.equal(same_mask, mask)
    turned_image, turned_mask = rotate_pair(image, mask, 90.0)
    k = 1 if torch.equal(turned_mask, mask.rot90(1, (0, 1))) else -1
    assert torch.equal(turned_mask, mask.rot90(k, (0, 1)))
    assert torch.allclose(turned_image, image.rot90(k, (1, 2)), atol=1e-5)


# --- segmenting ----------------------------------------------------------------------------------


def test_crop_boxes():
    assert crop_boxes(512, 1) == [(0, 0, 512, 512)]
    assert crop_boxes(512, 2) == [(0, 0, 400, 400), (0, 112, 400, 400), (112, 0, 400, 400), (112, 112, 400, 400)]


def test_select_token_maps_takes_first_k_of_77():
    probs = torch.rand(16, 77).softmax(dim=1)
    maps = select_token_maps(probs, 3)
    assert maps.shape == (3, 16)
    assert torch.equal(maps, probs[:, :3].T)


def test_keep_and_gate_drops_weak_classes_and_gates_first_kept():
    ca = torch.zeros(3, 2, 2)
    ca[0] = torch.tensor([[0.9, 0.1], [0.6, 0.2]])  # mean 0.45
    ca[1] = torch.tensor([[0.2, 0.0], [0.0, 0.0]])  # max exactly at the threshold: kept
    ca[2] = torch.tensor([[0.1, 0.19], [0.0, 0.0]])  # dropped
    gated, kept = keep_and_gate(ca, 0.2)
    assert kept.tolist() == [0, 1]
    assert torch.equal(gated[0], torch.tensor([[0.9, 0.0], [0.6, 0.0]]))
    assert torch.equal(gated[1], ca[1])  # only the first kept class is gated


def test_keep_and_gate_keeps_values_strictly_above_the_mean():
    ca = torch.tensor([[[0.8, 0.4], [0.4, 0.0]]])  # mean 0.4: the two 0.4s are not above it
    gated, _ = keep_and_gate(ca)
    assert torch.equal(gated[0], torch.tensor([[0.8, 0.0], [0.0, 0.0]]))


def test_keep_and_gate_gates_first_part_when_background_is_dropped():
    ca = torch.stack([torch.full((2, 2), 0.1), torch.tensor([[0.8, 0.4], [0.3, 0.1]]), torch.full((2, 2), 0.5)])
    gated, kept = keep_and_gate(ca)
    assert kept.tolist() == [1, 2]
    assert torch.equal(gated[0], torch.tensor([[0.8, 0.0], [0.0, 0.0]]))  # the mean 0.4 itself goes
    assert torch.equal(gated[1], ca[2])  # a constant map is never below its mean


def test_keep_and_gate_nothing_kept():
    gated, kept = keep_and_gate(torch.full((3, 4, 4), 0.05))
    assert gated.shape == (0, 4, 4) and kept.numel() == 0
    scores, kept = crop_scores(torch.full((3, 4, 4), 0.05), torch.eye(16), 8)
    assert scores.shape == (0, 8, 8) and kept.numel() == 0
    canvas = Canvas(num_classes=3, height=8, width=8)
    canvas.add(scores, kept, (0, 0, 8, 8))
    assert torch.equal(canvas.labels(), torch.zeros(8, 8, dtype=torch.long))


def random_row_stochastic(n: int, seed: int) -> torch.Tensor:
    return (3 * torch.randn(n, n, generator=seeded(seed))).softmax(dim=1)


def test_rescaled_was_spans_each_class_range():
    ca = torch.rand(3, 4, 4, generator=seeded(1))
    scores = rescaled_was(ca, random_row_stochastic(16, 2), 10)
    assert scores.shape == (3, 10, 10)
    assert torch.allclose(scores.flatten(1).amin(dim=1), ca.flatten(1).amin(dim=1), atol=1e-6)
    assert torch.allclose(scores.flatten(1).amax(dim=1), ca.flatten(1).amax(dim=1), atol=1e-6)


def test_rescaled_was_constant_map_goes_to_range_min():
    ca = torch.full((1, 2, 2), 0.3)
    scores = rescaled_was(ca, random_row_stochastic(4, 0), (3, 5), (torch.tensor([0.1]), torch.tensor([0.7])))
    assert scores.shape == (1, 3, 5) and torch.allclose(scores, torch.full((1, 3, 5), 0.1))


def test_crop_scores_rescale_onto_range_before_gating():
    ca = torch.rand(3, 4, 4, generator=seeded(5)) * 0.5 + 0.3  # every class kept, min >= 0.3
    scores, kept = crop_scores(ca, random_row_stochastic(16, 6), 8)
    assert kept.tolist() == [0, 1, 2]
    # The gated background has zeros, but its scores keep the ungated floor.
    assert scores[0].min().item() == pytest.approx(ca[0].min().item(), abs=1e-6)
    assert scores[0].max().item() == pytest.approx(ca[0].max().item(), abs=1e-6)


def test_canvas_averages_each_class_over_crops_that_kept_it():
    canvas = Canvas(num_classes=3, height=2, width=5)
    # Crop A covers columns 0-2 and keeps classes 0 and 1; crop B covers columns 1-3, keeps 0.
    canvas.add(torch.stack([torch.full((2, 3), 0.3), torch.full((2, 3), 0.5)]), torch.tensor([0, 1]), (0, 0, 2, 3))
    canvas.add(torch.full((1, 2, 3), 0.4), torch.tensor([0]), (0, 1, 2, 3))
    # Overlap (columns 1-2): class 0 averages (0.3 + 0.4) / 2 = 0.35 < class 1's 0.5 from one crop.
    assert torch.allclose(canvas.sums[0] / canvas.counts[0].clamp(min=1), torch.tensor([[0.3, 0.35, 0.35, 0.4, 0]] * 2))
    assert canvas.labels().tolist() == [[1, 1, 1, 0, 0]] * 2  # column 4: never covered -> background


def test_canvas_uncovered_pixels_are_background_even_if_classes_score_zero_elsewhere():
    canvas = Canvas(num_classes=2, height=3, width=3)
    canvas.add(torch.full((1, 2, 2), 0.9), torch.tensor([1]), (1, 1, 2, 2))
    assert canvas.labels().tolist() == [[0, 0, 0], [0, 1, 1], [0, 1, 1]]


def test_crops_compose_back_to_a_planted_label_map():
    truth = torch.zeros(16, 16, dtype=torch.long)
    truth[2:6, 2:6] = 1  # only inside the top-left crops
    truth[9:15, 8:14] = 2
    canvas = Canvas(num_classes=3, height=16, width=16)
    for top, left, height, width in crop_boxes(16, 2, crop_size=12):
        window = truth[top : top + height, left : left + width]
        ca = torch.stack([torch.where(window == c, 0.9, 0.05) for c in range(3)])
        scores, kept = crop_scores(ca, torch.eye(height * width), (height, width))
        canvas.add(scores, kept, (top, left, height, width))
    assert torch.equal(canvas.labels(), truth)
