"""DiffSeg post-processing: self-attention maps in, integer label map out.

Pure tensor functions (docs/methods.md section 1, steps 3-10), one per step of the paper
"Diffuse, Attend, and Segment" (Tian et al.). No model is loaded here: the caller captures
the self-attention of the UNet and passes one head- and layer-averaged map per grid.

Notation: R is the largest grid side (64 for a 512x512 input), a pixel map is one row of an
(R*R, R*R) row-stochastic tensor (row = query pixel, columns = key pixels, row-major), and a
proposal is a pixel map averaged over a group of pixels. Everything runs on the device of its
input (CPU or CUDA) in fp32 (fp64 inputs stay fp64) and is deterministic.

Typical use::

    attn = aggregate({64: a64, 32: a32, 16: a16, 8: a8})    # (4096, 4096)
    labels = merge(attn, kl_threshold=1.0, output_size=(512, 512))
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnseg.defaults import DIFFSEG

LOG_EPS = 1e-12  # clamp inside the logs: exact zeros in a map must not give -inf or NaN
UPSAMPLE_CHUNK = 32  # proposals upsampled at a time when taking a bicubic argmax at output size


def _float(t: torch.Tensor) -> torch.Tensor:
    """Returns `t` in fp32, or fp64 if it already is fp64 (no copy when already so)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _side(num_pixels: int) -> int:
    """Grid side R of a square grid of `num_pixels` pixels."""
    side = math.isqrt(num_pixels)
    if side * side != num_pixels:
        raise ValueError(f"{num_pixels} pixels do not form a square grid")
    return side


def aggregate(maps: dict[int, torch.Tensor], weights: dict[int, float] | None = None) -> torch.Tensor:
    """Aggregates self-attention maps of several grids into one map at the largest grid (step 3).

    Args:
        maps: grid side g -> row-stochastic tensor (g*g, g*g), rows = queries, already averaged
            over the heads and over that grid's layers. Every g must divide the largest side R.
        weights: grid side g -> weight; defaults to weights proportional to g (the paper's
            "proportional aggregation"). Normalised over their total.

    Returns:
        (R*R, R*R) fp32 tensor, rows summing to 1.

    Each map's key dims are upsampled bilinearly (align_corners=False) to (R, R) and every key map
    renormalised to sum 1; a query of grid g stands for the (R/g)x(R/g) block of queries it
    covers (nearest tiling). The output is the only (R*R, R*R) buffer allocated: each grid is
    added into it through a broadcast view, so no tiled copy is ever materialised.
    """
    side = max(maps)
    if weights is None:
        weights = {g: float(g) for g in maps}
    if set(weights) != set(maps):
        raise ValueError(f"weights for grids {sorted(weights)} but maps for {sorted(maps)}")
    total = sum(weights.values())
    first = next(iter(maps.values()))
    out = torch.zeros(side * side, side * side, dtype=torch.float32, device=first.device)
    for g, attn in maps.items():
        if side % g or attn.shape != (g * g, g * g):
            raise ValueError(f"grid {g}: map of shape {tuple(attn.shape)} does not fit R={side}")
        keys = attn.float().reshape(g * g, 1, g, g)
        if g != side:
            keys = F.interpolate(keys, size=(side, side), mode="bilinear", align_corners=False)
        keys = keys.reshape(g * g, side * side)
        scale = (weights[g] / total) / keys.sum(1)  # key renormalisation and grid weight in one
        block = side // g
        # out row I*R + J viewed as (I // block, I % block, J // block, J % block): the query
        # of grid g at (I // block, J // block) is broadcast over its block.
        out.view(g, block, g, block, side * side).addcmul_(
            keys.view(g, 1, g, 1, side * side), scale.view(g, 1, g, 1, 1)
        )
    return out.div_(out.sum(1, keepdim=True))


