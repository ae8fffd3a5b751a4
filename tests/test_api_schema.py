"""schemathesis against the app's own OpenAPI schema: whatever it generates, no 5xx.

Driven through schemathesis' Python API (its pytest plugin does not load under pytest 9).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.conftest import PASSKEY, RunningApp, app_settings


def test_no_server_errors_for_generated_requests(run_app: Callable[..., RunningApp], database_url: str) -> None:
    """Requests generated from every operation in /openapi.json, with the passkey, never get a 5xx."""
    app = run_app(app_settings(database_url, sweeper=False))
    schema = schemathesis.openapi.from_url(f"{app.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {operation.path for operation in operations} >= {"/webhook", "/healthz", "/readyz"}
    statuses: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def call(case: Any) -> None:
            case.query = {**(case.query or {}), "passkey": PASSKEY}
            response = case.call(base_url=app.url, timeout=10)
            statuses.append(response.status_code)
            assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text}"

        call()
    assert any(status == 422 for status in statuses), "the generator reached the payload checks"
