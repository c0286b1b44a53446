"""Keys in URLs (issue 16 item 9): refused with 401 and never written to the access log."""

from __future__ import annotations

import logging

import httpx
import pytest

from service.url_secrets import ACCESS_LOGGER, ScrubUrlSecrets, scrubbed, secret_names
from tests.support import Stack, wait_until_ok


@pytest.mark.parametrize(
    "query",
    ["api_key=s3cr3t", "apiKey=s3cr3t", "token=s3cr3t", "access_token=s3cr3t", "key=s3cr3t", "api%5Fkey=s3cr3t"],
)
def test_a_key_looking_query_parameter_is_refused_before_any_route(make_client, redis_server, query):
    for client in (make_client(), make_client(api_key="s3cr3t")):
        response = client.get(f"/concepts?{query}")
        assert response.status_code == 401, response.text
        error = response.json()["error"]
        assert error["code"] == "key_in_url" and "rotate" in error["message"] and "s3cr3t" not in response.text
        assert response.headers["x-content-type-options"] == "nosniff"  # still inside the edge headers
        assert client.post(f"/segment/unsupervised?{query}").status_code == 401
    assert make_client().get("/concepts?limit=5").status_code == 200  # other parameters are untouched


def test_scrubbing_keeps_everything_but_the_values():
    assert secret_names("limit=5&API_KEY=x&wait=1") == ["API_KEY"]
    assert scrubbed("/concepts?limit=5&api_key=abc&token=d%20e#x") == "/concepts?limit=5&api_key=***&token=***#x"
    assert scrubbed('127.0.0.1:5 - "GET /jobs/1?wait=3&%6bey=abc HTTP/1.1" 401') == (
        '127.0.0.1:5 - "GET /jobs/1?wait=3&%6bey=*** HTTP/1.1" 401'
    )
    record = logging.LogRecord(
        ACCESS_LOGGER, logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d', ("c", "GET", "/x?apikey=abc", "1.1", 401), None
    )
    assert ScrubUrlSecrets().filter(record) and record.getMessage() == 'c - "GET /x?apikey=*** HTTP/1.1" 401'


def test_uvicorns_access_log_never_shows_the_key(tmp_path):
    """The real server (`attnseg api`), its access log captured from its output."""
    stack = Stack(tmp_path, ATTNSEG_API_KEY="the-real-key")
    stack.redis.start()
    stack.start_api()
    try:
        wait_until_ok(f"{stack.base_url}/healthz", timeout=60, message="the API")
        for query in ("api_key=the-real-key", "limit=2&access_token=the-real-key"):
            assert httpx.get(f"{stack.base_url}/concepts?{query}").status_code == 401
        assert httpx.get(f"{stack.base_url}/concepts?limit=3").status_code == 401  # no header either
    finally:
        stack.stop()
    log = (tmp_path / "api.log").read_text()
    assert "GET /concepts?api_key=*** HTTP/1.1" in log and "GET /concepts?limit=2&access_token=*** HTTP" in log, log
    assert "GET /concepts?limit=3 HTTP/1.1" in log
    assert "the-real-key" not in log
