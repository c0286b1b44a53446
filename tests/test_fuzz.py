"""A bounded Schemathesis run over the OpenAPI against the real app and a private Redis: no 5xx, and
every answer (status, content type, body) is one the contract declares.

Bounded for the suite (few examples per operation, derandomized); the longer run of the issue is
`ATTNSEG_FUZZ_EXAMPLES=100 python -m pytest -q -s tests/test_fuzz.py` (it prints the case count).
"""

import collections
import itertools
import os

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support import image_bytes

EXAMPLES = int(os.environ.get("ATTNSEG_FUZZ_EXAMPLES", "8"))
KEY = "fuzz-key"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_every_answer_is_clean_and_declared(make_client):
    client = make_client(api_key=KEY, max_queued_jobs=1000)
    # One real job, so job routes meet an existing id too.
    client.post(
        "/segment/unsupervised",
        files={"image": ("x.png", image_bytes(32, 32), "image/png")},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 13
    cases: collections.Counter = collections.Counter()  # per generation mode, reported at the end

    for operation, mode in itertools.product(operations, GenerationMode):  # valid and invalid requests
        # /readyz answers 503 by design here (no worker); it is still held to its declared answers.
        checks = CHECKS[1:] if operation.path == "/readyz" else CHECKS

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def answers_cleanly(case):  # run at once below, while `checks` is this iteration's
            cases[mode.value] += 1  # noqa: B023
            case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=checks)  # noqa: B023

        try:
            answers_cleanly()
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE  # an operation without inputs has no invalid request
    # The figure of the run (`pytest -s` shows it): every case answered without a 5xx, as declared.
    print(f"\nschemathesis: {dict(cases)} cases over {len(operations)} operations, {EXAMPLES} examples each")
    assert cases[GenerationMode.POSITIVE.value] >= len(operations)
