"""SLiMe's pure tensor steps: augmentation, losses, learned embeddings and crop composition.

docs/methods.md section 3. No model code here: the UNet wrapper captures the attention maps and
calls these functions.

Conventions used throughout:
- `K` classes, class 0 is background; `R` is the latent grid side.
- `self_attn` is the (R*R, R*R) self-attention probability matrix, head and layer mean, rows
  are queries and columns keys (each row sums to 1, as softmax(QK^T) leaves it), pixels in
  row-major order. The paper's "SA(k -> q)" is `self_attn[q, k]`, so a weighted self-attention
  map WAS_c(q) = sum_k self_attn[q, k] p_c(k) is a convex combination of p_c and stays inside
  [min p_c, max p_c].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnseg.defaults import ONESHOT, RESOLUTION

Box = tuple[int, int, int, int]  # (top, left, height, width)

ROTATION_DEGREES = 30.0
PART_FRACTION = 0.3  # a training crop keeps more than this share of one part's pixels
CROP_TRIES = 100  # random crops tried before falling back to the whole image
CROP_SIZE = 400  # inference crops at resolution 512 (docs/methods.md 3.4)


# ---------------------------------------------------------------------------------------------
# Augmentation (3.3 step 1)
# ---------------------------------------------------------------------------------------------


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high], both ends included."""
    return int(torch.randint(low, high + 1, (), generator=generator).item())


