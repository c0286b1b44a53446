"""`/docs` (issue 16 item 10): Swagger UI from packaged files under the playground's CSP, offline."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from service.routers.ui import HEADERS
from tests.support import Stack, wait_until_ok


def test_docs_are_served_from_the_package_under_the_playgrounds_policy(client):
    page = client.get("/docs/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == HEADERS["Content-Security-Policy"]
    assert not re.search(r"https?://", page.text)  # nothing from elsewhere
    assert "<script>" not in page.text  # no inline script (the policy would block it)
    for source in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        asset = client.get(source)
        assert asset.status_code == 200, source
        assert asset.headers["content-security-policy"] == HEADERS["Content-Security-Policy"], source
    assert client.get("/docs").status_code == 200  # redirected to /docs/
    assert client.get("/redoc").status_code == 404  # FastAPI's CDN page is gone


@pytest.mark.slow
def test_swagger_ui_renders_offline_in_a_browser(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    executable = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(executable).exists(), "chromium is not installed (.ci/run installs it from Debian)"
    stack = Stack(tmp_path)
    stack.redis.start()
    stack.start_api()
    try:
        wait_until_ok(f"{stack.base_url}/healthz", timeout=60, message="the API")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            context = browser.new_context(base_url=stack.base_url)
            outside: list[str] = []

            def only_local(route):  # offline: anything not from the API itself fails
                if route.request.url.startswith(stack.base_url):
                    return route.continue_()
                outside.append(route.request.url)
                return route.abort()

            context.route("**/*", only_local)
            page = context.new_page()
            problems: list[str] = []
            page.on("console", lambda m: m.type == "error" and problems.append(m.text))
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto("/docs/")
            expect(page.locator("#swagger-ui .info .title")).to_contain_text("attnseg", timeout=30_000)
            expect(page.locator("#swagger-ui .opblock-summary-path", has_text="/concepts/import")).to_have_count(1)
            browser.close()
    finally:
        stack.stop()
    assert not outside and not problems, (outside, problems)
