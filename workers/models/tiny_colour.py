"""`tiny-colour`: a Stable Diffusion of the real SD 1.x topology whose attention is known by construction.

The modules are those of `tiny-random` (tiny_random.ARCHITECTURES["tiny-colour"]: 16 transformer
blocks at grids R, R/2, R/4, R/8, a VAE that downsamples by 8, a CLIP text encoder with the real
BPE vocabulary, the DDPM scheduler); every weight is then set by hand, none is trained and none is
random. The pipeline is written in diffusers layout and loaded through the same `from_pretrained`
path as real weights. What it computes, in words (docs/tiny-colour.md gives the algebra):

- **VAE.** The encoder keeps each 8x8 patch's mean colour: latent channels 0 and 1 are the patch's
  chroma (the RGB cube projected on the plane orthogonal to grey, a = (2R - G - B)/sqrt 6,
  b = (G - B)/sqrt 2), channel 2 its lightness, channel 3 zero, times LATENT_GAIN; the posterior
  variance is ~0 (log-variance -30). Convolutions sample 2x2 means exactly; the one GroupNorm on
  the way is made a fixed linear map by giving each group the layout (x, -x, K, -K) with a large
  constant K (mean 0, variance ~K^2 / 2 whatever the picture), and SiLU(x) - SiLU(-x) = x undoes
  the activation. The decoder is the inverse (8x8 blocks of the patch colour).
- **UNet.** conv_in copies the chroma into the residual stream as (a, -a, K, -K, b, -b, K, -K);
  every ResNet adds zero (conv2 = 0) so the stream is its shortcut, downsamplers take exact 2x2
  means, and the up path takes each grid's features from its skip connection. So every attention
  grid sees the chroma averaged over its cells, the finer grids the finer average. Transformer
  blocks add nothing to the stream (to_out, ff and proj_out are 0): they only *compute* attention.
  Before attention, GroupNorm + proj_in + LayerNorm turn the chroma into the unit vector
  u = (a, b, G0) / |(a, b, G0)|: the hue direction, tilted towards a "grey pole" (0, 0, 1) by the
  constant G0, so neutral pixels all point at the pole and saturated ones near the chroma plane.
  Self-attention in blocks 1, 2, 12, 14, 15, 16 (grid R, and selfcross's block 12 at R/2):
  q = k = u scaled so that the logit is SELF_SCALE * cos(u_p, u_q): a position attends to the
  positions of its own colour (grey included) and hardly to any other. In the other blocks (the
  rest of R/2, all of R/4 and R/8) the query is a constant, so every position attends alike, to
  the greyest positions (an attention sink): coarse cells straddle borders, and their maps,
  upsampled, would smear a small object's DiffSeg proposal over its surroundings (proposals are
  densities: a small object's is high, so any spill wins pixels); a part shared by every row
  changes neither DiffSeg's argmax nor, much, its KL distances.
  Cross-attention: q = (u, 1) (the 1 from a LayerNorm bias); the key of a text token is its
  text-encoder output, read as a 4-vector w, and the logit is (u, 1) . w. Each colour word's w is
  its colour's u minus a threshold halfway between 1 and the closest other colour's (or grey's)
  cosine, scaled so the word's logit is COLOUR_MARGIN on its colour and below 0 on every other;
  GENERIC_WORDS ("shape") score saturation (away from the pole): any colour; the start token has
  a constant logit BOS_LOGIT, as the real model's attention sink; every other token has key 0 and
  logit 0. The UNet's noise prediction is 0.
- **Text encoder.** Attention and MLP outputs are 0, position embeddings 0, so the output at each
  position is the final LayerNorm of that token's input embedding: context-free, and a concept
  whose vector is a colour word's input embedding (`colour_embedding`) means that colour.

What follows for the methods (none has a special case for this model): DiffSeg's merged
self-attention groups positions by colour (instances of one colour form one segment); a colour
word's cross-attention covers its colour's regions, so selfcross with colour words as classes
labels them; SLiMe learns text vectors that point at a colour; referring finds the instances of
"shape" (any colour; instances of different colours are separated by the self-attention) and an
imported concept with a colour word's embedding picks its colour's instance.

Limits, by construction: it sees colour only, not shape or texture; two touching regions of one
colour are one region; the diffusion loss is constant (noise prediction 0), so concept *training*
(Custom Diffusion, Textual Inversion) learns nothing here: import concepts instead
(`colour_embedding`). No CLIP counterpart for GEM is built: GEM's text side reads the end token
after a causal text transformer, so a colour word would have to be routed to it by constructed
attention in open_clip's text tower, and GEM's self-self attention would need its own
construction; the GEM methods run with `tiny-random`'s CLIP, whose masks mean nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from workers.models.tiny_random import build_once, random_components, write_components

MODEL_NAME = "tiny-colour"
VERSION = 1  # part of the cache folder's name: a changed construction is built afresh
CONSTRUCTED_MARKER = "attnseg_constructed_weights.json"
# What the model is, in the words the playground and `attnseg up` show (read from the marker file).
NOTE = "weights constructed, not trained: masks follow colour; real segmentation needs Stable Diffusion weights"

# The colour vocabulary (word -> sRGB), one BPE token each, hues at least ~30 degrees apart on the
# chroma plane. The synthetic world (workers/evaluation/synthetic.py) paints with these.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "orange": (245, 130, 20),
    "yellow": (230, 225, 35),
    "green": (40, 175, 60),
    "teal": (20, 170, 180),
    "blue": (40, 80, 230),
    "purple": (150, 50, 210),
    "pink": (245, 90, 185),
}
GENERIC_WORDS = ("shape",)  # words whose cross-attention covers every coloured region

LATENT_GAIN = 8.0  # latent units per unit of chroma (pixels in [-1, 1]): saturated colours at ~8-10
GREY_POLE = 3.0  # G0, in latent units: how far the "grey" axis tilts u for unsaturated positions
SELF_SCALE = 80.0  # self-attention logit per unit cosine
# Blocks (docs/methods.md 0.2) whose self-attention is the same for every query: attention to the
# greyest positions (logit SINK_SCALE * u_g). Coarse cells straddle borders; see the docstring.
SINK_SELF_BLOCKS = (3, 4, 5, 6, 7, 8, 9, 10, 11, 13)
SINK_SCALE = 20.0
COLOUR_MARGIN = 12.0  # a colour word's cross-attention logit on its own colour
BOS_LOGIT = 4.0  # the start token's constant logit (the attention sink of real SD)
GROUP_CONSTANT = 100.0  # K: dominates every GroupNorm group, so the norm is a fixed scale

# Residual-stream channels of the UNet (and the VAE encoder/decoder, which add lightness).
A, A_NEG, K1, K1_NEG, B, B_NEG, K2, K2_NEG, L, L_NEG, K3, K3_NEG = range(12)
# Channels after a transformer's proj_in: u's three components as pairs, then a constant 1.
I_A, I_A_NEG, I_B, I_B_NEG, I_G, I_G_NEG, I_ONE = range(7)


def chroma_matrix() -> torch.Tensor:
    """(3, 3): RGB in [-1, 1] -> (a, b, lightness); rows a = (2R - G - B)/sqrt 6, b = (G - B)/sqrt 2,
    lightness = (R + G + B)/3. Grey has a = b = 0."""
    return torch.tensor(
        [
            [2 / math.sqrt(6), -1 / math.sqrt(6), -1 / math.sqrt(6)],
            [0.0, 1 / math.sqrt(2), -1 / math.sqrt(2)],
            [1 / 3, 1 / 3, 1 / 3],
        ]
    )


def colour_direction(rgb: tuple[int, int, int]) -> np.ndarray:
    """u (3,): the unit vector the attention layers see at a position of this sRGB colour."""
    pixels = torch.tensor(rgb, dtype=torch.float64) / 127.5 - 1.0
    a, b, _ = (chroma_matrix().double() @ pixels).tolist()
    u = np.array([LATENT_GAIN * a, LATENT_GAIN * b, GREY_POLE])
    return u / np.linalg.norm(u)


def text_keys() -> dict[str, np.ndarray]:
    """word -> w (4,): the cross-attention key whose logit at a position is (u, 1) . w.

    Colour words: w = s (u_c, -m_c) with m_c halfway between 1 and the closest cosine of u_c to
    another colour or to grey, s such that the logit on u_c is COLOUR_MARGIN. Generic words:
    saturation, (0, 0, -1, m) with m halfway between grey (1) and the least saturated colour.
    """
    directions = {word: colour_direction(rgb) for word, rgb in COLOURS.items()}
    pole = np.array([0.0, 0.0, 1.0])
    keys = {}
    for word, u in directions.items():
        others = [pole] + [v for other, v in directions.items() if other != word]
        threshold = (1.0 + max(float(u @ v) for v in others)) / 2
        keys[word] = COLOUR_MARGIN / (1.0 - threshold) * np.append(u, -threshold)
    most_grey = max(float(u @ pole) for u in directions.values())
    threshold = (1.0 + most_grey) / 2
    generic = COLOUR_MARGIN / (threshold - most_grey) * np.array([0.0, 0.0, -1.0, threshold])
    keys.update({word: generic for word in GENERIC_WORDS})
    return keys


def _zero(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.zero_()


def _centre(conv: torch.nn.Conv2d, out_channel: int, in_channel: int, value: float) -> None:
    """Set the centre tap of a (3x3 or 1x1) convolution from one channel to another."""
    kh, kw = conv.weight.shape[-2:]
    conv.weight.data[out_channel, in_channel, kh // 2, kw // 2] = value


def _mean_2x2(conv: torch.nn.Conv2d, channels: range, first_tap: int) -> None:
    """A stride-2 3x3 convolution as the exact mean of each 2x2 block: taps first_tap, first_tap + 1
    (1 for padding 1, where tap 1 is row 2i; 0 for the VAE's padding (0, 1, 0, 1))."""
    for c in channels:
        conv.weight.data[c, c, first_tap : first_tap + 2, first_tap : first_tap + 2] = 0.25


def _pairs(conv: torch.nn.Conv2d, rows: dict[int, torch.Tensor], constants: tuple[int, ...]) -> None:
    """conv's centre taps: channel x gets `rows[x]` (weights over the input channels), x + 1 its
    negative; each channel in `constants` gets bias K, the next one -K."""
    for channel, row in rows.items():
        for in_channel, value in enumerate(row.tolist()):
            _centre(conv, channel, in_channel, value)
            _centre(conv, channel + 1, in_channel, -value)
    for channel in constants:
        conv.bias.data[channel], conv.bias.data[channel + 1] = GROUP_CONSTANT, -GROUP_CONSTANT


def _unpair(conv: torch.nn.Conv2d, out_channel: int, pair: int, value: float) -> None:
    """After GroupNorm (x -> ~x sqrt 2 / K) and SiLU: out += value * x, from SiLU(x') - SiLU(-x')."""
    scale = value * GROUP_CONSTANT / math.sqrt(2)
    _centre(conv, out_channel, pair, scale)
    _centre(conv, out_channel, pair + 1, -scale)


def _construct_vae(vae) -> None:
    """Encoder: latent = LATENT_GAIN * (a, b, lightness, 0) of each 8x8 patch mean (after the
    scaling factor), log-variance -30. Decoder: the inverse, each latent cell an 8x8 block."""
    _zero(vae)  # ResNets and the mid attention then add nothing: the stream is their shortcut
    basis = chroma_matrix()
    gain = LATENT_GAIN / vae.config.scaling_factor  # posterior mean units
    for norm in (vae.encoder.conv_norm_out, vae.decoder.conv_norm_out):
        norm.weight.data.fill_(1.0)
    encoder = vae.encoder
    _pairs(encoder.conv_in, {A: basis[0], B: basis[1], L: basis[2]}, (K1, K2, K3))
    for block in encoder.down_blocks:
        for downsampler in block.downsamplers or ():
            _mean_2x2(downsampler.conv, range(K3_NEG + 1), first_tap=0)
    for latent, pair in enumerate((A, B, L)):
        _unpair(encoder.conv_out, latent, pair, gain)
    encoder.conv_out.bias.data[4:] = -30.0  # log-variance: the posterior is its mean
    vae.quant_conv.weight.data[:, :, 0, 0] = torch.eye(8)
    vae.post_quant_conv.weight.data[:, :, 0, 0] = torch.eye(4)

    decoder = vae.decoder
    _pairs(
        decoder.conv_in, {A: torch.eye(4)[0] / gain, B: torch.eye(4)[1] / gain, L: torch.eye(4)[2] / gain}, (K1, K2, K3)
    )
    for block in decoder.up_blocks:
        for upsampler in block.upsamplers or ():
            for c in range(K3_NEG + 1):
                _centre(upsampler.conv, c, c, 1.0)
    inverse = torch.linalg.inv(basis)
    for rgb in range(3):
        for column, pair in enumerate((A, B, L)):
            _unpair(decoder.conv_out, rgb, pair, float(inverse[rgb, column]))


def _up_skip_offsets(unet) -> list[list[int]]:
    """For each up block and ResNet, where the skip connection starts in the concatenated input
    (diffusers concatenates [hidden, skip]): the hidden part's channel count."""
    offsets, hidden = [], unet.config.block_out_channels[-1]
    for block in unet.up_blocks:
        block_offsets = []
        for j, resnet in enumerate(block.resnets):
            block_offsets.append(hidden if j == 0 else resnet.out_channels)
        offsets.append(block_offsets)
        hidden = block.resnets[-1].out_channels
    return offsets


def _construct_transformer(transformer, text_width: int, key_norm: float, sink: bool) -> None:
    """q/k of both attentions from u (see the module docstring); the block adds nothing.
    Text embeddings hold the keys divided by key_norm (to fit a unit norm); to_k multiplies back."""
    inner = transformer.proj_in.out_channels
    transformer.norm.weight.data.fill_(1.0)
    proj = transformer.proj_in
    scale = GROUP_CONSTANT / math.sqrt(2)  # undoes GroupNorm's fixed scale: back to latent units
    for out, source in ((I_A, A), (I_B, B)):
        _centre(proj, out, source, scale)
        _centre(proj, out + 1, source, -scale)
    proj.bias.data[I_G], proj.bias.data[I_G_NEG] = GREY_POLE, -GREY_POLE
    layer = transformer.transformer_blocks[0]
    for norm in (layer.norm1, layer.norm2):
        norm.weight.data[: I_G_NEG + 1] = 1.0
        norm.bias.data[I_ONE] = 1.0  # a constant channel: the cross-attention's bias term
    unit = 1.0 / math.sqrt(inner / 2)  # LayerNorm of the pairs (x, -x) is x sqrt(inner/2) / |x|
    self_attention, cross_attention = layer.attn1, layer.attn2
    heads = self_attention.heads
    head_dim = inner // heads
    text_unit = 1.0 / math.sqrt(text_width / 2)  # text output t = w sqrt(width/2) on its pairs
    self_gain = math.sqrt(SELF_SCALE * math.sqrt(head_dim)) * unit
    for h in range(heads):
        for j, source in enumerate((I_A, I_B, I_G)):
            if not sink:
                for linear in (self_attention.to_q, self_attention.to_k):
                    linear.weight.data[h * head_dim + j, source] = self_gain
            cross_attention.to_q.weight.data[h * head_dim + j, source] = unit
        if sink:  # q = 1 everywhere, k = u_g: every row is the same distribution over greyness
            self_attention.to_q.weight.data[h * head_dim, I_ONE] = 1.0
            self_attention.to_k.weight.data[h * head_dim, I_G] = SINK_SCALE * math.sqrt(head_dim) * unit
        cross_attention.to_q.weight.data[h * head_dim + 3, I_ONE] = 1.0
        for j in range(4):
            cross_attention.to_k.weight.data[h * head_dim + j, 2 * j] = math.sqrt(head_dim) * text_unit * key_norm


def _construct_unet(unet, key_norm: float) -> None:
    _zero(unet)  # ResNets add 0, transformers add 0, the noise prediction is 0
    text_width = unet.config.cross_attention_dim
    _pairs(unet.conv_in, {A: torch.eye(4)[0], B: torch.eye(4)[1]}, (K1, K2))
    features = range(K2_NEG + 1)
    for block in unet.down_blocks:
        for resnet in block.resnets:
            if resnet.conv_shortcut is not None:
                for c in features:
                    _centre(resnet.conv_shortcut, c, c, 1.0)
        for downsampler in block.downsamplers or ():
            _mean_2x2(downsampler.conv, features, first_tap=1)
    for block, offsets in zip(unet.up_blocks, _up_skip_offsets(unet)):
        for resnet, offset in zip(block.resnets, offsets):
            for c in features:
                _centre(resnet.conv_shortcut, c, offset + c, 1.0)  # the skip: the finer features
        for upsampler in block.upsamplers or ():
            for c in features:
                _centre(upsampler.conv, c, c, 1.0)
    transformers = [
        transformer
        for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
        for transformer in getattr(block, "attentions", None) or ()
    ]
    for number, transformer in enumerate(transformers, start=1):  # docs/methods.md 0.2's numbers
        _construct_transformer(transformer, text_width, key_norm, sink=number in SINK_SELF_BLOCKS)


def colour_embedding(word: str, width: int) -> torch.Tensor:
    """The text encoder's input embedding (width,) of a colour or generic word: the key w (4,) laid
    out as pairs (w_j, -w_j), then a pair (d, -d) that brings the norm to 1, so that the final
    LayerNorm scales every such embedding alike. Also the vector of a concept meaning that word."""
    w = text_keys()[word] / key_norm()
    padding = math.sqrt(max(0.0, 1.0 - float(w @ w)))
    embedding = torch.zeros(width)
    for j, value in enumerate([*w.tolist(), padding]):
        embedding[2 * j], embedding[2 * j + 1] = value, -value
    return embedding


def key_norm() -> float:
    """The largest key norm (colour, generic and start-token keys): embeddings hold key / this."""
    return max(BOS_LOGIT, *(float(np.linalg.norm(key)) for key in text_keys().values()))


def _construct_text_encoder(text_encoder, tokenizer) -> None:
    """Zero everything but the final LayerNorm and the embeddings of the colour words, the generic
    words and the start token; every other token's output is 0 (key 0, logit 0)."""
    _zero(text_encoder)
    text_encoder.final_layer_norm.weight.data.fill_(1.0)
    width = text_encoder.config.hidden_size
    table = text_encoder.embeddings.token_embedding.weight.data
    for word in [*COLOURS, *GENERIC_WORDS]:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"{word!r} is {len(ids)} tokens; the vocabulary needs single-token words")
        table[ids[0]] = colour_embedding(word, width)
    bos = np.array([0.0, 0.0, 0.0, BOS_LOGIT]) / key_norm()
    table[tokenizer.bos_token_id, :8] = torch.tensor([v * s for v in bos.tolist() for s in (1, -1)])
    table[tokenizer.bos_token_id, 8:10] = torch.tensor([1.0, -1.0]) * math.sqrt(1.0 - float(bos @ bos))


def tiny_colour_components() -> dict:
    """The five components with their constructed weights (deterministic, no RNG)."""
    components = random_components("tiny-colour")
    _construct_vae(components["vae"])
    _construct_unet(components["unet"], key_norm())
    _construct_text_encoder(components["text_encoder"], components["tokenizer"])
    return components


def _write(directory: Path) -> None:
    write_components(directory, tiny_colour_components())
    marker = {
        "constructed_weights": True,
        "model": MODEL_NAME,
        "version": VERSION,
        "note": NOTE,
    }
    (directory / CONSTRUCTED_MARKER).write_text(json.dumps(marker, indent=2))


def build_tiny_colour(path: Path) -> Path:
    """Write tiny-colour into `path` (diffusers layout) unless it is already there."""
    return build_once(path, _write, CONSTRUCTED_MARKER)
