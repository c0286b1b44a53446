"""Each worker's VAE latents of recent pictures: a second question about a picture skips its fetch,
decode and VAE encode.

An entry is the clean latents (1, 4, R/8, R/8) of one stored picture, keyed by (model, the picture's
store key, working resolution, dtype). The store key names the tenant as well as the content hash,
so one tenant's queries never run faster because of another's picture (nothing to learn from the
timing). At most ATTNSEG_LATENT_CACHE_MIB of tensors are held, the least recently used dropped
first; at 512 an entry is 64 KiB in fp32, so the default holds thousands of pictures. Latents read
back are the very tensors the VAE gave, so a job's masks are the bytes they would be without the
cache (tests/test_picture_reuse.py); only a picture first encoded in a larger VAE batch carries that
batch's rounding, as the batch's own masks already did.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import torch

from workers.engine.batch import Member
from workers.engine.pictures import fetch_image
from workers.methods.passes import Encoded, clean_latents
from workers.models.stable_diffusion import StableDiffusion

LatentKey = tuple[str, str, int, str]  # model, picture store key, resolution, dtype


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.element_size() * tensor.nelement()


class LatentCache:
    """Least recently used tensors under a byte bound; safe to share between threads."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.hits = self.misses = 0
        self._entries: OrderedDict[LatentKey, torch.Tensor] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()

    def get(self, key: LatentKey) -> torch.Tensor | None:
        with self._lock:
            latents = self._entries.get(key)
            if latents is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return latents

    def put(self, key: LatentKey, latents: torch.Tensor) -> None:
        """Keep `latents` (their own storage: pass a clone of a batch row); too large for the bound: not kept."""
        size = tensor_bytes(latents)
        if size > self.max_bytes:
            return
        with self._lock:
            previous = self._entries.pop(key, None)
            self._held += size - (tensor_bytes(previous) if previous is not None else 0)
            self._entries[key] = latents
            while self._held > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._held -= tensor_bytes(dropped)

    @property
    def held_bytes(self) -> int:
        return self._held


def latent_key(sd: StableDiffusion, member: Member) -> LatentKey:
    return (sd.model_id, member.payload["image"]["key"], member.payload["params"]["resolution"], str(sd.dtype))


def cached_or_fetched(cache: LatentCache, sd: StableDiffusion, member: Member, side: int | None) -> None:
    """The member's latents from the cache, else its picture fetched and decoded at `side`."""
    member.latents = cache.get(latent_key(sd, member))
    if member.latents is None:
        member.image = fetch_image(member.ctx, member.payload["image"], min_side=side)


def member_latents(cache: LatentCache, sd: StableDiffusion, members: list[Member], resolution: int) -> list[Encoded]:
    """Every member's clean latents (1, 4, r, r): the cached ones as they are, the others encoded in
    one VAE call (as `clean_latents` of their pictures) and cached. Each member's `latent` stage is
    its share of the VAE's time (0 for a cached one)."""
    missing = [member for member in members if member.latents is None]
    started = time.perf_counter()
    if missing:
        fresh = clean_latents(sd, [member.image for member in missing], resolution)
        for member, row in zip(missing, fresh):
            member.latents = row[None].clone()  # its own storage, not the whole batch's
            cache.put(latent_key(sd, member), member.latents)
    spent_ms = round((time.perf_counter() - started) * 1000, 1)
    encoded_now = {id(member) for member in missing}
    for member in members:
        member.ctx.stages_ms["latent"] = spent_ms if id(member) in encoded_now else 0.0
    return [Encoded(member.latents) for member in members]