def resize_pair(image: Tensor, mask: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Resize image (3,H,W) bilinearly and mask (H,W) by nearest to (3,size,size) and (size,size)."""
    image = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return image, resize_mask(mask, size)


def resize_mask(mask: Tensor, size: int) -> Tensor:
    """Nearest (pixel-centre) resize of a label mask (H,W) -> (size,size), labels unchanged."""
    return F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest-exact")[0, 0].long()


def gaussian_blur(image: Tensor, kernel_size: int) -> Tensor:
    """Blur image (3,H,W) with an odd square Gaussian kernel; 1 is the identity.

    Sigma follows OpenCV's rule for sigma 0 (what albumentations' GaussianBlur used in the
    reference): 0.3 * ((k - 1) / 2 - 1) + 0.8. Borders reflect.
    """
    if kernel_size == 1:
        return image
    sigma = 0.3 * ((kernel_size - 1) / 2 - 1) + 0.8
    offsets = torch.arange(kernel_size, dtype=image.dtype, device=image.device) - kernel_size // 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = image.shape[0]
    pad = kernel_size // 2
    out = F.pad(image[None], (pad, pad, pad, pad), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    out = F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return out[0]


def part_crop_box(
    mask: Tensor,
    part: int | None,
    *,
    generator: torch.Generator,
    min_crop: float,
    min_fraction: float = PART_FRACTION,
    tries: int = CROP_TRIES,
) -> Box:
    """A random square crop of mask (S,S) with side in [min_crop, 1] x S that keeps more than
    `min_fraction` of the pixels of `part`.

    Tries up to `tries` random boxes, then falls back to the whole image. `part` None (or a part
    with no pixels) accepts the first box. Returns (top, left, side, side).
    """
    size = mask.shape[-1]
    part_mask = mask == part if part is not None else None
    part_pixels = int(part_mask.sum()) if part_mask is not None else 0
    for _ in range(tries):
        side = int(_uniform(generator, min_crop, 1.0) * size)
        top = _randint(generator, 0, size - side)
        left = _randint(generator, 0, size - side)
        if part_pixels == 0:
            return top, left, side, side
        kept = int(part_mask[top : top + side, left : left + side].sum())
        if kept / part_pixels > min_fraction:
            return top, left, side, side
    return 0, 0, size, size


def rotate_pair(image: Tensor, mask: Tensor, degrees: float) -> tuple[Tensor, Tensor]:
    """Rotate image (3,S,S) bilinearly and mask (S,S) by nearest about the centre; corners that
    come from outside the image are 0 (black image, background mask)."""
    angle = math.radians(degrees)
    theta = torch.tensor(
        [[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0]],
        dtype=torch.float32,
        device=image.device,
    )
    grid = F.affine_grid(theta[None], [1, 1, *mask.shape], align_corners=False)
    image = F.grid_sample(image[None], grid.to(image.dtype), mode="bilinear", align_corners=False)[0]
    mask = F.grid_sample(mask[None, None].float(), grid, mode="nearest", align_corners=False)[0, 0]
    return image, mask.long()


def augment(
    image: Tensor,
    mask: Tensor,
    *,
    generator: torch.Generator,
    size: int = RESOLUTION,
    min_crop: float = ONESHOT.min_crop,
    part_cycle: int,
    latent_size: int,
) -> tuple[Tensor, Tensor]:
    """SLiMe's training augmentation of one image (3,H,W) float and its label mask (H,W) long.

    Resize to `size`; flip horizontally (p 0.5); Gaussian blur, odd kernel in 1..5 (p 0.5); a
    random square crop keeping more than 30% of one part, chosen as the `part_cycle`-th (modulo)
    non-background label present; resize to `size`; rotate by up to 30 degrees (p 0.5). The mask
    follows every geometric step with nearest sampling, then goes to latent_size by nearest.
    Every random draw comes from `generator`, so a seed fixes the result.

    Returns image (3,size,size) and mask (latent_size,latent_size) long. Mask labels stay within
    the input's labels plus 0 (rotation pads with background).
    """
    image, mask = resize_pair(image, mask, size)
    if _uniform(generator, 0.0, 1.0) < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    if _uniform(generator, 0.0, 1.0) < 0.5:
        image = gaussian_blur(image, 2 * _randint(generator, 0, 2) + 1)

    parts = [int(label) for label in mask.unique() if label != 0]
    part = parts[part_cycle % len(parts)] if parts else None
    top, left, height, width = part_crop_box(mask, part, generator=generator, min_crop=min_crop)
    image, mask = resize_pair(
        image[:, top : top + height, left : left + width], mask[top : top + height, left : left + width], size
    )

    if _uniform(generator, 0.0, 1.0) < 0.5:
        image, mask = rotate_pair(image, mask, _uniform(generator, -ROTATION_DEGREES, ROTATION_DEGREES))
    return image, resize_mask(mask, latent_size)


# ---------------------------------------------------------------------------------------------
# Learned text embeddings (3.1)
# ---------------------------------------------------------------------------------------------


def learned_embeddings(base: Tensor, vectors: Tensor) -> Tensor:
    """Text-encoder output (77,D) with the part tokens replaced by trainable vectors.

    base: the encoded `"part " * K` prompt (77,D); position 0 (the BOS output) is the fixed
    background class. vectors: (K-1,D), the parts, placed at positions 1..K-1. Other positions
    stay as encoded. Gradients reach `vectors` only; the result has the vectors' dtype.
    """
    base = base.detach().to(vectors.dtype)
    return torch.cat([base[:1], vectors, base[1 + vectors.shape[0] :]])


# ---------------------------------------------------------------------------------------------
# Losses (3.3 step 6)
# ---------------------------------------------------------------------------------------------


def class_weights(mask: Tensor, num_classes: int) -> Tensor:
    """Cross-entropy class weights (K,) for a mask (R,R): background 1, part c =
    (non-background pixels) / (pixels of c), parts absent from the mask 0."""
    counts = torch.bincount(mask.flatten(), minlength=num_classes).to(torch.float32)
    counts[0] = 0
    weights = torch.where(counts > 0, counts.sum() / counts.clamp(min=1), torch.zeros_like(counts))
    weights[0] = 1
    return weights


def cross_entropy_loss(ca_logits: Tensor, mask: Tensor, weights: Tensor) -> Tensor:
    """Weighted cross-entropy of logits (K,R,R) (softmax over the K tokens) against mask (R,R).

    Torch's weighted mean, as nn.CrossEntropyLoss(weight=...) in the reference:
    sum_i w[y_i] * -log p_{y_i}(i) / sum_i w[y_i] over the R*R pixels.
    """
    return F.cross_entropy(ca_logits[None].float(), mask[None], weight=weights.to(ca_logits.device))


def weighted_self_attention(probs: Tensor, self_attn: Tensor) -> Tensor:
    """WAS_c(q) = sum_k probs_c(k) * self_attn[q, k]: each class map (K,R,R) spread along the
    self-attention (R*R,R*R) rows. Returns (K,R,R)."""
    num_classes, height, width = probs.shape
    was = probs.reshape(num_classes, height * width).to(self_attn.dtype) @ self_attn.T
    return was.reshape(num_classes, height, width)


def mse_loss(ca_logits: Tensor, self_attn: Tensor, mask: Tensor) -> Tensor:
    """K * mean((WAS - onehot(mask))^2) with WAS from p = softmax_K(ca_logits (K,R,R)) and
    self_attn (R*R,R*R); mask (R,R). The mean runs over all K*R*R entries."""
    num_classes = ca_logits.shape[0]
    was = weighted_self_attention(ca_logits.float().softmax(dim=0), self_attn.float())
    onehot = F.one_hot(mask, num_classes).permute(2, 0, 1).to(was.dtype)
    return num_classes * F.mse_loss(was, onehot)


def sd_loss(eps_uncond: Tensor, eps_cond: Tensor, eps: Tensor, guidance: float = 100.0) -> Tensor:
    """Noise-prediction loss with classifier-free guidance: mean((eps_uncond + g * (eps_cond -
    eps_uncond) - eps)^2) over every element; any matching shapes, e.g. (4,R,R)."""
    eps_hat = eps_uncond.float() + guidance * (eps_cond.float() - eps_uncond.float())
    return F.mse_loss(eps_hat, eps.float())


def slime_loss(
    ca_logits: Tensor,
    self_attn: Tensor,
    mask: Tensor,
    eps_uncond: Tensor,
    eps_cond: Tensor,
    eps: Tensor,
    *,
    mse_weight: float = 1.0,
    sd_weight: float = 0.005,
    guidance: float = 100.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total training loss CE + 1.0 * MSE + 0.005 * SD for one image.

    ca_logits (K,R,R) pre-softmax cross-attention logits, self_attn (R*R,R*R), mask (R,R),
    noise predictions and the true noise of matching shapes. Returns the total and the detached
    parts {"ce", "mse", "sd"} for logging.
    """
    weights = class_weights(mask, ca_logits.shape[0])
    parts = {
        "ce": cross_entropy_loss(ca_logits, mask, weights),
        "mse": mse_loss(ca_logits, self_attn, mask),
        "sd": sd_loss(eps_uncond, eps_cond, eps, guidance),
    }
    total = parts["ce"] + mse_weight * parts["mse"] + sd_weight * parts["sd"]
    return total, {name: value.detach() for name, value in parts.items()}


