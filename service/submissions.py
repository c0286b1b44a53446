"""Reading a job submission: multipart form (files + fields) or JSON (base64 images + fields)."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
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


def list_fields(model: type[BaseModel]) -> set[str]:
    return {name for name, info in model.model_fields.items() if "list[" in repr(info.annotation)}


def parse_form_value(values: list[str], is_list: bool) -> Any:
    if is_list:
        if len(values) == 1 and values[0].lstrip().startswith("["):
            try:
                return json.loads(values[0])
            except json.JSONDecodeError:
                pass
        return values
    return values[0] if len(values) == 1 else values


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
                submission.files.setdefault(key, []).append((value.filename or key, await value.read()))
            elif key in file_fields:
                raise ApiError(422, "invalid_field", f"'{key}' must be a file part", field=key)
            else:
                raw.setdefault(key, []).append(value)
        lists = list_fields(model)
        submission.fields = {key: parse_form_value(values, key in lists) for key, values in raw.items()}
    elif content_type == "application/json":
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_json", "the JSON body must be an object")
        for name in file_fields:
            key = f"{name}_base64"
            if key in body:
                values = body.pop(key)
                values = values if isinstance(values, list) else [values]
                submission.files[name] = [(f"{key}[{i}]", decode_base64(v, key)) for i, v in enumerate(values)]
        submission.fields = body
    else:
        raise ApiError(415, "unsupported_media_type",
                       "send multipart/form-data (file parts) or application/json (base64 images)")
    return submission


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


def openapi_body(model: type[BaseModel], file_fields: dict[str, bool]) -> dict:
    """OpenAPI requestBody for both encodings; `file_fields` maps a file field to "many allowed"."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    properties = dict(schema.get("properties", {}))
    multipart = {"type": "object", "properties": dict(properties), "required": list(file_fields)}
    as_json = {"type": "object", "properties": dict(properties),
               "required": [f"{name}_base64" for name in file_fields]}
    for name, many in file_fields.items():
        binary = {"type": "string", "format": "binary"}
        b64 = {"type": "string", "contentEncoding": "base64", "description": "Image bytes, base64 (or a data URL)."}
        multipart["properties"][name] = {"type": "array", "items": binary} if many else binary
        as_json["properties"][f"{name}_base64"] = {"type": "array", "items": b64} if many else b64
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": multipart},
        "application/json": {"schema": as_json},
    }}}
