"""Reading a job submission: multipart form (files + fields) or JSON (base64 images + fields)."""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from service.errors import ApiError, validation_message


@dataclass
class Submission:
    files: dict[str, list[tuple[str, bytes]]] = field(default_factory=dict)  # field -> [(filename, bytes)]
    fields: dict[str, Any] = field(default_factory=dict)

    def one_file(self, name: str) -> bytes:
        files = self.files.get(name) or []
        if len(files) != 1:
            found = "none" if not files else f"{len(files)}"
            raise ApiError(422, "invalid_field", f"exactly one '{name}' is required, got {found}", field=name)
        return files[0][1]


MAX_JSON_DEPTH = 32  # the deepest real body is 3 (object > list > string)
MAX_INT_DIGITS = 20  # seeds and counts fit comfortably; 5,000-digit integers do not get parsed


def json_types(schema: dict) -> set[str]:
    """JSON types a property's schema admits (through anyOf/oneOf, enum and const values)."""
    types: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        declared = node.get("type")
        types.update(declared if isinstance(declared, list) else [declared] if declared else [])
        for value in [*node.get("enum", []), *([node["const"]] if "const" in node else [])]:
            types.add("string" if isinstance(value, str) else "number")
        stack += node.get("anyOf", []) + node.get("oneOf", [])
    return types


@lru_cache
def form_field_kinds(model: type[BaseModel]) -> tuple[frozenset[str], frozenset[str]]:
    """(list fields, scalar fields that take no string): how a form value of each field is read."""
    properties = model.model_json_schema()["properties"]
    lists = {name for name, schema in properties.items() if "array" in json_types(schema)}
    typed = {name for name, schema in properties.items() if name not in lists and "string" not in json_types(schema)}
    return frozenset(lists), frozenset(typed)


def parse_form_value(name: str, values: list[str], model: type[BaseModel]) -> Any:
    """Form strings -> the value JSON would carry, so both encodings accept the same fields and types.

    Lists: repeated fields, or one JSON array. Numbers and booleans: their JSON spelling ("2", "0.8",
    "true"); anything else is left as text for the model to refuse with its own message.
    """
    lists, typed = form_field_kinds(model)
    if name in lists:
        if len(values) == 1 and values[0].lstrip().startswith("["):
            try:
                parsed = parse_json_limited(values[0].encode())
            except ApiError as exc:
                raise ApiError(
                    422,
                    "invalid_field",
                    f"{name}: starts with '[' but is not a valid JSON array "
                    f'({exc.message}); send ["a", "b"] or repeat the field',
                    field=name,
                ) from None
            if not isinstance(parsed, list):
                raise ApiError(422, "invalid_field", f"{name}: a JSON array was expected", field=name)
            return parsed
        return values
    if len(values) != 1:
        raise ApiError(422, "invalid_field", f"{name}: given {len(values)} times, expected once", field=name)
    if name in typed:
        try:
            parsed = parse_json_limited(values[0].encode())
        except ApiError:
            return values[0]
        if isinstance(parsed, (bool, int, float)):
            return parsed
    return values[0]


class JsonLimitError(ValueError):
    pass


def reject_long_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JsonLimitError(f"an integer of {len(text.lstrip('-'))} digits exceeds the limit of {MAX_INT_DIGITS}")
    return int(text)


def reject_non_finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonLimitError(f"the number {text[:20]} is out of range (finite numbers only)")
    return value


def reject_constant(name: str) -> float:
    raise JsonLimitError(f"{name} is not a number JSON allows")


def depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, level + 1)
            stack += [(child, level + 1) for child in (node.values() if isinstance(node, dict) else node)]
    return deepest


