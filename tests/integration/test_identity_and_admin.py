"""Bad tokens are 401s with a JSON error; the admin API is deny-by-default."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient

from tests.conftest import PLATFORM_ADMIN, auth


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _bad_tokens(client: TestClient) -> dict[str, str]:
    issuer = client.app.state.dev_issuer  # type: ignore[attr-defined]
    settings = client.app.state.settings  # type: ignore[attr-defined]
    kid = issuer.jwks()["keys"][0]["kid"]
    now = int(time.time())
    claims = {"sub": "mallory", "iss": settings.oidc_issuer, "aud": settings.oidc_audience, "iat": now,
              "nbf": now, "exp": now + 600, "groups": ["hr-staff"]}
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "expired": jwt.encode({**claims, "exp": now - 3600, "iat": now - 7200, "nbf": now - 7200}, other_key,
                              algorithm="RS256", headers={"kid": kid}),
        "expired_by_issuer": issuer.issue("mallory", ["hr-staff"],
                                          extra_claims={"exp": now - 600, "iat": now - 1200, "nbf": now - 1200}),
        "not_yet_valid": issuer.issue("mallory", ["hr-staff"], extra_claims={"nbf": now + 3600}),
        "wrong_audience": issuer.issue("mallory", ["hr-staff"], extra_claims={"aud": "someone-else"}),
        "wrong_issuer": issuer.issue("mallory", ["hr-staff"], extra_claims={"iss": "https://evil.example"}),
        # signed by the trusted key, valid now, but minted to live for years (GOVRAG_TOKEN_MAX_LIFETIME_SECONDS)
        "lives_for_years": issuer.issue("mallory", ["hr-staff"], extra_claims={"exp": now + 5 * 365 * 86_400}),
        "bad_signature": jwt.encode(claims, other_key, algorithm="RS256", headers={"kid": kid}),
        "alg_none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}.",
        "garbage": "not-a-jwt",
    }


@pytest.mark.parametrize("case", ["expired", "expired_by_issuer", "not_yet_valid", "wrong_audience",
                                  "wrong_issuer", "lives_for_years", "bad_signature", "alg_none", "garbage"])
def test_bad_tokens_are_rejected_with_json_401(client: TestClient, case: str) -> None:
    token = _bad_tokens(client)[case]
    response = client.post("/v1/query", headers=auth(token), json={"question": "anything"})
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "unauthenticated" and error["request_id"]
    assert token not in response.text


def test_missing_token_is_401(client: TestClient) -> None:
    response = client.post("/v1/query", json={"question": "anything"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"


@pytest.mark.parametrize("header", [None, "", "Basic cm9vdDpyb290", "Bearer", "Bearer two words"])
def test_a_missing_or_malformed_authorization_header_is_the_same_401(client: TestClient, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    response = client.get("/v1/admin/departments", headers=headers)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["message"] == "missing bearer token"


def _v1_operations(spec: dict) -> list[tuple[str, dict]]:
    return [(f"{method.upper()} {path}", operation) for path, item in spec["paths"].items()
            if path.startswith("/v1/") for method, operation in item.items()]


def test_openapi_declares_the_bearer_token_every_v1_operation_requires(client: TestClient) -> None:
    """The Authorization header was documented as an optional parameter and no security scheme was declared, while
    every /v1 operation answers 401 without it."""
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearer"] == {
        **spec["components"]["securitySchemes"]["bearer"], "type": "http", "scheme": "bearer"}
    operations = _v1_operations(spec)
    assert operations
    for name, operation in operations:
        assert operation.get("security") == [{"bearer": []}], name
        assert not [p for p in operation.get("parameters", []) if p["name"].lower() == "authorization"], name


def test_openapi_documents_the_error_shape_the_api_sends(client: TestClient, issue_token: Callable[..., str]) -> None:
    """Every operation documented its 422 as FastAPI's {"detail": [...]}, while the API sends {"error": {code,
    message, request_id}}: a client generated from /openapi.json parsed every error wrongly."""
    spec = client.get("/openapi.json").json()
    actual = client.post("/v1/admin/departments", json={"name": "Not Valid"}, headers=auth(issue_token(PLATFORM_ADMIN)))
    assert actual.status_code == 422 and set(actual.json()) == {"error"}
    assert set(actual.json()["error"]) == {"code", "message", "request_id"}
    schemas = spec["components"]["schemas"]
    for name, operation in _v1_operations(spec):
        for status in ("422", "4XX", "5XX"):
            ref = operation["responses"][status]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
            assert list(schemas[ref]["properties"]) == ["error"], (name, status)
            detail = schemas[ref]["properties"]["error"]["$ref"].rsplit("/", 1)[-1]
            named_fields = {"code", "message", "request_id", "dependency", "duplicate_of"}
            assert set(schemas[detail]["properties"]) == named_fields, (name, status)
            assert set(schemas[detail]["required"]) == {"code", "message", "request_id"}, (name, status)
    assert "HTTPValidationError" not in schemas
    named = schemas["ErrorDetail"]["properties"]["dependency"]["anyOf"][0]  # an outage's 503 only: fixed names
    assert set(named["enum"]) == {"database", "vector store", "identity provider", "broker", "blob volume",
                                  "temporary directory"}, named


def test_only_platform_admins_create_departments(client: TestClient, issue_token: Callable[..., str]) -> None:
    response = client.post("/v1/admin/departments", json={"name": "legal"}, headers=auth(issue_token("eve")))
    assert response.status_code == 403
    admin = auth(issue_token(PLATFORM_ADMIN))
    assert client.post("/v1/admin/departments", json={"name": "legal"}, headers=admin).status_code == 201
    assert client.post("/v1/admin/departments", json={"name": "legal"}, headers=admin).status_code == 409
    assert client.post("/v1/admin/departments", json={"name": "Bad Name!"}, headers=admin).status_code == 422
    names = {d["name"] for d in client.get("/v1/admin/departments", headers=admin).json()}
    assert "legal" in names


def test_admins_by_group_claim(client: TestClient, issue_token: Callable[..., str]) -> None:
    settings = client.app.state.settings  # type: ignore[attr-defined]
    settings.admins.append("group:platform-ops")
    try:
        response = client.get("/v1/admin/departments", headers=auth(issue_token("olga", ["platform-ops"])))
        assert response.status_code == 200
    finally:
        settings.admins.remove("group:platform-ops")


def test_role_assignment_lifecycle_and_deny_by_default(client: TestClient, issue_token: Callable[..., str]) -> None:
    admin = auth(issue_token(PLATFORM_ADMIN))
    client.post("/v1/admin/departments", json={"name": "sales"}, headers=admin)
    dave = auth(issue_token("dave", []))
    assert client.post("/v1/query", headers=dave, json={"question": "q", "departments": ["sales"]}).json()[
        "reason"] == "no_authorised_departments"
    grant = {"subject": "dave", "role": "reader", "department": "sales"}
    assert client.post("/v1/admin/role-assignments", json=grant, headers=admin).status_code == 201
    again = client.post("/v1/admin/role-assignments", json=grant, headers=admin)  # was a 201: nothing is created
    assert again.status_code == 200 and again.json() == grant
    listed = client.get("/v1/admin/role-assignments", params={"department": "sales"}, headers=admin).json()
    assert grant in listed
    assert client.post("/v1/query", headers=dave, json={"question": "q", "departments": ["sales"]}).json()[
        "reason"] != "no_authorised_departments"
    # A reader may not grant roles, nor upload.
    assert client.post("/v1/admin/role-assignments", json={**grant, "subject": "x"}, headers=dave).status_code == 403
    assert client.request("DELETE", "/v1/admin/role-assignments", json=grant, headers=admin).status_code == 204
    assert client.request("DELETE", "/v1/admin/role-assignments", json=grant, headers=admin).status_code == 404
    assert client.post("/v1/query", headers=dave, json={"question": "q", "departments": ["sales"]}).json()[
        "reason"] == "no_authorised_departments"


def test_invalid_role_and_unknown_department(client: TestClient, issue_token: Callable[..., str]) -> None:
    admin = auth(issue_token(PLATFORM_ADMIN))
    bad_role = {"subject": "dave", "role": "superuser", "department": "sales"}
    assert client.post("/v1/admin/role-assignments", json=bad_role, headers=admin).status_code == 400
    unknown = {"subject": "dave", "role": "reader", "department": "atlantis"}
    assert client.post("/v1/admin/role-assignments", json=unknown, headers=admin).status_code == 404


def test_validation_errors_do_not_echo_input(client: TestClient, issue_token: Callable[..., str]) -> None:
    secret = "4111 1111 1111 1111 " * 200
    response = client.post("/v1/query", headers=auth(issue_token("alice", ["hr-staff"])),
                           json={"question": secret})
    assert response.status_code == 422
    assert "4111" not in response.text
    assert response.json()["error"]["code"] == "invalid_request"


def test_a_422_never_echoes_a_submitted_dict_key(client: TestClient, issue_token: Callable[..., str]) -> None:
    """The location of a validation error carried the submitted dict key: a department's confidential keyword (a
    project code name) came back in the message. Field names from the schema are still given."""
    admin = auth(issue_token(PLATFORM_ADMIN))
    department = f"kw{uuid.uuid4().hex[:8]}"
    assert client.post("/v1/admin/departments", json={"name": department}, headers=admin).status_code == 201
    response = client.put(f"/v1/admin/departments/{department}/ingestion-policy", headers=admin,
                          json={"keywords": {"Project Nightingale merger": "top-secret"}, "ai_max_level": "secret"})
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert "Nightingale" not in response.text
    assert "body.keywords.<key>:" in message and "body.ai_max_level:" in message, message
