"""Randomly initialised Stable Diffusion pipelines at tiny widths, for tests and offline runs.

The topology is the real one (docs/methods.md 0.2: 16 transformer blocks at grids R, R/2, R/4, R/8; a
VAE that downsamples by 8; a 77-token CLIP text encoder with the real BPE vocabulary), only the
widths are small, so every code path that works here works on the real weights. The pipeline is
written in diffusers layout and loaded through the same `from_pretrained` calls as real weights.

Two families: "tiny" is SD 1.x (CLIP ViT-L/14 text encoder with quick_gelu, pad = EOS, one head
count, convolutional projections in the transformer blocks); "tiny-sd2" is SD 2.x (the OpenCLIP
ViT-H text encoder's gelu, pad = "!", a wider text than the SD 1.x tiny, as 1024 is wider than 768;
per-block head counts, linear projections). The same builder makes the real SD 1.5 sizes with
random weights ("sd15"): it costs what the real weights cost to run, so benchmarks need no download.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

RANDOM_WEIGHTS_MARKER = "attnseg_random_weights.json"

TEXT_WIDTH = 32
MAX_TOKENS = 77
VOCAB_SIZE = 49408
# open_clip's SimpleTokenizer keeps the first 49152 - 256 - 2 merges of its BPE file.
NUM_MERGES = 49152 - 256 - 2
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"


def clip_bpe_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary and merges, built as open_clip's SimpleTokenizer builds them.

    Returns (vocab token -> id, 49408 entries; merges as (left, right) pairs in rank order).
    """
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    bpe_file = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(bpe_file.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0: a version header
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(merge) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = EOS_TOKEN):
    """CLIP's tokenizer; pad = EOS as in SD 1.x (so "" encodes to BOS + 76 EOS), "!" in SD 2.x."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_vocabulary()
    # transformers 5 ignores vocab_file=; the vocabulary must be passed in memory.
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=pad_token,
        model_max_length=MAX_TOKENS,
    )


SD2_TEXT_WIDTH = 48  # wider than the SD 1.x tiny text: a concept file of one does not fit the other
SD2_PAD_TOKEN = "!"  # SD 2.x pads with "!" (id 0), not EOS

# What differs between the tiny test models and the real SD 1.5 (the widths of its published
# configs: UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M parameters); the block types, grids,
# BPE vocabulary and scheduler are shared. The UNet's cross-attention width is the text width.
# SD 2.x (stabilityai/stable-diffusion-2-1-base): text 1024 wide, 23 layers, 16 heads, gelu, pad
# "!"; UNet attention_head_dim (5, 10, 20, 20) read as per-block head counts (64-wide heads) and
# use_linear_projection; "tiny-sd2" keeps those traits at tiny widths (heads 2, 2, 4, 4: 16 wide).
TINY_TEXT = {
    "hidden_size": TEXT_WIDTH,
    "intermediate_size": 2 * TEXT_WIDTH,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "hidden_act": "quick_gelu",
}
TINY_UNET = {"block_out_channels": (32, 32, 64, 64), "norm_num_groups": 8, "attention_head_dim": 2}
ARCHITECTURES = {
    "tiny": {
        "text": TINY_TEXT,
        "unet": TINY_UNET,
        "vae": {"block_out_channels": (8, 16, 16, 16), "layers_per_block": 1, "norm_num_groups": 8},
        "pad_token": EOS_TOKEN,
    },
    "tiny-sd2": {
        "text": {
            "hidden_size": SD2_TEXT_WIDTH,
            "intermediate_size": 4 * SD2_TEXT_WIDTH,
            "num_hidden_layers": 2,
            "num_attention_heads": 3,
            "hidden_act": "gelu",
        },
        "unet": {
            "block_out_channels": (32, 32, 64, 64),
            "norm_num_groups": 8,
            "attention_head_dim": (2, 2, 4, 4),
            "use_linear_projection": True,
        },
        "vae": {"block_out_channels": (8, 16, 16, 16), "layers_per_block": 1, "norm_num_groups": 8},
        "pad_token": SD2_PAD_TOKEN,
    },
    # The modules of workers/models/tiny_colour.py before it sets their weights: "tiny" with a VAE
    # whose groups of 4 channels fit the construction's (x, -x, K, -K) layout.
    "tiny-colour": {
        "text": TINY_TEXT,
        "unet": TINY_UNET,
        "vae": {"block_out_channels": (16, 16, 16, 16), "layers_per_block": 1, "norm_num_groups": 4},
        "pad_token": EOS_TOKEN,
    },
    "sd15": {
        "text": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "hidden_act": "quick_gelu",
        },
        "unet": {"block_out_channels": (320, 640, 1280, 1280), "norm_num_groups": 32, "attention_head_dim": 8},
        "vae": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32},
        "pad_token": EOS_TOKEN,
    },
}


def _text_encoder(widths: dict, pad_token_id: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        **widths,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=VOCAB_SIZE - 2,
        eos_token_id=VOCAB_SIZE - 1,
        pad_token_id=pad_token_id,
    )
    return CLIPTextModel(config)


def _unet(widths: dict, cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        cross_attention_dim=cross_attention_dim,
        **widths,  # attention_head_dim: SD 1.x/2.x configs use it as the head count (docs/methods.md 0.3)
    )


def _vae(widths: dict):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 3 downsamplings: factor 8 like SD
        up_block_types=("UpDecoderBlock2D",) * 4,
        **widths,
        latent_channels=4,
        sample_size=512,
        scaling_factor=0.18215,
    )


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def _model_index() -> dict:
    import diffusers

    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def random_components(architecture: str = "tiny", seed: int = 0) -> dict:
    """The five components of an ARCHITECTURES entry, weights drawn from torch.manual_seed(seed).

    Same architecture and seed, same weights. "sd15" takes about 4.3 GB of memory (fp32).
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {sorted(ARCHITECTURES)}")
    widths = ARCHITECTURES[architecture]
    tokenizer = clip_tokenizer(widths["pad_token"])
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components = {
            "unet": _unet(widths["unet"], cross_attention_dim=widths["text"]["hidden_size"]),
            "vae": _vae(widths["vae"]),
            "text_encoder": _text_encoder(widths["text"], tokenizer.pad_token_id),
        }
    components["tokenizer"] = tokenizer
    components["scheduler"] = _scheduler()
    return components