def parse_json_limited(raw: bytes) -> Any:
    """JSON with its limits named in the 400: depth, integer digits, finite numbers."""
    try:
        value = json.loads(
            raw, parse_int=reject_long_int, parse_float=reject_non_finite, parse_constant=reject_constant
        )
    except RecursionError:
        value = None
        too_deep = True
    except JsonLimitError as exc:
        raise ApiError(400, "invalid_json", f"the JSON body is refused: {exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    else:
        too_deep = depth(value) > MAX_JSON_DEPTH
    if too_deep:
        raise ApiError(400, "invalid_json", f"the JSON body is nested deeper than the limit of {MAX_JSON_DEPTH} levels")
    return value


async def read_submission(request: Request, model: type[BaseModel], file_fields: tuple[str, ...]) -> Submission:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    submission = Submission()
    if content_type == "multipart/form-data":
        form = await request.form(max_files=64, max_fields=256)
        raw: dict[str, list[str]] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key not in file_fields:
                    raise ApiError(422, "invalid_field", f"unexpected file field '{key}'", field=key)
                submission.files.setdefault(key, []).append((value.filename or "", await value.read()))
            elif key in file_fields:
                raise ApiError(422, "invalid_field", f"'{key}' must be a file part", field=key)
            else:
                raw.setdefault(key, []).append(value)
        submission.fields = {key: parse_form_value(key, values, model) for key, values in raw.items()}
    elif content_type == "application/json":
        body = parse_json_limited(await request.body())
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_json", "the JSON body must be an object")
        for name in file_fields:
            key = f"{name}_base64"
            if key in body:
                values = body.pop(key)
                values = values if isinstance(values, list) else [values]
                submission.files[name] = [("", decode_base64(v, key)) for v in values]  # no file names in JSON
        submission.fields = body
    else:
        raise ApiError(
            415, "unsupported_media_type", "send multipart/form-data (file parts) or application/json (base64 images)"
        )
    return submission


def part_name(field: str, index: int, filename: str) -> str:
    """How errors name the `index`-th file of `field`: `masks[0] (car.png)`, or `masks[0]` when it came
    without a file name (JSON's `masks_base64`: the user gave pictures, not names)."""
    return f"{field}[{index}] ({filename})" if filename else f"{field}[{index}]"


def decode_base64(value: Any, field_name: str) -> bytes:
    if not isinstance(value, str):
        raise ApiError(422, "invalid_field", f"{field_name} must be a base64 string", field=field_name)
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]  # data URL
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_field", f"{field_name} is not valid base64", field=field_name) from None


def validate_params(model: type[BaseModel], fields: dict[str, Any]) -> BaseModel:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        name, message = validation_message(list(exc.errors()))
        raise ApiError(422, "invalid_field", message, field=name) from None


def openapi_body(
    model: type[BaseModel], file_fields: dict[str, bool], optional: tuple[str, ...] = (), by_id: str | None = None
) -> dict:
    """OpenAPI requestBody for both encodings; `file_fields` maps a file field to "many allowed",
    the file fields in `optional` may be left out, and the one named `by_id` may be replaced by
    `<name>_id`, naming a picture stored earlier (exactly one of the two: see service.pictures)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    properties = dict(schema.get("properties", {}))
    if by_id is not None:
        properties[f"{by_id}_id"] = {
            "type": "string",
            "description": f"Instead of `{by_id}`: the `image.id` of an earlier result, to reuse that picture.",
        }
    required = schema.get("required", [])
    files = [name for name in file_fields if name not in optional and name != by_id]
    multipart = {"type": "object", "properties": dict(properties), "required": [*files, *required]}
    as_json = {
        "type": "object",
        "properties": dict(properties),
        "required": [*(f"{name}_base64" for name in files), *required],
    }
    if by_id is not None:
        multipart["oneOf"] = [{"required": [by_id]}, {"required": [f"{by_id}_id"]}]
        as_json["oneOf"] = [{"required": [f"{by_id}_base64"]}, {"required": [f"{by_id}_id"]}]
    for name, many in file_fields.items():
        binary = {"type": "string", "format": "binary"}
        b64 = {"type": "string", "contentEncoding": "base64", "description": "Image bytes, base64 (or a data URL)."}
        multipart["properties"][name] = {"type": "array", "items": binary} if many else binary
        as_json["properties"][f"{name}_base64"] = {"type": "array", "items": b64} if many else b64
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": multipart},
                "application/json": {"schema": as_json},
            },
        }
    }
