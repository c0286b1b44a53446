"""Loading the Stable Diffusion components a worker needs (docs/methods.md 0.1).

Each component is loaded with its own class's `from_pretrained`; there is no pipeline object and no
safety checker. `model_id` is a hub id, a local directory in diffusers layout, "tiny-random"
("tiny-random-sd2"): a randomly initialised pipeline of the real SD 1.x (2.x) topology, or
"tiny-colour": the SD 1.x topology with weights constructed so that attention follows colour
(workers/models/tiny_colour.py). Those are built once into a cache directory and then loaded
through the same code path as real weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workers.models import tiny_colour
from workers.models.tiny_random import RANDOM_WEIGHTS_MARKER, build_random

TINY_RANDOM = "tiny-random"
# Model ids built locally with random weights -> their tiny_random architecture.
RANDOM_MODELS = {TINY_RANDOM: "tiny", "tiny-random-sd2": "tiny-sd2"}
DEFAULT_CACHE_DIR = Path("~/.cache/attnseg")


class ModelUnavailableError(RuntimeError):
    """The weights of a model are not reachable; the message names the model and the remedy."""


@dataclass
class StableDiffusion:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object  # DDPMScheduler, used for add_noise
    model_id: str
    device: torch.device
    dtype: torch.dtype
    random_weights: bool
    # Text-encoder outputs of the prompts that recur (sd_ops.fixed_prompt_embeddings): the weights
    # are resident and frozen, so an entry never goes stale.
    prompt_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD): the latent grid R is resolution // this."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def describe(self) -> dict:
        return {
            "sd_model": self.model_id,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "random_weights": self.random_weights,
        }


def resolve_device(name: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; any other name is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """ "auto" -> float16 on cuda, float32 elsewhere; otherwise one of the names in _DTYPES."""
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use 'auto' or one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _unavailable(model_id: str, reason: str, *, is_path: bool) -> ModelUnavailableError:
    if is_path:
        remedy = (
            "Point ATTNSEG_SD_MODEL at a complete directory in diffusers layout "
            "(unet/, vae/, text_encoder/, tokenizer/, scheduler/), or at a hub id"
        )
    else:
        remedy = (
            f"Download it on a machine with internet access (`hf download {model_id}`, formerly "
            f"`huggingface-cli download {model_id}`) and mount that Hugging Face cache (HF_HOME) "
            "into the worker, or set ATTNSEG_SD_MODEL to a local directory in diffusers layout "
            "(unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    return ModelUnavailableError(f"Stable Diffusion model {model_id!r} is not available ({reason}). {remedy}.")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300].rstrip(".")


def hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it again so a late setting counts.
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _load_components(source: str, dtype: torch.dtype, local_files_only: bool) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    hub = {"local_files_only": local_files_only}
    # Small files first: a missing model fails before any large download starts.
    components = {
        "scheduler": DDPMScheduler.from_pretrained(source, subfolder="scheduler", **hub),
        "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **hub),
        "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **hub),
        "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **hub),
        "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **hub),
    }
    # CLIPTokenizer.from_pretrained on a folder without vocabulary files returns an empty tokenizer.
    vocab_size = components["text_encoder"].config.vocab_size
    if len(components["tokenizer"]) != vocab_size:
        raise OSError(
            f"tokenizer has {len(components['tokenizer'])} tokens, the text encoder {vocab_size}: "
            "tokenizer files missing or mismatched"
        )
    return components


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", ".", "~")) or Path(model_id).exists()


def load_stable_diffusion(
    model_id: str,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    cache_dir: Path | None = None,
) -> StableDiffusion:
    """Load UNet, VAE, text encoder, tokenizer and DDPM scheduler; frozen, in eval mode, on device.

    Raises ModelUnavailableError (naming the model and the remedy) when the weights cannot be found.
    The local Hugging Face cache is tried first, the hub only when that misses and the hub is not
    switched off with HF_HUB_OFFLINE=1.
    """
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    dtype = resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype

    cache = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
    if model_id in RANDOM_MODELS:
        source = build_random(cache / model_id, RANDOM_MODELS[model_id])
    elif model_id == tiny_colour.MODEL_NAME:
        source = tiny_colour.build_tiny_colour(cache / f"{model_id}-v{tiny_colour.VERSION}")
    elif _looks_like_path(model_id):
        source = Path(model_id).expanduser()
        if not source.is_dir():
            raise _unavailable(model_id, f"no directory {str(source)!r}", is_path=True)
    else:
        source = None

    try:
        if source is not None:
            components = _load_components(str(source), dtype, local_files_only=True)
        else:
            try:
                components = _load_components(model_id, dtype, local_files_only=True)
            except OSError:
                if hub_offline():
                    raise
                components = _load_components(model_id, dtype, local_files_only=False)
    except (OSError, ValueError) as error:  # hub, cache and file errors all derive from these
        raise _unavailable(model_id, _first_line(error), is_path=source is not None) from error

    for name in ("unet", "vae", "text_encoder"):  # already in dtype: loaded with it
        components[name].to(device).eval().requires_grad_(False)
    random_weights = source is not None and (source / RANDOM_WEIGHTS_MARKER).exists()
    return StableDiffusion(**components, model_id=model_id, device=device, dtype=dtype, random_weights=random_weights)
