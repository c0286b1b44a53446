"""The `id` path convertor: an id segment never takes the name of a sibling static route.

Routes match in order, and `/concepts/{concept_id}` would otherwise also match `/concepts/import`:
`GET /concepts/import` looked up a concept called "import" (404) and `OPTIONS /concepts/import`
answered `Allow: GET, POST, DELETE`. With `{concept_id:id}` those paths are only the static route's,
so any other method is a 405 with `Allow: POST`. The OpenAPI document shows `{concept_id}` as before.
"""

from __future__ import annotations

from starlette.convertors import Convertor, register_url_convertor

STATIC_SEGMENTS = ("import", "train")  # POST /concepts/import, /concepts/train, /oneshot/train


class IdConvertor(Convertor):
    regex = rf"(?!(?:{'|'.join(STATIC_SEGMENTS)})(?:/|$))[^/]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("id", IdConvertor())