def kl_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Symmetric KL distance between every row of `x` and every row of `y` (step 4).

    D(p, q) = 0.5 * KL(p || q) + 0.5 * KL(q || p), computed as
    0.5 * (h_p + h_q - p . log q - q . log p) with h = sum p log p, so the work is two matmuls and
    no (N, M, D) intermediate exists.

    Args:
        x: (N, D) distributions (rows sum to 1).
        y: (M, D) distributions.

    Returns:
        (N, M) distances in fp32 (fp64 if an input is fp64). Logs are taken of the maps clamped
        at 1e-12, so exact zeros are fine. Rounding in the matrix form can give tiny negative
        values; they are clamped to 0 (the true distance is never negative).
    """
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    x, y = x.to(dtype), y.to(dtype)
    log_x, log_y = x.clamp_min(LOG_EPS).log_(), y.clamp_min(LOG_EPS).log_()
    h_x = torch.einsum("nd,nd->n", x, log_x)
    h_y = torch.einsum("md,md->m", y, log_y)
    cross = (x @ log_y.T).addmm_(log_x, y.T)
    return (h_x[:, None] + h_y[None, :] - cross).mul_(0.5).clamp_min_(0.0)


def anchor_indices(side: int, grid: int) -> torch.Tensor:
    """Flat pixel indices of the grid x grid anchors on an side x side grid (step 5).

    Along each axis: step = (side-1) // (grid-1), start = ((side-1) - step*(grid-1)) // 2, so
    {1, 5, ..., 61} for side 64, grid 16. One anchor (grid 1) sits at the centre.

    Returns:
        (grid*grid,) int64, row-major (row * side + column).
    """
    if not 1 <= grid <= side:
        raise ValueError(f"anchor grid {grid} must lie in [1, {side}]")
    step = (side - 1) // (grid - 1) if grid > 1 else 0
    start = ((side - 1) - step * (grid - 1)) // 2
    axis = start + step * torch.arange(grid)
    return (axis[:, None] * side + axis[None, :]).flatten()


def anchor_proposals(attn: torch.Tensor, anchors: torch.Tensor, kl_threshold: float) -> torch.Tensor:
    """First merging iteration (step 6): per anchor, the mean of all pixel maps near it.

    Args:
        attn: (P, P) aggregated attention, P = R*R pixels.
        anchors: (A,) flat pixel indices.
        kl_threshold: tau; a pixel map p joins anchor a's group when D(a, p) < tau.

    Returns:
        (A, P) proposals, one per anchor, in anchor order.

    The group membership is an (A, P) 0/1 matrix, so the means are one matmul with attn.
    """
    anchors = anchors.to(attn.device)
    members = (kl_distance(attn[anchors], attn) < kl_threshold).to(attn.dtype)
    # D(a, a) = 0 exactly; do not let rounding drop an anchor from its own group.
    members[torch.arange(len(anchors), device=attn.device), anchors] = 1.0
    return (members @ attn).div_(members.sum(1, keepdim=True))


def merge_proposals(proposals: torch.Tensor, kl_threshold: float) -> torch.Tensor:
    """One later merging iteration (step 7), greedy as in the reference.

    Walks the proposals in index order; a proposal already matched is skipped; otherwise ALL
    current proposals within tau of it (those matched earlier included, so groups may overlap)
    are averaged into one new proposal and every member is marked matched.

    Args:
        proposals: (K, P) maps.
        kl_threshold: tau.

    Returns:
        (K', P) merged proposals, K' <= K, in the order their groups were formed.
    """
    count = proposals.shape[0]
    close = (kl_distance(proposals, proposals) < kl_threshold).cpu()
    close.fill_diagonal_(True)
    groups: list[list[int]] = []
    matched: set[int] = set()
    for i in range(count):
        if i in matched:
            continue
        members = close[i].nonzero().flatten().tolist()  # plain ints: tensors hash by identity
        groups.append(members)
        matched.update(members)
    averaging = torch.zeros(len(groups), count, dtype=proposals.dtype)
    for row, members in enumerate(groups):
        averaging[row, members] = 1.0 / len(members)
    return averaging.to(proposals.device) @ proposals


def proposals(
    attn: torch.Tensor,
    *,
    grid: int = DIFFSEG.grid,
    iterations: int = DIFFSEG.iterations,
    kl_threshold: float = DIFFSEG.kl_threshold,
) -> torch.Tensor:
    """Iterative attention merging (steps 5-7): the object proposals of an aggregated map.

    Args:
        attn: (R*R, R*R) aggregated attention (see `aggregate`).
        grid: M, anchors per axis (M*M anchors).
        iterations: N >= 1; the first is `anchor_proposals`, the rest `merge_proposals`.
        kl_threshold: tau, used by every iteration.

    Returns:
        (K, R*R) proposals, each a distribution over the R*R pixels.
    """
    if iterations < 1:
        raise ValueError("iterations must be at least 1")
    attn = _float(attn)
    merged = anchor_proposals(attn, anchor_indices(_side(attn.shape[0]), grid), kl_threshold)
    for _ in range(iterations - 1):
        merged = merge_proposals(merged, kl_threshold)
    return merged


def refine_proposals(attn: torch.Tensor, proposals: torch.Tensor, *, max_iterations: int = 30) -> torch.Tensor:
    """Optional k-means refinement (step 9): Lloyd iterations on the R*R pixel maps.

    Squared L2 distance, as the reference (scikit-learn KMeans initialised with the proposals),
    so refined results stay comparable with it. Stops when the centres no longer change or after
    `max_iterations`. Clusters left empty are dropped (deterministic, unlike re-seeding them).

    Args:
        attn: (P, P) aggregated attention; its rows are the points.
        proposals: (K, P) initial centres.

    Returns:
        (K', P) centres (means of their pixel maps), K' <= K.
    """
    points = _float(attn)
    centres = proposals.to(points.dtype)
    for _ in range(max_iterations):
        # argmin_k |p - c_k|^2 = argmin_k (|c_k|^2 - 2 p.c_k): one (P, K) matmul
        scores = (points @ centres.T).mul_(-2.0).add_((centres * centres).sum(1))
        assignment = scores.argmin(1)
        members = torch.zeros(centres.shape[0], points.shape[0], dtype=points.dtype, device=points.device)
        members[assignment, torch.arange(points.shape[0], device=points.device)] = 1.0
        members = members[members.sum(1) > 0]
        updated = (members @ points).div_(members.sum(1, keepdim=True))
        if updated.shape == centres.shape and torch.equal(updated, centres):
            break
        centres = updated
    return centres


def bilinear_taps(in_size: int, out_size: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source taps of bilinear upsampling along one axis, as F.interpolate(align_corners=False).

    Returns (i0, i1, w1), each (out_size,): output index o reads (1 - w1) * x[i0] + w1 * x[i1]
    (i1 = i0 + 1 except at the last source index, where both taps coincide).
    """
    src = (torch.arange(out_size, dtype=torch.float32, device=device) + 0.5) * (in_size / out_size) - 0.5
    src = src.clamp_min_(0.0)
    i0 = src.long().clamp_max_(in_size - 1)
    i1 = (i0 + 1).clamp_max_(in_size - 1)
    return i0, i1, src - i0


def bilinear_argmax(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pixel-wise argmax over K maps (K, h, w) bilinearly upsampled to size (H, W), without upsampling them all.

    Between four neighbouring source pixels (a cell) every upsampled value is a convex combination
    of the four corners, so it lies between the corners' min and max. Only maps whose corner max
    reaches the best corner min in the cell can win a pixel there; a cell with one such candidate
    is that map's throughout. The other cells (along segment borders) are evaluated one band of
    source rows at a time, each for its own candidates only, with the same arithmetic as F.interpolate.
    Ties go to the lowest index, as argmax. Returns (H, W) int64 on the maps' device.
    """
    # An exact copy of an earlier map never wins (ties go to the lower index), yet would keep every
    # cell open: merged proposals of one region are often identical. Drop copies first.
    _, copy_of = torch.unique(maps.flatten(1), dim=0, return_inverse=True)
    first = torch.full((int(copy_of.max()) + 1,), maps.shape[0], device=maps.device)
    first.scatter_reduce_(0, copy_of, torch.arange(maps.shape[0], device=maps.device), reduce="amin")
    kept = first.sort().values
    if len(kept) < maps.shape[0]:
        return kept[bilinear_argmax(maps[kept], size)]
    count, h, w = maps.shape
    height, width = size
    device = maps.device
    y0, y1, wy = bilinear_taps(h, height, device)
    x0, x1, wx = bilinear_taps(w, width, device)
    below = torch.arange(1, h + 1, device=device).clamp_max_(h - 1)
    right = torch.arange(1, w + 1, device=device).clamp_max_(w - 1)
    corners = torch.stack((maps, maps[:, below], maps[:, :, right], maps[:, below][:, :, right]))
    low, high = corners.amin(0), corners.amax(0)  # (K, h, w) per cell
    best_low, winner = low.max(0)
    # The margin keeps rounding in the upsampled values from deciding: near ties are evaluated.
    candidates = high >= best_low - 1e-5 * float(maps.abs().amax())
    open_cells = candidates.sum(0) > 1
    labels = winner[y0][:, x0]
    # Horizontal pass once for all rows; then per band of output rows (one source row pair), only
    # the open cells' columns, each against its own cell's candidates (C at most per band).
    across = maps[:, :, x0] * (1 - wx) + maps[:, :, x1] * wx  # (K, h, W)
    first_row = 0
    for cell_row, row_count in enumerate(torch.bincount(y0, minlength=h).tolist()):
        rows = slice(first_row, first_row + row_count)
        first_row += row_count
        open_row = open_cells[cell_row]
        if row_count == 0 or not bool(open_row.any()):
            continue
        cols = torch.nonzero(open_row[x0], as_tuple=True)[0]
        in_cell = candidates[:, cell_row].T  # (w, K): the candidates of each cell of the band
        per_cell = in_cell.sum(1)
        most = int(per_cell.max())
        # Candidate ids per cell in ascending order (a stable sort puts the True ones first), padded
        # with the cell's first candidate: a repeat never changes the argmax.
        ids = torch.sort(in_cell.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :most]
        ids = torch.where(torch.arange(most, device=device) < per_cell[:, None], ids, ids[:, :1])
        ids = ids[x0[cols]].T  # (C, n)
        top = across[:, cell_row][:, cols].gather(0, ids)
        bottom = across[:, int(below[cell_row])][:, cols].gather(0, ids)
        labels[rows, cols] = band_argmax(top, bottom, ids, wy[rows, None])
    return labels


def band_argmax(top: torch.Tensor, bottom: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The winning map id of each pixel of a band of output rows (`bilinear_argmax`).

    top, bottom: (n, C) the candidates' horizontally interpolated values on the band's two source
    rows, for C columns; ids: (n, C) their map ids, ascending per column; weight: (rows, 1) the
    vertical weight of each output row. Returns (rows, C); ties keep the lower id (a strict >).
    """
    best = chosen = None
    for j in range(ids.shape[0]):
        value = top[j] * (1 - weight) + bottom[j] * weight  # (rows, C)
        if best is None:
            best, chosen = value, ids[0].expand(weight.shape[0], -1)
        else:
            better = value > best
            best = torch.where(better, value, best)
            chosen = torch.where(better, ids[j], chosen)
    return chosen


def proposals_to_labels(
    proposals: torch.Tensor, output_size: tuple[int, int] | None = None, mode: str = "bilinear"
) -> torch.Tensor:
    """Non-maximum suppression (step 8): pixel-wise argmax of the upsampled proposals.

    Args:
        proposals: (K, R*R) maps.
        output_size: (H, W); defaults to (R, R).
        mode: the upsampling, "bilinear" (DiffSeg) or "bicubic" (AggGEM's class maps).

    Returns:
        (H, W) int64 labels: index of the proposal with the highest upsampled value (bilinear,
        align_corners=False); ties go to the lowest index. Labels are proposal indices, not yet
        renumbered (see `relabel_by_first_appearance`).

    Bilinear: `bilinear_argmax`, whose work and memory grow with the segment borders rather than
    K x H x W. Bicubic: upsampled a chunk at a time with a running maximum, so memory stays at
    UPSAMPLE_CHUNK maps of the output size however many proposals there are.
    """
    side = _side(proposals.shape[1])
    size = tuple(output_size) if output_size is not None else (side, side)
    maps = _float(proposals).reshape(1, -1, side, side)
    if size == (side, side):
        return maps[0].argmax(0)
    if mode == "bilinear":
        return bilinear_argmax(maps[0], size)
    best_value = best_index = None
    for start in range(0, maps.shape[1], UPSAMPLE_CHUNK):
        chunk = F.interpolate(maps[:, start : start + UPSAMPLE_CHUNK], size=size, mode=mode, align_corners=False)
        value, index = chunk[0].max(0)
        index += start
        if best_value is None:
            best_value, best_index = value, index
        else:
            better = value > best_value  # strict: ties keep the earlier proposal
            best_value = torch.where(better, value, best_value)
            best_index = torch.where(better, index, best_index)
    return best_index


def relabel_by_first_appearance(labels: torch.Tensor) -> torch.Tensor:
    """Renumbers labels 0..K-1 in the order they first appear in row-major order.

    The label of the top-left pixel becomes 0, the next new label met scanning rows becomes 1,
    and so on. This makes the output independent of proposal order and K = number of segments
    actually present.

    Args:
        labels: (H, W) non-negative integer labels.

    Returns:
        (H, W) int64 labels 0..K-1.

    No sort of the pixels: the first row holding each label comes from a (H, labels) presence
    table, the column from that row alone.
    """
    labels = labels.long()
    height, width = labels.shape
    span = int(labels.max()) + 1
    present = torch.zeros(height, span, dtype=torch.bool, device=labels.device)
    present.scatter_(1, labels, True)
    found = present.any(0)
    first_row = present.to(torch.uint8).argmax(0)  # the first True
    first_col = (labels[first_row] == torch.arange(span, device=labels.device)[:, None]).to(torch.uint8).argmax(1)
    position = torch.where(found, first_row * width + first_col, height * width)
    rank = torch.empty(span, dtype=torch.int64, device=labels.device)
    rank[position.argsort()] = torch.arange(span, device=labels.device)
    return rank[labels]


def merge(
    attn: torch.Tensor,
    *,
    grid: int = DIFFSEG.grid,
    iterations: int = DIFFSEG.iterations,
    kl_threshold: float = DIFFSEG.kl_threshold,
    output_size: tuple[int, int] | None = None,
    refine: bool = DIFFSEG.refine,
) -> torch.Tensor:
    """DiffSeg segmentation of an aggregated self-attention map (steps 5-9).

    Args:
        attn: (R*R, R*R) aggregated attention (see `aggregate`).
        grid: anchors per axis (M).
        iterations: merging iterations (N).
        kl_threshold: tau; 1.1 reproduces COCO-Stuff-27, 0.9 Cityscapes, 1.0 for images in the
            wild. Larger merges more (fewer segments).
        output_size: (H, W) of the label map; defaults to (R, R).
        refine: k-means refinement of the proposals (`refine_proposals`) before the argmax.

    Returns:
        (H, W) int64 label map, labels 0..K-1 numbered by first appearance in row-major order.
    """
    attn = _float(attn)
    merged = proposals(attn, grid=grid, iterations=iterations, kl_threshold=kl_threshold)
    if refine:
        merged = refine_proposals(attn, merged)
    return labels_at(merged, output_size)


def labels_at(proposals: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
    """(K, R*R) proposals -> (H, W) int64 labels 0..K'-1 numbered by first appearance (step 8)."""
    return relabel_by_first_appearance(proposals_to_labels(proposals, output_size))


def segment_word_scores(labels: torch.Tensor, word_maps: torch.Tensor) -> torch.Tensor:
    """Mean score of every word over every segment (step 10, pure part).

    Args:
        labels: (H, W) int labels 0..K-1 (as `merge` returns them).
        word_maps: (V, h, w) per-word score maps, any size (built by the caller: cross-attention
            per word, upsampled, renormalised over words, L2-normalised over pixels). Each map is
            upsampled bilinearly to (H, W) one at a time, so memory stays at one map of the output
            size however many words there are.

    Returns:
        (K, V) fp32: entry (k, v) is word v's mean over segment k (0 for an empty segment). Name
        segment k with the row's argmax.
    """
    flat = labels.flatten()
    count = int(flat.max()) + 1
    pixels = torch.bincount(flat, minlength=count).clamp_min(1).double()
    columns = []
    for word_map in _float(word_maps):
        if word_map.shape != labels.shape:
            word_map = F.interpolate(
                word_map[None, None], size=tuple(labels.shape), mode="bilinear", align_corners=False
            )[0, 0]
        columns.append(torch.bincount(flat, weights=word_map.flatten().double(), minlength=count) / pixels)
    return torch.stack(columns, dim=1).float()


def label_scores(labels: torch.Tensor, channels: torch.Tensor, first_label: int) -> dict[int, float]:
    """Mean of each present label's channel (bilinearly upsampled) over that label's pixels.

    labels: (H, W) int64; channels: (N, h, w), channel k for label first_label + k. Only the present
    labels' channels are upsampled, one at a time (segment_word_scores).
    """
    present = torch.unique(labels).tolist()
    table = segment_word_scores(labels, channels[[label - first_label for label in present]])
    return {label: round(float(table[label, column]), 6) for column, label in enumerate(present)}
