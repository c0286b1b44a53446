"""Finding the 16 transformer blocks of the SD UNet and recording their attention maps.

docs/methods.md 0.2 (which blocks, in which order) and 0.3 (how maps are captured). A capturing
processor replaces diffusers' stock `AttnProcessor2_0` on the layers a method asks for only; it
computes exactly the stock output and, on the side, the head-averaged attention probabilities
(or pre-softmax logits) in fp32, summed into an `AttentionStore` per (kind, grid).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NUM_BLOCKS = 16
ALL_BLOCKS = tuple(range(1, NUM_BLOCKS + 1))  # block numbers, the rows of docs/methods.md 0.2
KINDS = ("self", "cross", "cross_logits")


@dataclass(frozen=True)
class TransformerBlock:
    number: int  # 1..16, the row of the table in docs/methods.md 0.2
    name: str  # module path in the UNet, e.g. "down_blocks.0.attentions.1"
    self_attention: torch.nn.Module  # attn1: queries and keys are pixels
    cross_attention: torch.nn.Module  # attn2: keys are the text tokens


def transformer_blocks(unet: torch.nn.Module) -> list[TransformerBlock]:
    """The UNet's transformer blocks in UNet order (down, mid, up), found by position.

    Raises ValueError unless there are exactly 16, each with one transformer layer (SD 1.x/2.x).
    """
    stages = [(f"down_blocks.{i}", block) for i, block in enumerate(unet.down_blocks)]
    stages.append(("mid_block", unet.mid_block))
    stages += [(f"up_blocks.{i}", block) for i, block in enumerate(unet.up_blocks)]
    found = []
    for stage_name, stage in stages:
        for j, transformer in enumerate(getattr(stage, "attentions", None) or ()):
            name = f"{stage_name}.attentions.{j}"
            if len(transformer.transformer_blocks) != 1:
                raise ValueError(f"{name} has {len(transformer.transformer_blocks)} transformer layers, expected 1")
            layer = transformer.transformer_blocks[0]
            found.append((name, layer.attn1, layer.attn2))
    if len(found) != NUM_BLOCKS:
        raise ValueError(
            f"expected the SD 1.x/2.x UNet topology with {NUM_BLOCKS} transformer blocks, found {len(found)}"
        )
    return [TransformerBlock(n, name, attn1, attn2) for n, (name, attn1, attn2) in enumerate(found, start=1)]


def heads_per_step(query: torch.Tensor, key: torch.Tensor, memory_fraction: float = 0.25) -> int:
    """How many heads `head_mean_attention` computes at once: 1 on CPU (cache friendly, least memory);
    on CUDA as many as fit, with their fp32 scores and softmax (3 maps per head counted), in
    `memory_fraction` of the free device memory."""
    if query.device.type != "cuda":
        return 1
    batch, heads, queries = query.shape[:3]
    per_head = 3 * batch * queries * key.shape[2] * 4
    free, _ = torch.cuda.mem_get_info(query.device)
    return max(1, min(heads, int(free * memory_fraction) // per_head))


def head_mean_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    attention_mask: torch.Tensor | None = None,
    *,
    probabilities: bool = True,
    logits: bool = False,
    heads_at_once: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Head means of softmax(Q K^T * scale) and of Q K^T * scale, in fp32.

    query (B, H, Q, d), key (B, H, K, d), attention_mask broadcastable to (B, H, Q, K), boolean
    (True = attend) or additive. Returns (probabilities (B, Q, K) or None, logits (B, Q, K) or None).
    `heads_at_once` heads per step (default `heads_per_step`): all heads' fp32 maps at once would be
    H x Q x K x 4 bytes per image. q is scaled before the matmul (d values per row, not K) and the
    sums accumulate in place; without grad the buffers are reused.
    """
    batch, heads, queries = query.shape[:3]
    step = heads_at_once or heads_per_step(query, key)
    # In place unless autograd tracks the sums (SLiMe trains through them).
    in_place = not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad))

    def accumulate(total: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return total.add_(value) if in_place else total + value

    # fp32 even inside an fp16/bf16 autocast region (SLiMe trains under autocast).
    with torch.autocast(query.device.type, enabled=False):
        scaled_query = query.float() * scale
        key_t = key.float().transpose(-1, -2)
        sums = {
            name: torch.zeros(batch, queries, key.shape[2], device=query.device)
            for name, wanted in (("probabilities", probabilities), ("logits", logits))
            if wanted
        }
        for first in range(0, heads, step):
            chunk = slice(first, first + step)
            scores = scaled_query[:, chunk] @ key_t[:, chunk]  # (B, h, Q, K)
            if logits:
                sums["logits"] = accumulate(sums["logits"], scores.sum(1))
            if probabilities:
                if attention_mask is not None:
                    mask = attention_mask[:, chunk] if attention_mask.shape[1] > 1 else attention_mask
                    if mask.dtype == torch.bool:
                        scores = scores.masked_fill(~mask, -math.inf)
                    else:
                        scores = accumulate(scores, mask.float())
                sums["probabilities"] = accumulate(sums["probabilities"], scores.softmax(dim=-1).sum(1))
    return (
        sums["probabilities"] / heads if probabilities else None,
        sums["logits"] / heads if logits else None,
    )


class AttentionStore:
    """Running sums of head-averaged attention maps, one fp32 buffer per (kind, grid).

    kind: "self", "cross" (probabilities) or "cross_logits" (pre-softmax). grid: the side of the
    square query grid, isqrt(number of queries). `rows` selects the batch rows to record, e.g.
    slice(1, 2) for the conditional half of a CFG batch [uncond, cond]. With keep_grad the sums
    stay in the autograd graph (SLiMe trains through them); otherwise they are detached.
    """

    def __init__(self, rows: slice = slice(None), keep_grad: bool = False):
        self.rows = rows
        self.keep_grad = keep_grad
        self._sums: dict[tuple[str, int], torch.Tensor] = {}
        self._counts: dict[tuple[str, int], int] = {}

    def add(self, kind: str, maps: torch.Tensor) -> None:
        """Add one layer's head-mean maps (B, Q, K), already restricted to `rows`."""
        if kind not in KINDS:
            raise ValueError(f"unknown attention kind {kind!r}; expected one of {KINDS}")
        grid = math.isqrt(maps.shape[1])
        if grid * grid != maps.shape[1]:
            raise ValueError(f"{maps.shape[1]} query tokens do not form a square grid")
        key = (kind, grid)
        if key not in self._sums:
            self._sums[key] = maps.float() if self.keep_grad else maps.detach().float().clone()
        elif self.keep_grad:
            self._sums[key] = self._sums[key] + maps  # out of place: autograd tracks the sum
        else:
            self._sums[key].add_(maps.detach())
        self._counts[key] = self._counts.get(key, 0) + 1

    def mean(self, kind: str, grid: int) -> torch.Tensor:
        """Mean over the recorded layers (and calls) of that kind and grid, (B, Q, K) fp32."""
        if (kind, grid) not in self._sums:
            raise KeyError(f"no {kind!r} attention recorded at grid {grid}; recorded: {sorted(self._sums)}")
        return self._sums[(kind, grid)] / self._counts[(kind, grid)]

    def grids(self, kind: str) -> list[int]:
        return sorted(grid for stored_kind, grid in self._sums if stored_kind == kind)

    def count(self, kind: str, grid: int) -> int:
        return self._counts.get((kind, grid), 0)

    def clear(self) -> None:
        self._sums.clear()
        self._counts.clear()


class CapturingAttnProcessor:
    """diffusers' AttnProcessor2_0, step for step, plus recording into an AttentionStore.

    probabilities_kind: store kind for softmax maps ("self", "cross" or None); logits_kind: store
    kind for pre-softmax maps ("cross_logits" or None).
    """

    def __init__(self, store: AttentionStore, *, probabilities_kind: str | None, logits_kind: str | None = None):
        self.store = store
        self.probabilities_kind = probabilities_kind
        self.logits_kind = logits_kind

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query, key, value = self._heads(attn, hidden_states, encoder_hidden_states, batch_size)
        head_dim = query.shape[-1]
        self._record(attn, query, key, attention_mask)

        # No explicit scale, as in the stock processor: SDPA's default 1/sqrt(head_dim) equals
        # attn.scale for SD, and passing it could change the last bit of the output.
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    @staticmethod
    def _heads(
        attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stock processor's query, key and value, each (B, heads, tokens, head_dim)."""
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        return query, key, value

    def _record(self, attn, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        rows = self.store.rows
        mask = None if attention_mask is None else attention_mask[rows]
        with torch.set_grad_enabled(self.store.keep_grad and torch.is_grad_enabled()):
            probabilities, logits = head_mean_attention(
                query[rows],
                key[rows],
                attn.scale,
                mask,
                probabilities=self.probabilities_kind is not None,
                logits=self.logits_kind is not None,
            )
        if probabilities is not None:
            self.store.add(self.probabilities_kind, probabilities)
        if logits is not None:
            self.store.add(self.logits_kind, logits)


@contextmanager
def capture_attention(
    unet: torch.nn.Module,
    store: AttentionStore,
    *,
    self_blocks: Iterable[int] = (),
    cross_blocks: Iterable[int] = (),
    cross_logit_blocks: Iterable[int] = (),
) -> Iterator[AttentionStore]:
    """Record attention of the given blocks (numbers 1..16, docs/methods.md 0.2) into `store`.

    self_blocks: attn1 probabilities as "self"; cross_blocks: attn2 probabilities as "cross";
    cross_logit_blocks: attn2 pre-softmax logits as "cross_logits". Only those layers get the
    capturing processor; their previous processors come back on exit, also after an exception.
    """
    blocks = transformer_blocks(unet)
    self_blocks, cross_blocks, cross_logit_blocks = set(self_blocks), set(cross_blocks), set(cross_logit_blocks)
    unknown = sorted(n for n in self_blocks | cross_blocks | cross_logit_blocks if not 1 <= n <= NUM_BLOCKS)
    if unknown:
        raise ValueError(f"block numbers must be in 1..{NUM_BLOCKS}, got {unknown}")

    processors = {}
    for block in blocks:
        if block.number in self_blocks:
            processors[block.self_attention] = CapturingAttnProcessor(store, probabilities_kind="self")
        if block.number in cross_blocks or block.number in cross_logit_blocks:
            processors[block.cross_attention] = CapturingAttnProcessor(
                store,
                probabilities_kind="cross" if block.number in cross_blocks else None,
                logits_kind="cross_logits" if block.number in cross_logit_blocks else None,
            )
    previous = {attention: attention.processor for attention in processors}
    try:
        for attention, processor in processors.items():
            attention.set_processor(processor)
        yield store
    finally:
        for attention, processor in previous.items():
            attention.set_processor(processor)