def mean_iou(pred: Tensor, mask: Tensor, num_classes: int) -> float:
    """Training IoU: mean over the classes present in the ground-truth mask (background included,
    as in the reference) of |pred == c and mask == c| / |pred == c or mask == c|; pred and mask
    are (R,R) label maps. 0.0 for an empty mask."""
    ious = []
    for c in range(num_classes):
        truth = mask == c
        if not truth.any():
            continue
        predicted = pred == c
        ious.append((truth & predicted).sum().item() / (truth | predicted).sum().item())
    return sum(ious) / len(ious) if ious else 0.0


# ---------------------------------------------------------------------------------------------
# Segmenting (3.4)
# ---------------------------------------------------------------------------------------------


def crop_boxes(
    size: int = RESOLUTION, crops_per_side: int = ONESHOT.crops_per_side, crop_size: int = CROP_SIZE
) -> list[Box]:
    """Crops of a size x size image, row-major: the whole image for 1 per side; otherwise
    crop_size squares with evenly spaced starts from 0 to size - crop_size (0 and 112 for 2 at
    512). Each is (top, left, height, width)."""
    if crops_per_side == 1:
        return [(0, 0, size, size)]
    step = (size - crop_size) // (crops_per_side - 1)
    starts = [i * step for i in range(crops_per_side)]
    return [(top, left, crop_size, crop_size) for top in starts for left in starts]


def select_token_maps(probs77: Tensor, num_classes: int) -> Tensor:
    """From cross-attention probabilities softmaxed over all 77 tokens (...,Q,77), take the K
    used tokens (positions 0..K-1) as maps (...,K,Q). Softmax over 77 first, then select: the
    other tokens keep their share of the mass (unlike training's softmax over K)."""
    return probs77[..., :num_classes].transpose(-1, -2)


