"""Uploaded tensor files checked from their headers, before any tensor data is read or inflated.

Two formats come in (no torch here: the API runs these checks too):

- safetensors: an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
  shape and byte range, then the data. The header is checked whole: its length, its structure,
  each shape a list of non-negative integers, floating point dtypes only, and byte ranges that
  tile the data exactly (as the format requires) with the sizes the shapes and dtypes give.
- a torch `.bin` (`torch.save`, a zip archive: `<folder>/data.pkl` plus one member per storage):
  each member's uncompressed size, as the archive's directory declares it, is checked against
  MAX_TENSOR_BYTES before anything is inflated (a 1 MB DEFLATE member of zeros would otherwise
  inflate to 1 GB). The storage sizes the pickle declares are checked by the worker (it needs torch).

Legacy torch files (a bare pickle, before torch 1.6) are refused: they allocate each storage at the
size the pickle declares before reading it.
"""

from __future__ import annotations

import io
import json
import math
import struct
import zipfile

MiB = 1024 * 1024
# The most tensor data one concept file may hold (uncompressed). SD 1.x Custom Diffusion weights
# (to_k and to_v of 16 cross-attention layers) are 73 MiB in float32, 146 MiB in float64.
MAX_TENSOR_BYTES = 160 * MiB
MAX_HEADER_BYTES = 1 * MiB  # a safetensors header or a torch pickle (a concept's is a few KiB)
MAX_MEMBERS = 1024  # members of a torch zip (one per tensor, plus a handful)
MAX_DIMS = 8
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}  # safetensors dtype -> bytes per value
ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC = b"\x80\x02\x8a\x0a"  # a pickle (protocol 2) of torch's magic number: a legacy torch file


class TensorFileError(ValueError):
    """An uploaded tensor file that is malformed or too large: the message says what is wrong."""


def is_torch_zip(data: bytes) -> bool:
    return data[:4] == ZIP_MAGIC


def safetensors_shapes(data: bytes) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file, after checking its whole header against the
    data (TensorFileError naming the first defect). The data itself is not read."""
    if len(data) < 8:
        raise TensorFileError(f"the file is {len(data)} bytes long: too short for a safetensors header")
    (length,) = struct.unpack("<Q", data[:8])
    if not 2 <= length <= min(MAX_HEADER_BYTES, len(data) - 8):
        raise TensorFileError(
            f"the safetensors header length is {length}; it must be at least 2 and fit in the file "
            f"({len(data) - 8} bytes after it) and in {MAX_HEADER_BYTES} bytes"
        )
    header = parse_header(data[8 : 8 + length])
    shapes, ranges = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            check_metadata(entry)
            continue
        shape, begin, end = checked_entry(name, entry)
        shapes[name] = shape
        ranges.append((begin, end, name))
    check_tiling(sorted(ranges), len(data) - 8 - length)
    if not shapes:
        raise TensorFileError("the safetensors file holds no tensors")
    return shapes


def parse_header(raw: bytes) -> dict:
    """The header's JSON object; TensorFileError when it is not one."""
    try:
        header = json.loads(raw)
    except RecursionError:  # bounded by MAX_HEADER_BYTES; a valid header nests 3 levels
        raise TensorFileError("the safetensors header is nested too deep to be a header") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorFileError(f"the safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"the safetensors header must be a JSON object, not {type(header).__name__}")
    return header


def check_metadata(entry) -> None:
    if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
        raise TensorFileError("the safetensors __metadata__ must be an object of strings")


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def checked_entry(name: str, entry) -> tuple[list[int], int, int]:
    """A header entry's shape and byte range [begin, end), checked: floating point dtype, a shape of
    non-negative integers, and a range exactly as long as the shape's values."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise TensorFileError(f"tensor {name!r}: an entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in FLOAT_DTYPES:
        raise TensorFileError(
            f"tensor {name!r} has dtype {str(dtype)[:20]!r}; concepts are floating point ({', '.join(FLOAT_DTYPES)})"
        )
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(is_count(n) for n in shape):
        raise TensorFileError(
            f"tensor {name!r}: shape must be a list of at most {MAX_DIMS} non-negative integers, "
            f"got {json.dumps(shape)[:40]}"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(n) for n in offsets)):
        raise TensorFileError(f"tensor {name!r}: data_offsets must be two non-negative integers [begin, end]")
    begin, end = offsets
    size = math.prod(shape) * FLOAT_DTYPES[dtype]
    if end - begin != size:
        raise TensorFileError(
            f"tensor {name!r}: data_offsets {offsets} span {end - begin} bytes but shape {shape} of {dtype} "
            f"needs {size}"
        )
    return shape, begin, end


def check_tiling(ranges: list[tuple[int, int, str]], data_length: int) -> None:
    """The byte ranges (sorted) must cover the data exactly once, in order, with nothing after."""
    position = 0
    for begin, end, name in ranges:
        if begin != position:
            raise TensorFileError(f"tensor {name!r} starts at byte {begin} of the data, expected {position}")
        position = end
    if position != data_length:
        raise TensorFileError(f"the tensors cover {position} bytes but the data after the header is {data_length}")


def torch_zip_members(data: bytes, max_bytes: int = MAX_TENSOR_BYTES) -> dict[str, int]:
    """Member name -> uncompressed size of a `torch.save` zip, from the archive's directory alone:
    TensorFileError unless it is a readable zip with one `data.pkl` of at most MAX_HEADER_BYTES and
    at most max_bytes uncompressed in all. Nothing is inflated."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise TensorFileError(f"the torch file is not a readable zip archive: {exc}") from None
    if len(infos) > MAX_MEMBERS:
        raise TensorFileError(f"the torch file has {len(infos)} members; at most {MAX_MEMBERS} are read")
    sizes = {info.filename: info.file_size for info in infos}
    pickles = [name for name in sizes if name.rsplit("/", 1)[-1] == "data.pkl"]
    if len(pickles) != 1:
        raise TensorFileError(f"a torch file has one data.pkl; this one has {len(pickles)}")
    if sizes[pickles[0]] > MAX_HEADER_BYTES:
        raise TensorFileError(
            f"the torch file's data.pkl is {sizes[pickles[0]]} bytes uncompressed; at most {MAX_HEADER_BYTES}"
        )
    total = sum(sizes.values())
    if total > max_bytes:
        raise TensorFileError(
            f"the torch file's members add up to {total} bytes uncompressed; a concept file may hold at most "
            f"{max_bytes} ({max_bytes // MiB} MiB)"
        )
    return sizes


def declared_shapes(data: bytes) -> dict[str, list[int]] | None:
    """What the API can learn of an uploaded tensor file without torch: the tensor shapes of a
    safetensors file, or None for a torch zip whose members passed their checks (its shapes are in
    the pickle, which the worker reads). TensorFileError for anything else."""
    if is_torch_zip(data):
        torch_zip_members(data)
        return None
    if data[:4] == LEGACY_MAGIC:
        raise TensorFileError("legacy torch files (a bare pickle) are not read: save with torch.save (a zip)")
    return safetensors_shapes(data)
