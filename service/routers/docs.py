"""`/docs`: Swagger UI from the files the `swagger-ui-bundle-v2` package ships (Swagger UI 5, which
reads OpenAPI 3.1), under the playground's Content-Security-Policy: no CDN, it works offline, and
nothing is loaded from elsewhere.

`/docs` is our page (service/docs_ui: the HTML and the script that starts Swagger UI on
`/openapi.json`), `/docs/assets/*` are Swagger UI's own files (Apache-2.0, as packaged).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from swagger_ui_bundle import swagger_ui_path

from service.routers.ui import PlaygroundFiles

DOCS_DIR = Path(__file__).resolve().parent.parent / "docs_ui"


def mount_docs(app: FastAPI) -> None:
    """Call with the app's own docs turned off (`docs_url=None`): assets first, as /docs would match them too."""
    app.mount("/docs/assets", PlaygroundFiles(directory=str(swagger_ui_path)), name="docs-assets")
    app.mount("/docs", PlaygroundFiles(directory=DOCS_DIR, html=True), name="docs")