def keep_and_gate(ca: Tensor, threshold: float = 0.2) -> tuple[Tensor, Tensor]:
    """Drop classes whose maximum is below `threshold`; in the first kept class (normally the
    background) keep only the values strictly greater than its mean, as the reference does.

    ca (K,R,R) -> (gated (Kkept,R,R), kept (Kkept,) long class ids, ascending). Kkept may be 0.
    """
    kept = torch.nonzero(ca.flatten(1).amax(dim=1) >= threshold).flatten()
    gated = ca[kept].clone()
    if len(kept) > 0:
        first = gated[0]
        gated[0] = torch.where(first > first.mean(), first, torch.zeros_like(first))
    return gated, kept


def rescaled_was(
    ca: Tensor,
    self_attn: Tensor,
    out_size: int | tuple[int, int],
    value_range: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Weighted self-attention of ca (K,R,R) over self_attn (R*R,R*R), resized bilinearly to
    out_size, each class rescaled affinely onto its value range: (min, max) tensors of shape
    (K,), by default ca's own per-class min and max. A WAS map constant up to float rounding
    becomes the range's min.
    Returns (K,h,w)."""
    if isinstance(out_size, int):
        out_size = (out_size, out_size)
    if ca.shape[0] == 0:  # a crop that kept no class
        return ca.new_zeros(0, *out_size, dtype=torch.float32)
    if value_range is None:
        value_range = (ca.flatten(1).amin(dim=1), ca.flatten(1).amax(dim=1))
    low, high = (v.to(torch.float32)[:, None, None] for v in value_range)
    was = weighted_self_attention(ca.float(), self_attn.float())
    was = F.interpolate(was[None], size=out_size, mode="bilinear", align_corners=False)[0]
    was_low = was.flatten(1).amin(dim=1)[:, None, None]
    was_high = was.flatten(1).amax(dim=1)[:, None, None]
    spread = was_high - was_low
    # A map flat up to float32 rounding counts as constant instead of blowing up its noise.
    flat = spread <= 1e-5 * was_high.abs()
    scale = torch.where(flat, 0.0, (high - low) / torch.where(flat, 1.0, spread))
    return (was - was_low) * scale + low


def crop_scores(
    ca: Tensor, self_attn: Tensor, out_size: int | tuple[int, int], threshold: float = 0.2
) -> tuple[Tensor, Tensor]:
    """One crop's class scores: keep_and_gate, then rescaled_was of the gated maps onto each kept
    class's range BEFORE gating (as the reference does, so the background keeps its floor).

    ca (K,R,R) token maps from select_token_maps, upsampled to R and averaged; self_attn
    (R*R,R*R). Returns scores (Kkept,h,w) and kept (Kkept,) for Canvas.add.
    """
    gated, kept = keep_and_gate(ca, threshold)
    ungated = ca[kept].flatten(1)
    scores = rescaled_was(gated, self_attn, out_size, (ungated.amin(dim=1), ungated.amax(dim=1)))
    return scores, kept


class Canvas:
    """Full-image accumulator of per-crop class scores.

    Averages each class over the crops that covered a pixel AND kept that class (the reference's
    per-class counts): a class dropped by one crop is not pulled down there by a zero.
    """

    def __init__(self, num_classes: int, height: int, width: int, device: torch.device | str | None = None):
        self.sums = torch.zeros(num_classes, height, width, device=device)
        self.counts = torch.zeros(num_classes, height, width, device=device)

    def add(self, scores: Tensor, kept: Tensor, box: Box) -> None:
        """Add scores (Kkept,h,w) of classes `kept` (Kkept,) into box (top, left, h, w)."""
        top, left, height, width = box
        kept = kept.to(self.sums.device)
        self.sums[kept, top : top + height, left : left + width] += scores.to(self.sums)
        self.counts[kept, top : top + height, left : left + width] += 1

    def mean(self) -> Tensor:
        """(K,H,W) averaged scores; 0 where no crop kept the class."""
        return self.sums / self.counts.clamp(min=1)

    def labels(self) -> Tensor:
        """(H,W) long label map: argmax over classes of the averaged scores; pixels no crop
        covered (all counts 0) are background."""
        return torch.where(self.counts.sum(dim=0) > 0, self.mean().argmax(dim=0), 0)
