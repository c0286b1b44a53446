"""The open_clip model behind GEM (docs/methods.md 0.1, 2.3), loaded once per worker.

`pretrained` is one of:
- an open_clip pretrained tag (`metaclip_400m`): the file a previous download left in the
  Hugging Face / open_clip cache, else a download (none with `HF_HUB_OFFLINE=1`);
- a local checkpoint file, loaded into the architecture `name`;
- an open_clip `local-dir` folder (`open_clip_config.json` + weights), which carries its own
  architecture.
The name `"tiny-random"` builds a small randomly initialised ViT-B/16-shaped CLIP, writes it as such
a folder and loads it back through the same path as real weights.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from huggingface_hub import try_to_load_from_cache
from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from safetensors.torch import save_file

from workers.models.stable_diffusion import ModelUnavailableError, hub_offline

DEFAULT_CLIP_MODEL = "ViT-B-16-quickgelu"
DEFAULT_CLIP_PRETRAINED = "metaclip_400m"  # best in the langseg report

TINY_RANDOM = "tiny-random"
TINY_RANDOM_SEED = 0
# ViT-B/16 topology (patch 16, 14x14 grid at 224, so 448 gives the real 28x28) at tiny widths;
# 8 blocks so that GEM depth 7 leaves two plain blocks before the GEM ones. The text tower keeps
# the real BPE vocabulary and 77-token context so the real tokenizer drives it.
TINY_RANDOM_CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "patch_size": 16, "layers": 8, "width": 64, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
LOCAL_DIR_CONFIG_FILE = "open_clip_config.json"  # the name open_clip's local-dir loader reads
TINY_RANDOM_WEIGHTS_FILE = "open_clip_model.safetensors"


@dataclass
class Clip:
    model: torch.nn.Module  # open_clip CLIP, eval mode, parameters frozen
    tokenizer: Callable[[list[str]], torch.Tensor]  # open_clip BPE tokenizer -> (N, context) ids
    name: str
    pretrained: str
    device: torch.device
    dtype: torch.dtype
    random_weights: bool

    def describe(self) -> dict:
        return {
            "clip_model": self.name,
            "clip_pretrained": self.pretrained,
            "random_weights": self.random_weights,
        }


def load_clip(
    name: str = DEFAULT_CLIP_MODEL,
    pretrained: str = DEFAULT_CLIP_PRETRAINED,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    cache_dir: Path | None = None,
) -> Clip:
    """Load an open_clip model (frozen, eval) and its tokenizer.

    Raises ModelUnavailableError when the weights are neither cached nor downloadable, and
    ValueError for a tag open_clip does not know for `name`.
    """
    if name == TINY_RANDOM:
        folder = write_tiny_random_clip(Path(cache_dir or _default_cache_dir()) / "tiny-random-clip")
        pretrained = f"random-seed-{TINY_RANDOM_SEED}"
        model_id, checkpoint, tag_cfg = f"local-dir:{folder}", None, {}
    else:
        model_id, checkpoint, tag_cfg = _resolve_weights(name, pretrained, cache_dir)
    model = open_clip.create_model(
        model_id,
        pretrained=checkpoint,
        # A file path loses what the tag says about the architecture and the preprocessing.
        force_quick_gelu=bool(tag_cfg.get("quick_gelu")),
        force_preprocess_cfg=tag_cfg,
    )
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Clip(
        model=model,
        tokenizer=open_clip.get_tokenizer(model_id),
        name=name,
        pretrained=pretrained,
        device=torch.device(device),
        dtype=dtype,
        random_weights=_marked_random(model_id),
    )


def _marked_random(model_id: str) -> bool:
    """Whether a local-dir folder says it holds random weights (write_tiny_random_clip marks it)."""
    if not model_id.startswith("local-dir:"):
        return False
    config = json.loads((Path(model_id.removeprefix("local-dir:")) / LOCAL_DIR_CONFIG_FILE).read_text())
    return bool(config.get("attnseg", {}).get("random_weights"))


def _resolve_weights(name: str, pretrained: str, cache_dir: Path | None) -> tuple[str, str | None, dict]:
    """(open_clip model id, checkpoint file or None, the tag's pretrained cfg or {})."""
    path = Path(pretrained).expanduser()
    if path.is_dir():
        if not (path / LOCAL_DIR_CONFIG_FILE).is_file():
            reason = f"the folder has no {LOCAL_DIR_CONFIG_FILE}"
            raise ModelUnavailableError(_unavailable_message(name, pretrained, reason))
        return f"local-dir:{path}", None, {}
    if path.is_file():
        return name, str(path), {}
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_cfg:
        if os.sep in pretrained:
            raise ModelUnavailableError(_unavailable_message(name, pretrained, "no such file or folder"))
        known = open_clip.list_pretrained_tags_by_model(name)
        raise ValueError(f"open_clip knows no pretrained tag {pretrained!r} for {name!r}; known: {known}")
    # Cache first: a download would first ask the hub for a newer revision, which without a
    # network costs about 45 s of retries before huggingface_hub falls back to the cache.
    checkpoint = _cached_checkpoint(tag_cfg, cache_dir)
    if checkpoint is not None:
        return name, checkpoint, tag_cfg
    if hub_offline():
        raise ModelUnavailableError(_unavailable_message(name, pretrained, "not in the local cache, offline"))
    try:
        checkpoint = open_clip.download_pretrained(tag_cfg, cache_dir=_str_or_none(cache_dir))
    except (OSError, RuntimeError) as error:
        raise ModelUnavailableError(_unavailable_message(name, pretrained, str(error))) from error
    return name, checkpoint, tag_cfg


def _cached_checkpoint(tag_cfg: dict, cache_dir: Path | None) -> str | None:
    """The tag's weights file if a previous download left it in a local cache, else None.

    Mirrors where open_clip.download_pretrained puts files: the HF hub cache for `hf_hub`
    ("org/repo/" means the default open_clip file names), `cache_dir` or ~/.cache/clip for `url`.
    """
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)
        for candidate in [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]:
            hit = try_to_load_from_cache(repo_id, candidate, cache_dir=_str_or_none(cache_dir))
            if isinstance(hit, str):
                return hit
    url = tag_cfg.get("url", "")
    if url:
        hit = Path(cache_dir or "~/.cache/clip").expanduser() / os.path.basename(url)
        if hit.is_file():
            return str(hit)
    return None


