"""Applying a concept to the resident models for one call, without changing their weights.

Two hook points (docs/methods.md 2.4):
- text: a forward hook on the text encoder's token-embedding layer replaces the input embeddings at
  given positions (the identifier's placeholder tokens) by the concept's vectors; nothing is added to
  the vocabulary and the embedding matrix is never written.
- UNet: diffusers attention processors on the cross-attention layers (attn2) compute the keys and
  values with the concept's `to_k`/`to_v` weights (Custom Diffusion). Each wraps the processor that
  was there (stock or capturing), so enter `concept_attention` inside `capture_attention`.
Both restore what was there on exit, also after an exception.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from workers.models.attention import transformer_blocks


def cross_attention_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The 16 cross-attention modules by their module path ("down_blocks.0.attentions.0.
    transformer_blocks.0.attn2"), the names diffusers' Custom Diffusion files use."""
    return {f"{block.name}.transformer_blocks.0.attn2": block.cross_attention for block in transformer_blocks(unet)}


class _Projections:
    """An Attention module seen through other key/value projections; everything else is the module's."""

    def __init__(self, attn: torch.nn.Module, to_k, to_v):
        self._attn = attn
        self.to_k = to_k
        self.to_v = to_v

    def __getattr__(self, name):
        return getattr(self._attn, name)


class ConceptAttnProcessor:
    """Runs the wrapped processor with keys and values from the concept's weights.

    to_k, to_v: (inner, text width) weights, no bias (as attn2's own projections in SD). They are
    cast to the activations' dtype, so fp32 master weights train through an fp16 UNet under autocast.
    """

    def __init__(self, inner, to_k: torch.Tensor, to_v: torch.Tensor):
        self.inner = inner
        self.to_k = to_k
        self.to_v = to_v

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        def project(weight):
            return lambda states: F.linear(states, weight.to(states.dtype))

        view = _Projections(attn, project(self.to_k), project(self.to_v))
        return self.inner(view, hidden_states, encoder_hidden_states, *args, **kwargs)


@contextmanager
def concept_attention(unet: torch.nn.Module, kv: dict[str, tuple[torch.Tensor, torch.Tensor]] | None) -> Iterator[None]:
    """Within the block, the cross-attention layers named in `kv` use its (to_k, to_v) weights.

    kv: layer name (as `cross_attention_layers`) -> (to_k weight, to_v weight); None or {}: nothing
    changes. Raises KeyError for a layer the UNet does not have.
    """
    if not kv:
        yield
        return
    layers = cross_attention_layers(unet)
    unknown = sorted(set(kv) - set(layers))
    if unknown:
        raise KeyError(f"the UNet has no cross-attention layers {unknown[:3]}")
    previous = {name: layers[name].processor for name in kv}
    try:
        for name, (to_k, to_v) in kv.items():
            layers[name].set_processor(ConceptAttnProcessor(previous[name], to_k.to(unet.device), to_v.to(unet.device)))
        yield
    finally:
        for name, processor in previous.items():
            layers[name].set_processor(processor)


@contextmanager
def token_embeddings(
    text_encoder: torch.nn.Module, positions: torch.Tensor | None, values: torch.Tensor | None
) -> Iterator[None]:
    """Within the block, the text encoder's input embeddings at `positions` are `values`.

    positions: (B, T) bool, True where a concept's vector goes; values: (B, T, D) (only the rows at
    `positions` are read), in the graph when the vectors are trained. None: nothing changes.
    """
    if positions is None or not bool(positions.any()):
        yield
        return
    layer = text_encoder.get_input_embeddings()

    def replace(module, inputs, output):
        mask = positions.to(output.device)[..., None]
        return torch.where(mask, values.to(device=output.device, dtype=output.dtype), output)

    handle = layer.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()
