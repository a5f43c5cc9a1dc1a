"""schemathesis against the OpenAPI schema: no 500 ever, 401 without a valid token, no 2xx on admin paths
for a caller without roles. Cases run through the session's TestClient (real PostgreSQL, Redis, Qdrant)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import auth

EXAMPLES = int(os.environ.get("GOVRAG_FUZZ_EXAMPLES", "4"))
PUBLIC = ("/healthz", "/readyz", "/metrics", "/dev-issuer/")  # public by design
PRIVILEGED = ("/v1/admin", "/v1/authz", "/v1/audit")


def _operations(client: TestClient) -> list[Any]:
    schema = schemathesis.openapi.from_dict(client.app.openapi())  # type: ignore[attr-defined]
    return [result.ok() for result in schema.get_all_operations()]


def _send(client: TestClient, case: Any, headers: dict[str, str]) -> Any:
    kwargs = case.as_transport_kwargs(base_url="http://testserver", headers=headers)
    kwargs.pop("base_url", None)
    return client.request(**{k: v for k, v in kwargs.items() if k in
                             ("method", "url", "headers", "params", "json", "data", "files", "content", "cookies")})


@pytest.fixture(scope="module")
def callers(issue_token: Callable[..., str]) -> dict[str, dict[str, str]]:
    expired = issue_token("fuzz-user", ["fuzz-group"], extra_claims={"exp": 1_000_000_000})
    return {"none": {}, "garbage": {"Authorization": "Bearer not.a.token"}, "expired": auth(expired),
            "no_roles": auth(issue_token("fuzz-user", ["fuzz-group"]))}


def test_schema_cases_never_500_and_never_grant_without_rights(client: TestClient,
                                                               callers: dict[str, dict[str, str]]) -> None:
    operations = [op for op in _operations(client) if not op.path.startswith(PUBLIC)]
    assert operations
    seen: dict[str, int] = {}

    @settings(max_examples=EXAMPLES * len(operations), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        operation = data.draw(st.sampled_from(operations))
        case = data.draw(operation.as_strategy())
        who = data.draw(st.sampled_from(sorted(callers)))
        response = _send(client, case, callers[who])
        key = f"{operation.method.upper()} {operation.path}"
        seen[key] = seen.get(key, 0) + 1
        assert response.status_code < 500, (key, who, response.text)
        if who != "no_roles":
            assert response.status_code in (400, 401, 413, 422), (key, who, response.status_code)  # never 2xx/403
        elif operation.path.startswith(PRIVILEGED):
            assert not 200 <= response.status_code < 300, (key, response.status_code)

    run()
    print(f"\nschemathesis: {sum(seen.values())} requests over {len(seen)}/{len(operations)} operations")  # noqa: T201
    assert len(seen) >= len(operations) // 2
