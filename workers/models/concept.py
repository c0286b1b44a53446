"""A concept: an identifier's learned tensors, its diffusers files, and whether it fits a model.

docs/methods.md 2.4.1 and 2.4.4. The vectors are input token embeddings of the identifier; `kv`, for
Custom Diffusion, the `to_k`/`to_v` weights of every cross-attention layer. They enter the resident
models through the hooks of `workers.models.concept_hooks`, for one call. Trained by
`workers.methods.concepts.train_concept`, or imported from the files diffusers' scripts write.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from attnseg.concept_files import (
    EMBEDDINGS_FILE,
    KV_FILE,
    KV_SUFFIXES,
    check_shapes,
    embedding_key,
    kv_layers,
)
from attnseg.tensor_files import MAX_TENSOR_BYTES, TensorFileError, declared_shapes
from workers.models.concept_hooks import cross_attention_layers
from workers.models.stable_diffusion import StableDiffusion

KV = dict[str, tuple[torch.Tensor, torch.Tensor]]  # attn2 path -> (to_k, to_v) weights (inner, D)


class ConceptMismatchError(ValueError):
    """A concept used with a Stable Diffusion model whose shapes it does not fit."""


@dataclass
class Concept:
    identifier: str  # written <identifier> in text
    class_word: str
    vectors: torch.Tensor  # (n, D) input token embeddings of the identifier, CPU
    kv: KV | None  # attn2 path -> (to_k, to_v) weights (inner, D), CPU; None: Textual Inversion
    sd_model: str | None = None  # the model it was trained on, when known
    metrics: dict = field(default_factory=dict)

    def files(self) -> dict[str, bytes]:
        """The diffusers files: the embedding, and the Custom Diffusion weights when there are any."""
        files = {EMBEDDINGS_FILE: save_safetensors({f"<{self.identifier}>": self.vectors.contiguous()})}
        if self.kv:
            tensors = {}
            for layer, (to_k, to_v) in self.kv.items():
                tensors[layer + KV_SUFFIXES["to_k"]] = to_k.contiguous()
                tensors[layer + KV_SUFFIXES["to_v"]] = to_v.contiguous()
            files[KV_FILE] = save_safetensors(tensors)
        return files

    @classmethod
    def from_files(
        cls,
        files: dict[str, bytes],
        identifier: str,
        class_word: str,
        *,
        sd_model: str | None = None,
        metrics: dict | None = None,
    ) -> Concept:
        """Inverse of `files`; also reads what the diffusers scripts write (`.bin` too, never unpickling
        anything but tensors). files: EMBEDDINGS_FILE -> bytes, optionally KV_FILE -> bytes."""
        embeddings = read_tensors(files[EMBEDDINGS_FILE])
        vectors = embeddings[embedding_key({k: list(v.shape) for k, v in embeddings.items()}, identifier)]
        kv = None
        if files.get(KV_FILE):
            tensors = read_tensors(files[KV_FILE])
            layers = kv_layers({name: list(t.shape) for name, t in tensors.items()})
            kv = {
                layer: (tensors[layer + KV_SUFFIXES["to_k"]], tensors[layer + KV_SUFFIXES["to_v"]]) for layer in layers
            }
        return cls(identifier, class_word, vectors.reshape(-1, vectors.shape[-1]), kv, sd_model, dict(metrics or {}))


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def read_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """name -> tensor from safetensors bytes or a torch `.bin` zip (weights_only: no code runs),
    checked before the data is read (attnseg.tensor_files; for a zip, the tensors the pickle
    declares, read on the meta device first) and after: floating point, finite. TensorFileError
    naming the defect otherwise.

    Nested dicts (`{"string_to_param": {"*": t}}`, Custom Diffusion's empty processor entries) are
    flattened to their tensors with dotted names."""
    if declared_shapes(data) is not None:
        tensors = dict(load_safetensors(data))
    else:
        check_declared(flat_tensors(load_torch(data, "meta")))
        tensors = flat_tensors(load_torch(data, "cpu"))
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise TensorFileError(f"tensor {name!r} holds NaN or infinite values")
    return tensors


def load_torch(data: bytes, device: str):
    """torch.load with weights_only (no code runs); on the meta device nothing but the pickle is read."""
    try:
        return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever torch raises, the file is not one it reads
        raise TensorFileError(f"not a torch tensor file: {type(exc).__name__}: {str(exc)[:200]}") from None


def check_declared(tensors: dict[str, torch.Tensor]) -> None:
    """The tensors a torch file declares (meta): floating point, and their data within the bound."""
    for name, tensor in tensors.items():
        if tensor.dtype not in FLOAT_DTYPES:
            raise TensorFileError(f"tensor {name!r} has dtype {tensor.dtype}; concepts are floating point")
    total = sum(tensor.untyped_storage().nbytes() for tensor in tensors.values())
    if total > MAX_TENSOR_BYTES:
        raise TensorFileError(f"the tensors declare {total} bytes; a concept file may hold at most {MAX_TENSOR_BYTES}")


def flat_tensors(loaded) -> dict[str, torch.Tensor]:
    """Dotted name -> tensor of every tensor in nested dicts; TensorFileError when there is none."""
    found: dict[str, torch.Tensor] = {}

    def walk(value, prefix: str) -> None:
        if isinstance(value, torch.Tensor):
            found[prefix or "tensor"] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{prefix}.{key}" if prefix else str(key))

    walk(loaded, "")
    if not found:
        raise TensorFileError("the file holds no tensors")
    return found


def concept_shapes(sd: StableDiffusion) -> dict:
    """What a concept must fit: {"text_width": D, "cross_attention": {attn2 path: [inner, D]}}."""
    return {
        "text_width": int(sd.text_encoder.get_input_embeddings().weight.shape[1]),
        "cross_attention": {
            name: list(layer.to_k.weight.shape) for name, layer in cross_attention_layers(sd.unet).items()
        },
    }


def check_concept(sd: StableDiffusion, concept: Concept) -> None:
    """ConceptMismatchError naming the mismatch unless the concept fits this SD model's shapes."""
    kv = None
    if concept.kv:
        kv = {layer: {"to_k": list(k.shape), "to_v": list(v.shape)} for layer, (k, v) in concept.kv.items()}
    try:
        check_shapes(list(concept.vectors.shape), kv, concept_shapes(sd), sd.model_id)
    except ValueError as exc:
        raise ConceptMismatchError(f"concept <{concept.identifier}>: {exc}") from None
