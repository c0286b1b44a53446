"""GEM: dense CLIP image-text similarities (docs/methods.md 2.3), written for open_clip 3.x.

The public GEM code (Bousselham et al., "Grounding Everything") targets open_clip <= 2.23, whose
residual blocks take sequence-first (N, B, C) tensors; it transposes at the start of its attention.
open_clip 3.x blocks are batch-first (B, N, C): that transpose then makes attention run over the
batch axis and the features come out wrong without any error. Here every tensor is batch-first
and GEM is computed in our own forward that reads the block weights; the CLIP model is not
modified and stays usable as is.

Where the streams meet (our reading of docs/methods.md 2.3 and the GEM code's GEMResidualBlock): at
each of the last GEM_DEPTH - 1 blocks, the self-self attention reads ln_1 of the NORMAL stream's
input to that block (the same tensor the block's own attention reads), and its residual is added
to the GEM stream only. The GEM stream never feeds any attention and gets no MLP, so
    gem = x_first + sum over GEM blocks l of ls_1(self_self_attention_l(ln_1(x_l)))
with x_l the normal stream entering block l and x_first the one entering the first GEM block.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import Tensor, nn

from workers.models.clip import Clip

GEM_DEPTH = 7  # the last GEM_DEPTH - 1 = 6 residual blocks get self-self attention
GEM_IMAGE_SIZE = 448
PROMPT_TEMPLATE = "a photo of a {}."
CLASS_TEMPERATURE = 0.01  # s in CA = softmax(logits / s); the VOC background recipe uses 0.1
BACKGROUND_OFFSET = 0.8


# --- image side ---------------------------------------------------------------------------


def preprocess(clip: Clip, image: np.ndarray, size: int = GEM_IMAGE_SIZE) -> Tensor:
    """uint8 RGB (H, W, 3) -> (1, 3, size, size): bicubic resize (aspect not kept), CLIP mean/std."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 255
    # antialias: like PIL's bicubic when shrinking; clamp: bicubic overshoots, PIL clips to uint8.
    pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    pixels = pixels.clamp(0, 1)
    cfg = getattr(clip.model.visual, "preprocess_cfg", {})
    mean = torch.tensor(cfg.get("mean", OPENAI_DATASET_MEAN)).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", OPENAI_DATASET_STD)).view(1, 3, 1, 1)
    return ((pixels - mean) / std).to(clip.device, clip.dtype)


def resample_position_embedding(position: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """(1 + old_h*old_w, C) -> (1 + new_h*new_w, C); the class token's row is kept as is.

    Bicubic with antialias on the (C, h, w) grid, in at least fp32 (half bicubic is not available
    everywhere).
    """
    if tuple(old_grid) == tuple(new_grid):
        return position
    cls_row, grid = position[:1], position[1:]
    grid = grid.to(torch.promote_types(position.dtype, torch.float32)).T.reshape(1, -1, *old_grid)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", antialias=True, align_corners=False)
    grid = grid.reshape(grid.shape[1], -1).T.to(position.dtype)
    return torch.cat([cls_row, grid])


def embed_tokens(visual: nn.Module, images: Tensor) -> Tensor:
    """(B, 3, H, W) normalised -> (B, 1 + h*w, C) tokens entering the first block, grid = size // patch.

    open_clip's VisionTransformer._embeds with the position embedding resampled to the input's grid.
    """
    patches = visual.conv1(images)  # (B, C, h, w)
    grid = tuple(patches.shape[-2:])
    patches = patches.flatten(2).transpose(1, 2)  # (B, h*w, C)
    cls_token = visual.class_embedding.view(1, 1, -1).expand(patches.shape[0], -1, -1).to(patches.dtype)
    position = resample_position_embedding(visual.positional_embedding, visual.grid_size, grid)
    tokens = torch.cat([cls_token, patches], dim=1) + position.to(patches.dtype)
    return visual.ln_pre(tokens)


def self_similarity(x: Tensor, inv_temp: Tensor) -> Tensor:
    """(B, heads, N, d) L2-normalised tokens -> (B, heads, N, N) row-softmax of x x^T * inv_temp."""
    return torch.softmax(x @ x.transpose(-2, -1) * inv_temp, dim=-1)


def self_self_assignment(x: Tensor, v: Tensor, inv_temp: Tensor) -> Tensor:
    """One of q, k, v as (B, heads, N, d) -> (B, heads, N, d) values re-assigned by its self-similarity.

    One clustering iteration X <- A X on the normalised tokens, then the final A applied to the
    original values v.
    """
    x = F.normalize(x, dim=-1)
    x = self_similarity(x, inv_temp) @ x
    x = F.normalize(x, dim=-1)
    return self_similarity(x, inv_temp) @ v


def self_self_attention(attn: nn.MultiheadAttention, x: Tensor) -> Tensor:
    """GEM's attention with the weights of `attn`: ln_1 tokens (B, N, C) -> residual (B, N, C).

    inv_temp = mean over the image's tokens (class token included) of their L2 norm, times
    head_dim^-0.5; one value per image, shared by the heads.
    """
    batch, tokens, width = x.shape
    heads = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, tokens, heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d)
    inv_temp = x.norm(dim=-1).mean(dim=-1).view(batch, 1, 1, 1) * q.shape[-1] ** -0.5
    out = sum(self_self_assignment(t, v, inv_temp) for t in (q, k, v)) / 3
    out = out.transpose(1, 2).reshape(batch, tokens, width)
    return attn.out_proj(out)


