"""From Text to Mask (method `selfcross`, methods 2.2): cross-attention propagated by self-attention.

Each step is a small pure function on fp32 tensors; `selfcross_scores` composes them for one noise
draw, the caller averages the draws, adds `background_score` and calls `segment`.
Grids are square: a (Q, ...) map has Q = g * g positions in row-major order.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from workers.methods.prompts import mean_over_spans


def minmax_per_class(maps: torch.Tensor) -> torch.Tensor:
    """Rescale each class's map to [0, 1].

    maps: (C, ...). Returns (C, ...) float32; a constant map becomes zeros (no NaN).
    """
    flat = maps.float().flatten(1)
    low = flat.amin(1, keepdim=True)
    span = flat.amax(1, keepdim=True) - low
    # A constant map has a zero numerator everywhere, so the clamp gives zeros, not NaN.
    return ((flat - low) / span.clamp_min(torch.finfo(flat.dtype).tiny)).view(maps.shape)


def class_cross_maps(
    cross_by_grid: dict[int, torch.Tensor],
    layers_by_grid: dict[int, int],
    spans: list[tuple[int, int]],
    out_grid: int,
) -> torch.Tensor:
    """Per-class cross-attention on the self layer's grid, min-max normalised.

    cross_by_grid: grid side g -> (g * g, T) cross-attention, head- and layer-averaged over that
        grid's layers (T = 77 tokens).
    layers_by_grid: g -> how many layers were averaged (4 at R/4, 1 at R/8), so the result is the
        mean over all layers, not over grids.
    spans: C token spans [start, end). Averaging over a span and bilinear upsampling are linear, so
        doing them per grid on layer means equals doing them per layer.
    Returns (C, out_grid, out_grid) in [0, 1].
    """
    total = None
    for grid, cross in cross_by_grid.items():
        if cross.shape[0] != grid * grid:
            raise ValueError(f"grid {grid} needs {grid * grid} query rows, got {cross.shape[0]}")
        per_class = mean_over_spans(cross.float(), spans).T.reshape(len(spans), 1, grid, grid)
        upsampled = F.interpolate(per_class, size=(out_grid, out_grid), mode="bilinear", align_corners=False)
        weighted = layers_by_grid[grid] * upsampled[:, 0]
        total = weighted if total is None else total + weighted
    return minmax_per_class(total / sum(layers_by_grid[grid] for grid in cross_by_grid))


def box_gate(cross: torch.Tensor, fraction: float = 0.2) -> torch.Tensor:
    """Per class, the union of the bounding boxes of the regions above the gate, as the reference.

    cross: (C, g, g). Each map is min-max normalised and quantised like the reference,
    q = uint8(255 * map), and the gate keeps q > int(fraction * 255) (strictly greater; so a value
    in (0.2, 0.2039) is out at fraction 0.2, unlike a float comparison). fraction: 0.2 for VOC, 0.5
    for COCO. Regions are 8-connected (like the reference's OpenCV contours). Boxes include the
    region's last row and column, also at the border (the reference clips boxes to g - 1 and loses
    the border line). A constant map gives an all-False gate.
    Returns BoolTensor (C, g, g): the keys each class may propagate from.
    """
    eight_connected = np.ones((3, 3), dtype=bool)
    quantised = (255 * minmax_per_class(cross.detach()).cpu().numpy()).astype(np.uint8)  # truncates, as np.uint8
    level = int(fraction * 255)
    gate = np.zeros(cross.shape, dtype=bool)
    for index, class_map in enumerate(quantised):
        regions, _ = ndimage.label(class_map > level, structure=eight_connected)
        for box in ndimage.find_objects(regions):
            gate[index][box] = True
    return torch.from_numpy(gate).to(cross.device)


def propagate(
    self_attn: torch.Tensor, cross: torch.Tensor, gate: torch.Tensor | None = None, power: int = 2
) -> torch.Tensor:
    """SC_c = S^power @ C_c, min-max normalised per class.

    self_attn: (Q, Q) head-averaged self-attention S, rows = queries, columns = keys.
    cross: (C, Q) normalised class cross maps. gate: (C, Q) bool keys per class, or None.
    The gate zeroes the key columns of the propagator S^power, as the reference does (it squares S
    first, then masks): (S^power diag(m_c)) C_c = S^power (m_c * C_c), so we mask the cross map and
    multiply by S power times. Masking the columns of every S factor instead would also cut paths
    through keys outside the box; that is not the method. S (S x) also avoids the (Q, Q) product.
    Returns (C, Q) in [0, 1].
    """
    values = cross.float().T
    if gate is not None:
        values = values * gate.T
    for _ in range(power):
        values = self_attn.float() @ values
    return minmax_per_class(values.T)


def background_score(sc: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """bg = (2 * threshold - max_c SC_c)^2; threshold 0.5 is the paper's (1 - max)^2.

    sc: (C, ...) class scores in [0, 1]. Returns (1, ...).
    """
    return (2 * threshold - sc.amax(0, keepdim=True)) ** 2


def segment(scores: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    """Label map from [background, class 1..C] scores.

    scores: (1 + C, g, g); output_size: (H, W). Bilinear upsampling, then argmax.
    Returns LongTensor (H, W), 0 = background, c = class c.
    """
    upsampled = F.interpolate(scores[None].float(), size=tuple(output_size), mode="bilinear", align_corners=False)
    return upsampled[0].argmax(0)


def selfcross_scores(
    cross_by_grid: dict[int, torch.Tensor],
    layers_by_grid: dict[int, int],
    self_attn: torch.Tensor,
    spans: list[tuple[int, int]],
    gate_fraction: float | None = 0.2,
    power: int = 2,
) -> torch.Tensor:
    """SelfCross maps of one noise draw.

    cross_by_grid, layers_by_grid, spans: as in `class_cross_maps` (blocks 5-9, grids R/4 and R/8).
    self_attn: (Q, Q) self-attention of block 12, Q = g * g at grid g = R/2.
    gate_fraction: box gate threshold, None for no gate. power: the paper's iter (2).
    Returns (C, g, g) in [0, 1]; average over draws, then `background_score` and `segment`.
    """
    grid = math.isqrt(self_attn.shape[0])
    if grid * grid != self_attn.shape[0]:
        raise ValueError(f"self-attention has {self_attn.shape[0]} queries, not a square grid")
    cross = class_cross_maps(cross_by_grid, layers_by_grid, spans, grid)
    gate = None if gate_fraction is None else box_gate(cross, gate_fraction).flatten(1)
    return propagate(self_attn, cross.flatten(1), gate, power).view(-1, grid, grid)
