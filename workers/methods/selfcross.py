"""From Text to Mask (method `selfcross`, docs/methods.md 2.2): cross-attention propagated by self-attention.

Each step is a small pure function on fp32 tensors; `selfcross_scores` composes them for one noise
draw, the caller averages the draws, adds `background_score` and calls `segment`. `selfcross_pass`
is the method's UNet call and `selfcross_draw` reads one draw's maps from it; the text methods and
referring segmentation both use them.
Grids are square: a (Q, ...) map has Q = g * g positions in row-major order.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from attnseg.defaults import TEXT
from workers.methods.passes import combined_kv, encode_with_concepts, noised_latents, unet_pass
from workers.methods.prompts import Prompt, mean_over_spans
from workers.models.attention import AttentionStore
from workers.models.concept import Concept
from workers.models.stable_diffusion import StableDiffusion

SELFCROSS_CROSS_BLOCKS = (5, 6, 7, 8, 9)  # grids R/4 and R/8
SELFCROSS_SELF_BLOCK = 12  # up_blocks.2.attentions.1, grid R/2
# The thresholds default to the reference's VOC settings, TEXT.gate_threshold 0.2 (box gate) and
# TEXT.background_threshold 0.5 (the paper's bg = (1 - max_c SC_c)^2); COCO uses 0.5 and 0.35.


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


def box_gate(cross: torch.Tensor, fraction: float = TEXT.gate_threshold) -> torch.Tensor:
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


def background_score(sc: torch.Tensor, threshold: float = TEXT.background_threshold) -> torch.Tensor:
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
    gate_fraction: float | None = TEXT.gate_threshold,
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


# --- the pass -------------------------------------------------------------------------------


def selfcross_pass(
    sd: StableDiffusion,
    latents: torch.Tensor,
    prompts: list[Prompt],
    timestep: int,
    seeds: int | list[int],
    concepts: dict[str, Concept] | None = None,
) -> AttentionStore:
    """One conditional UNet call on latents (B, 4, R, R), image b noised with seeds[b]: batch row
    b * len(prompts) + i is image b with prompts[i].

    concepts: those the prompts name; their vectors go to the text encoder and the attention weights
    of the (at most one) Custom Diffusion concept among them to the UNet, for this call only.
    """
    seeds = [seeds] if isinstance(seeds, int) else seeds
    concepts = concepts or {}
    store = AttentionStore()
    with torch.inference_mode():
        text = encode_with_concepts(sd, prompts, {name: concept.vectors for name, concept in concepts.items()})
        noisy = noised_latents(sd, latents, timestep, seeds)
        if len(seeds) > 1:
            noisy, text = noisy.repeat_interleave(len(prompts), dim=0), text.repeat(len(seeds), 1, 1)
        kv = combined_kv(list(concepts.values()))
        unet_pass(
            sd,
            noisy,
            timestep,
            text,
            store,
            self_blocks=(SELFCROSS_SELF_BLOCK,),
            cross_blocks=SELFCROSS_CROSS_BLOCKS,
            kv=kv,
        )
    return store


def selfcross_draw(
    store: AttentionStore,
    prompts: list[Prompt],
    gate_threshold: float | None = TEXT.gate_threshold,
    first_row: int = 0,
) -> torch.Tensor:
    """SelfCross maps of all classes from one noise draw: (C, g, g) in [0, 1], classes in prompt order.

    store: cross-attention of SELFCROSS_CROSS_BLOCKS and self-attention of SELFCROSS_SELF_BLOCK,
    recorded from one UNet call whose batch row first_row + i is prompts[i]. Each prompt's class
    spans select its classes' tokens; min-max normalisation stays per class, so prompts do not interact.
    gate_threshold: the box gate's level (None: no gate).
    """
    (self_grid,) = store.grids("self")
    cross_grids = store.grids("cross")
    layers_by_grid = {grid: store.count("cross", grid) for grid in cross_grids}
    maps = []
    for row, prompt in enumerate(prompts, start=first_row):
        cross_by_grid = {grid: store.mean("cross", grid)[row] for grid in cross_grids}
        self_attn = store.mean("self", self_grid)[row]
        maps.append(selfcross_scores(cross_by_grid, layers_by_grid, self_attn, prompt.class_spans, gate_threshold))
    return torch.cat(maps)