def tiny_random_components(seed: int = 0) -> dict:
    """The five tiny components, weights drawn from torch.manual_seed(seed): same seed, same weights."""
    return random_components("tiny", seed)


def write_components(directory: Path, components: dict) -> None:
    """Save the five components into `directory` in diffusers layout, with its model_index.json."""
    for subfolder, component in components.items():
        component.save_pretrained(directory / subfolder)
    (directory / "model_index.json").write_text(json.dumps(_model_index(), indent=2))


def _write_pipeline(directory: Path, architecture: str, seed: int) -> None:
    write_components(directory, random_components(architecture, seed))
    marker = {
        "random_weights": True,
        "architecture": architecture,
        "seed": seed,
        "note": f"attnseg {architecture} random-weights model, not trained",
    }
    (directory / RANDOM_WEIGHTS_MARKER).write_text(json.dumps(marker, indent=2))


def build_tiny_random(path: Path, seed: int = 0) -> Path:
    """Write the tiny random SD pipeline into `path` (diffusers layout) unless it is already there."""
    return build_random(path, "tiny", seed)


def build_random(path: Path, architecture: str = "tiny", seed: int = 0) -> Path:
    """Write a random SD pipeline (an ARCHITECTURES entry) into `path` unless it is already there.

    Diffusers layout, loadable with load_stable_diffusion(path); "sd15" writes 4.3 GB (fp32).
    """
    return build_once(path, lambda staging: _write_pipeline(staging, architecture, seed), RANDOM_WEIGHTS_MARKER)


def build_once(path: Path, write: Callable[[Path], None], marker: str) -> Path:
    """Run `write(directory)` to fill `path` unless `path / marker` exists (written last by `write`).

    Safe under concurrent builders: each builds in a private directory next to `path` and renames
    it into place; a builder that loses the race discards its copy.
    """
    path = Path(path)
    if (path / marker).exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared between users
    try:
        write(staging)
        try:
            os.rename(staging, path)
        except OSError:
            if not (path / marker).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
