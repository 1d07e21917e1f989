"""The published OpenAPI schema, fuzzed with schemathesis against the running application: no
5xx, every error OpenAI-shaped. Bounded: a fixed number of generated cases per operation."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow
EXAMPLES = 25


def test_fuzzed_requests_never_5xx_and_errors_are_openai_shaped(app_url):
    hypothesis = pytest.importorskip("hypothesis")
    schemathesis = pytest.importorskip("schemathesis")

    schema = schemathesis.openapi.from_url(f"{app_url}/openapi.json")
    seen: list[tuple[str, int]] = []
    for result in schema.get_all_operations():
        op = result.ok()

        @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(case=op.as_strategy())
        def check(case):
            response = case.call(base_url=app_url, timeout=60)
            seen.append((case.operation.label, response.status_code))
            assert response.status_code < 500, (case.operation.label, case.body, response.text[:300])
            if response.status_code >= 400:
                err = response.json()["error"]
                assert set(err) == {"message", "type", "param", "code"}, response.text
                assert err["message"]

        check()
    labels = {label for label, _ in seen}
    assert any("chat/completions" in lab for lab in labels)
    assert any("/v1/completions" in lab for lab in labels)
    assert len(seen) >= 3 * 10