def project_tokens(visual: nn.Module, tokens: Tensor) -> Tensor:
    """(B, N, C) -> (B, N, D): ln_post then the image projection, on every token."""
    return visual.ln_post(tokens) @ visual.proj


def gem_forward(visual: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """(B, 3, H, W) normalised -> (normal stream, GEM stream), each (B, 1 + h*w, D) after ln_post, proj.

    Token 0 is the class token; the normal stream's class token is the usual CLIP image embedding
    (at the model's native size).
    """
    _check_supported(visual)
    blocks = visual.transformer.resblocks
    first_gem = len(blocks) - (GEM_DEPTH - 1)
    x = embed_tokens(visual, images)
    for block in blocks[:first_gem]:
        x = block(x)
    gem = x
    for block in blocks[first_gem:]:
        # Both read ln_1 of the normal stream entering this block (module docstring).
        gem = gem + block.ls_1(self_self_attention(block.attn, block.ln_1(x)))
        x = block(x)
    return project_tokens(visual, x), project_tokens(visual, gem)


def _check_supported(visual: nn.Module) -> None:
    transformer = getattr(visual, "transformer", None)
    if transformer is None or not getattr(transformer, "batch_first", False):
        raise ValueError("GEM needs an open_clip 3.x VisionTransformer with batch-first blocks")
    if len(transformer.resblocks) < GEM_DEPTH - 1:
        raise ValueError(f"GEM depth {GEM_DEPTH} needs at least {GEM_DEPTH - 1} blocks")
    if not all(isinstance(block.attn, nn.MultiheadAttention) for block in transformer.resblocks):
        raise ValueError("GEM reads nn.MultiheadAttention weights; this model uses another attention")
    if visual.attn_pool is not None or visual.final_ln_after_pool:
        raise ValueError("GEM needs ln_post applied to every token (no attentional pooling)")


@torch.inference_mode()
def dense_features(clip: Clip, images: Tensor) -> Tensor:
    """(B, 3, H, W) normalised -> (B, D, h, w) fp32, L2-normalised GEM patch features (no class token)."""
    batch, _, height, width = images.shape
    patch_h, patch_w = clip.model.visual.patch_size
    _, gem = gem_forward(clip.model.visual, images.to(clip.device, clip.dtype))
    features = F.normalize(gem[:, 1:].float(), dim=-1)
    return features.transpose(1, 2).reshape(batch, -1, height // patch_h, width // patch_w)


# --- text side and classification ---------------------------------------------------------


@torch.inference_mode()
def encode_classes(clip: Clip, classes: list[str]) -> Tensor:
    """Class names -> (C, D) fp32 L2-normalised text embeddings of "a photo of a {class}."."""
    tokens = clip.tokenizer([PROMPT_TEMPLATE.format(name) for name in classes]).to(clip.device)
    return F.normalize(clip.model.encode_text(tokens).float(), dim=-1)


def class_logits(clip: Clip, image: np.ndarray, classes: list[str]) -> Tensor:
    """uint8 RGB (H, W, 3) and C class names -> (C, h, w) cosine similarities (28x28 at 448)."""
    features = dense_features(clip, preprocess(clip, image))[0]  # (D, h, w)
    return torch.einsum("cd,dhw->chw", encode_classes(clip, classes), features)


def class_probabilities(logits: Tensor, temperature: float = CLASS_TEMPERATURE) -> Tensor:
    """(C, h, w) logits -> (C, h, w) CA = softmax(logits / temperature) over classes."""
    return torch.softmax(logits / temperature, dim=0)


def background_channel(probs: Tensor, offset: float = BACKGROUND_OFFSET) -> Tensor:
    """(C, h, w) class probabilities -> (1, h, w) background score max(0, 1 - max_c CA - offset).

    The langseg VOC recipe computes CA with temperature s = 0.1 (class_probabilities(logits, 0.1))
    and scores 1 - max_c CA - 0.8; the clamp at 0 never changes the argmax (CA > 0). Background
    can win a pixel only where max_c CA < (1 - offset) / 2 = 0.1, which needs more than 10 classes.
    """
    return (1 - probs.max(dim=0, keepdim=True).values - offset).clamp(min=0)