def _unavailable_message(name: str, pretrained: str, reason: str) -> str:
    return (
        f"CLIP weights {name} / {pretrained} are not available on this machine ({reason}). "
        f"Download them on a connected machine (open_clip.create_model({name!r}, pretrained={pretrained!r}) "
        f"fills the Hugging Face cache) and mount that cache here (HF_HOME), "
        f"or pass a local checkpoint file path as ATTNSEG_CLIP_PRETRAINED."
    )


def write_tiny_random_clip(folder: Path, seed: int = TINY_RANDOM_SEED) -> Path:
    """Write the tiny random CLIP into `folder` as an open_clip local-dir unless it is there already.

    The weights are written before the config and each file is renamed into place, so a folder
    with a config is complete even with several writers at once.
    """
    folder = Path(folder)
    if (folder / LOCAL_DIR_CONFIG_FILE).is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_RANDOM_CONFIG)
    config = {
        "model_cfg": TINY_RANDOM_CONFIG,
        "preprocess_cfg": {"mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD},
        "attnseg": {"random_weights": True, "seed": seed, "note": "tiny test model, not trained"},
    }
    _write_atomic(folder / TINY_RANDOM_WEIGHTS_FILE, lambda tmp: save_file(model.state_dict(), tmp))
    config_text = json.dumps(config, indent=2)
    _write_atomic(folder / LOCAL_DIR_CONFIG_FILE, lambda tmp: Path(tmp).write_text(config_text))
    return folder


def _write_atomic(target: Path, write: Callable[[str], object]) -> None:
    # ".partial": open_clip's local-dir loader globs *.safetensors and must not see the temp file.
    handle, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-", suffix=".partial")
    os.close(handle)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared between users
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attnseg"


def _str_or_none(path: Path | None) -> str | None:
    return None if path is None else str(path)
