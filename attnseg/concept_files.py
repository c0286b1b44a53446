"""Concept files in the formats the diffusers training scripts write, and their shape checks.

No torch here: the API checks uploads with it before queueing, the worker after loading tensors.

- Textual Inversion (`textual_inversion.py`): `learned_embeds.safetensors` (or `.bin`) =
  {"<token>": (n, D) or (D,)}; Custom Diffusion writes the same per modifier token (`<new1>.bin`).
- Custom Diffusion (`train_custom_diffusion.py`, `unet.save_attn_procs`):
  `pytorch_custom_diffusion_weights.bin` (or `.safetensors`) = {"<attn2 path>.processor.
  to_k_custom_diffusion.weight": (inner, D), "... .to_v_custom_diffusion.weight": (inner, D)} for the
  cross-attention layers (self-attention processors appear as empty entries in the `.bin`).
"""

from __future__ import annotations

import re

EMBEDDINGS_FILE = "learned_embeds.safetensors"
KV_FILE = "pytorch_custom_diffusion_weights.safetensors"
KV_SUFFIXES = {"to_k": ".processor.to_k_custom_diffusion.weight", "to_v": ".processor.to_v_custom_diffusion.weight"}
UNSUPPORTED_KV = ("to_q_custom_diffusion", "to_out_custom_diffusion")
MAX_VECTORS = 16
IDENTIFIER = re.compile(r"<([A-Za-z0-9-]+)>")  # a concept's identifier as written in text


def identifiers_in(text: str) -> list[str]:
    """The concept identifiers written `<identifier>` in text, in order."""
    return IDENTIFIER.findall(text)


class ConceptFileError(ValueError):
    """A concept file that cannot be used: the message says what is wrong and what fits."""


def embedding_key(shapes: dict[str, list[int]], identifier: str) -> str:
    """The entry of an embeddings file that holds the concept's vectors: the only one, or the one
    named `<identifier>` (or `identifier`) when there are several."""
    if len(shapes) == 1:
        return next(iter(shapes))
    for key in (f"<{identifier}>", identifier):
        if key in shapes:
            return key
    raise ConceptFileError(
        f"the embeddings file holds {len(shapes)} entries {sorted(shapes)[:5]}; name the "
        f"concept's entry '<{identifier}>' or upload a file with one entry"
    )


def kv_layers(shapes: dict[str, list[int]]) -> dict[str, dict[str, list[int]]]:
    """Custom Diffusion entries grouped by layer: attn2 path -> {"to_k": shape, "to_v": shape}."""
    unsupported = sorted(name for name in shapes if any(part in name for part in UNSUPPORTED_KV))
    if unsupported:
        raise ConceptFileError(
            f"the weights file has query/output weights ({unsupported[0]}, ...): concepts trained "
            "with --train_q_out or --freeze_model crossattn are not supported; train with the "
            "default crossattn_kv"
        )
    layers: dict[str, dict[str, list[int]]] = {}
    for name, shape in shapes.items():
        for projection, suffix in KV_SUFFIXES.items():
            if name.endswith(suffix):
                layers.setdefault(name[: -len(suffix)], {})[projection] = shape
    if not layers:
        raise ConceptFileError(
            "the weights file has no '*.processor.to_k_custom_diffusion.weight' entries: it is "
            "not a Custom Diffusion weights file"
        )
    incomplete = sorted(layer for layer, found in layers.items() if set(found) != set(KV_SUFFIXES))
    if incomplete:
        raise ConceptFileError(f"layer {incomplete[0]} has only one of to_k/to_v custom diffusion weights")
    return layers


def check_embedding_shape(shape: list[int], expected: dict, model: str) -> None:
    """ConceptFileError unless an embedding of `shape` ((n, D) or (D,)) fits the text width in
    `expected` ({"text_width": D, "cross_attention": {attn2 path: [inner, D]}}, as the worker
    announces it in `concept_shapes`)."""
    width = expected["text_width"]
    if len(shape) not in (1, 2) or (len(shape) == 2 and not 1 <= shape[0] <= MAX_VECTORS):
        raise ConceptFileError(
            f"the embedding has shape {shape}; expected (D,) or (n, D) with 1 <= n <= {MAX_VECTORS} vectors"
        )
    if shape[-1] != width:
        raise ConceptFileError(
            f"the embedding is {shape[-1]} wide but the text encoder of {model} is {width} wide: "
            "the concept was trained for another Stable Diffusion model (SD 1.x text is 768 wide, "
            "SD 2.x 1024)"
        )


def check_kv_shapes(kv: dict[str, dict[str, list[int]]], expected: dict, model: str) -> None:
    """ConceptFileError unless every layer of `kv` (as `kv_layers`) is a cross-attention layer of the
    model with the same projection shapes."""
    for layer, projections in kv.items():
        target = expected["cross_attention"].get(layer)
        if target is None:
            raise ConceptFileError(
                f"the weights file names layer {layer!r}, which {model} does not have as a cross-attention layer"
            )
        for projection, shape in projections.items():
            if list(shape) != list(target):
                raise ConceptFileError(
                    f"{layer} {projection} has shape {list(shape)} but {model} needs "
                    f"{list(target)}: the weights were trained for another Stable Diffusion model"
                )


def check_shapes(
    embedding_shape: list[int], kv: dict[str, dict[str, list[int]]] | None, expected: dict, model: str
) -> None:
    """Both checks: the embedding, then the attention weights when there are any."""
    check_embedding_shape(embedding_shape, expected, model)
    check_kv_shapes(kv or {}, expected, model)
