"""OIDC against a real local issuer: discovery, JWKS over HTTP, rotation, and every bad token is a JSON 401."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.deps import CurrentUser
from api.errors import install_error_handlers
from authz.tokens import TokenVerifier, discover_jwks_uri
from core.errors import GovragError, Unavailable
from core.http import ThreadSessions
from core.settings import Settings
from tests.support.govrag_process import govrag_env, run_govrag, start_refusal
from tests.support.oidc_issuer import LocalIssuer, SigningKey, ec_key

COOLDOWN = 1.0  # the shortest refetch cooldown the settings allow


@pytest.fixture(scope="module")
def issuer() -> Iterator[LocalIssuer]:
    """The issuer, reached directly even if a proxy is configured."""
    with pytest.MonkeyPatch.context() as patch, LocalIssuer() as running:
        patch.setenv("NO_PROXY", "127.0.0.1,localhost")
        patch.setenv("no_proxy", "127.0.0.1,localhost")
        yield running


def _settings(issuer: LocalIssuer, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "dev_issuer": False, "oidc_issuer": issuer.issuer, "oidc_audience": issuer.audience,
        "groups_claim": "realm_access.roles", "email_claim": "email", "oidc_required_azp": "govrag-web",
        "oidc_jwks_refetch_cooldown_seconds": COOLDOWN, "admins": ["group:platform-admins"]}
    return Settings(**{**values, **overrides})


@pytest.fixture(scope="module")
def api(issuer: LocalIssuer) -> TestClient:
    """A minimal app using the real identity dependency and the real error handler."""
    return _whoami_api(_settings(issuer))


def _whoami_api(settings: Settings) -> TestClient:
    """GET /whoami behind the real identity dependency and error handler, its verifier made from settings."""
    app = FastAPI()
    install_error_handlers(app)
    app.state.settings = settings
    app.state.verifier = TokenVerifier.from_settings(settings, None)

    @app.get("/whoami")
    def whoami(user: CurrentUser) -> dict[str, Any]:
        return {"subject": user.subject, "groups": list(user.groups), "email": user.email,
                "admin": user.is_platform_admin}

    return TestClient(app)


def test_discovery_finds_the_jwks_uri_and_checks_the_issuer(issuer: LocalIssuer) -> None:
    idp = ThreadSessions()
    assert discover_jwks_uri(issuer.issuer, idp) == issuer.jwks_uri
    with pytest.raises(ValueError, match="different issuer"):
        discover_jwks_uri(issuer.issuer + "/", idp)  # a configuration for another issuer string is refused
    with pytest.raises(ValueError, match="could not be read"):
        discover_jwks_uri(issuer.issuer.replace("/realms/test", "/realms/nope"), idp)
    idp.close()


def test_discovery_and_the_key_set_are_fetched_over_one_connection(issuer: LocalIssuer) -> None:
    """Each fetch from the IdP opened a connection of its own: a verifier's first token, two (the discovery document,
    then the key set). The thread's connection is kept between them."""
    verifier = TokenVerifier.from_settings(_settings(issuer), None)
    connected = issuer.connections
    assert verifier.verify(issuer.token(azp="govrag-web"), admins=[]).subject == "user-1"
    assert issuer.connections - connected == 1


def test_an_idp_down_at_start_up_is_a_503_on_use_not_a_crash(issuer: LocalIssuer) -> None:
    """Discovery ran in from_settings, so an unreachable IdP raised ValueError and the API would not start."""
    with LocalIssuer() as stopped:
        dead_issuer = stopped.issuer  # its port is closed once the block ends
    verifier = TokenVerifier.from_settings(_settings(issuer, oidc_issuer=dead_issuer), None)
    with pytest.raises(Unavailable):
        verifier.verify(issuer.token(iss=dead_issuer), admins=[])


def test_deferred_discovery_still_checks_the_issuer_exactly(issuer: LocalIssuer) -> None:
    verifier = TokenVerifier.from_settings(_settings(issuer, oidc_issuer=issuer.issuer + "/",
                                                     oidc_required_azp=None), None)
    with pytest.raises(Unavailable):  # the configuration names issuer.issuer, not the configured one
        verifier.verify(issuer.token(iss=issuer.issuer + "/"), admins=[])


def test_valid_token_maps_nested_groups_email_and_admin(api: TestClient, issuer: LocalIssuer) -> None:
    token = issuer.token(subject="kc-user-1", azp="govrag-web", email="ana@example.com",
                         realm_access={"roles": ["hr-staff", "platform-admins"]})
    response = api.get("/whoami", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    assert response.json() == {"subject": "kc-user-1", "groups": ["hr-staff", "platform-admins"],
                               "email": "ana@example.com", "admin": True}


def test_entra_style_subject_and_flat_groups_claim(issuer: LocalIssuer) -> None:
    verifier = TokenVerifier.from_settings(_settings(issuer, subject_claim="oid", groups_claim="groups",
                                                     oidc_required_azp=None), None)
    token = issuer.token(subject="pairwise-sub", oid="0f9c-oid", groups=["6b1f-group-guid"])
    identity = verifier.verify(token, admins=[])
    assert (identity.subject, identity.groups) == ("0f9c-oid", ("6b1f-group-guid",))


def test_rotation_and_unknown_kid_refetch_once_per_cooldown(issuer: LocalIssuer) -> None:
    verifier = TokenVerifier.from_settings(_settings(issuer, oidc_required_azp=None), None)
    verifier.verify(issuer.token(), admins=[])
    time.sleep(COOLDOWN + 0.1)
    new_key = issuer.rotate()
    before = issuer.jwks_fetches
    assert verifier.verify(issuer.token(key=new_key, subject="after-rotation"), admins=[]).subject == "after-rotation"
    assert issuer.jwks_fetches == before + 1  # the unknown kid caused exactly one refetch
    stranger = SigningKey()  # never published
    before = issuer.jwks_fetches
    for _ in range(20):
        with pytest.raises(GovragError, match="unknown signing key"):
            verifier.verify(issuer.token(key=stranger), admins=[])
    assert issuer.jwks_fetches - before <= 1  # a burst of unknown kids cannot hammer the IdP


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _bad_tokens(issuer: LocalIssuer) -> dict[str, str]:
    key = issuer.keys[0]
    now = int(time.time())
    good = issuer.token(azp="govrag-web")
    head, body, sig = good.split(".")
    forged_body = _b64({**issuer.claims(subject="root"), "azp": "govrag-web"})
    # alg confusion: an HMAC "signed" with the issuer's public key as the secret
    public_pem = key.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    hs256 = ".".join([_b64({"alg": "HS256", "typ": "JWT", "kid": key.kid}), _b64(issuer.claims(azp="govrag-web"))])
    mac = hmac.new(public_pem, hs256.encode(), hashlib.sha256).digest()
    hs256 += "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    return {
        "forged_signature": f"{head}.{forged_body}.{sig}",
        "alg_none": ".".join([_b64({"alg": "none", "typ": "JWT", "kid": key.kid}), body, ""]),
        "hs256_with_public_key": hs256,
        "unpublished_key": jwt.encode(issuer.claims(azp="govrag-web"), ec_key(), algorithm="ES256",
                                      headers={"kid": key.kid}),
        # RFC 8725 3.1: the key is published with alg RS256, so a PSS signature by it is refused
        "pss_with_an_rs256_key": jwt.encode(issuer.claims(azp="govrag-web"), key.private, algorithm="PS256",
                                            headers={"kid": key.kid}),
        "expired": issuer.token(azp="govrag-web", exp=now - 3600, iat=now - 7200, nbf=now - 7200),
        "not_yet_valid": issuer.token(azp="govrag-web", nbf=now + 3600),
        "wrong_audience": issuer.token(azp="govrag-web", aud="another-api"),
        "wrong_issuer": issuer.token(azp="govrag-web", iss="https://evil.example/realms/test"),
        "wrong_azp": issuer.token(azp="some-other-client"),
        "missing_exp": issuer.token(azp="govrag-web", exp=None),
        "missing_aud": issuer.token(azp="govrag-web", aud=None),
        "missing_iss": issuer.token(azp="govrag-web", iss=None),
        "missing_sub": issuer.token(azp="govrag-web", sub=None),
        "role_subject": issuer.token(azp="govrag-web", subject="role:admin"),
        "group_subject": issuer.token(azp="govrag-web", subject="group:platform-admins"),
        "groups_not_a_list": issuer.token(azp="govrag-web", realm_access={"roles": "platform-admins"}),
    }


def test_every_bad_token_is_a_json_401_and_never_logged(api: TestClient, issuer: LocalIssuer,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    bad = _bad_tokens(issuer)
    with caplog.at_level(logging.DEBUG):
        for name, token in bad.items():
            _refusal(api, token, name)
    _never_logged(bad.values(), caplog)


def _refusal(api: TestClient, token: str, name: str = "") -> str:
    """The message of the JSON 401 /whoami answers token with, which quotes no part of the token."""
    response = api.get("/whoami", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401, (name, response.text)
    assert response.headers["content-type"].startswith("application/json"), name
    error = response.json()["error"]
    assert error["code"] == "unauthenticated", name
    assert not any(part and part in response.text for part in token.split(".")), name
    return error["message"]  # type: ignore[no-any-return]


def _never_logged(tokens: Iterable[str], caplog: pytest.LogCaptureFixture) -> None:
    for token in tokens:
        for part in token.split("."):
            assert not part or part not in caplog.text


def _status(api: TestClient, token: str) -> int:
    return api.get("/whoami", headers={"Authorization": f"Bearer {token}"}).status_code


def test_a_jwt_that_says_it_is_no_access_token_is_a_401(api: TestClient, issuer: LocalIssuer,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """The header's typ was not read: a back-channel logout token, a DPoP proof or a security event token the IdP
    signs with the same keys, carrying iss, aud, sub and exp, was taken as a caller's access token. An access token's
    typ (RFC 9068 "at+jwt", "JWT", none; a media type in any case, "application/" optional) is still taken."""
    accepted = [None, "JWT", "jwt", "at+jwt", "AT+JWT", "application/at+jwt", "application/jwt"]
    refused = ["logout+jwt", "dpop+jwt", "secevent+jwt", "application/logout+jwt", "JOSE", "id+jwt"]
    tokens = {str(typ): issuer.token(headers={"typ": typ}, azp="govrag-web") for typ in accepted + refused}
    assert jwt.get_unverified_header(tokens["None"]).keys() == {"alg", "kid"}  # no typ at all
    with caplog.at_level(logging.DEBUG):
        statuses = {typ: _status(api, token) for typ, token in tokens.items()}
        messages = {str(typ): _refusal(api, tokens[str(typ)], str(typ)) for typ in refused}
    assert statuses == {**{str(typ): 200 for typ in accepted}, **{str(typ): 401 for typ in refused}}
    assert set(messages.values()) == {"not an access token (token type)"}
    _never_logged(tokens.values(), caplog)
    assert _refusal(api, issuer.token(headers={"typ": 7}, azp="govrag-web"), "7") == "malformed token"


def test_a_keycloak_id_refresh_or_logout_token_is_a_401_and_its_access_token_a_200(
        api: TestClient, issuer: LocalIssuer, caplog: pytest.LogCaptureFixture) -> None:
    """Keycloak signs its ID, refresh, offline and logout tokens with its access tokens' keys and names their kind in a
    payload claim `typ`; an ID token for a client whose id is the API's audience was a caller. Its access token
    ("Bearer") still is."""
    tokens = {typ: issuer.token(azp="govrag-web", typ=typ) for typ in ("ID", "Refresh", "Offline", "Logout")}
    with caplog.at_level(logging.DEBUG):
        messages = {typ: _refusal(api, token, typ) for typ, token in tokens.items()}
    assert set(messages.values()) == {"not an access token (token type)"}
    assert _status(api, issuer.token(azp="govrag-web", typ="Bearer")) == 200
    _never_logged(tokens.values(), caplog)


def test_a_cognito_id_token_is_a_401_and_its_access_token_a_200(api: TestClient, issuer: LocalIssuer) -> None:
    """AWS Cognito writes no typ and names the kind of token in `token_use`; its ID token ("id"), whose aud is the app
    client's id, was a caller wherever that id is the API's audience. One saying "access" with the API's aud still
    is (Cognito's own access tokens carry no aud: refused as any token without one)."""
    def cognito(token_use: str) -> str:
        return issuer.token(azp=None, typ=None, token_use=token_use, client_id="govrag-web")

    assert _refusal(api, cognito("id"), "id") == "not an access token (token type)"
    assert _status(api, cognito("access")) == 200


def test_a_listed_cognito_app_clients_access_token_is_a_200_and_nothing_else_without_aud(
        issuer: LocalIssuer, caplog: pytest.LogCaptureFixture) -> None:
    """A Cognito access token carries no aud, its app client in client_id: no Cognito user pool could be used. With its
    app client in GOVRAG_OIDC_COGNITO_CLIENT_IDS (keys found by discovery, fetched over HTTP) it is a caller; its ID
    token, another app client's token, or one whose aud is another API's is a 401, and no token is logged."""
    api = _whoami_api(_settings(issuer, oidc_required_azp=None, groups_claim="cognito:groups",
                                oidc_cognito_client_ids=["govrag-web"]))

    def cognito(**overrides: Any) -> str:
        claims = {"aud": None, "nbf": None, "typ": None, "token_use": "access", "client_id": "govrag-web",
                  "username": "ana", "cognito:groups": ["hr-staff"], **overrides}
        return issuer.token(**claims)

    response = api.get("/whoami", headers={"Authorization": f"Bearer {cognito()}"})
    assert response.status_code == 200, response.text
    assert response.json()["groups"] == ["hr-staff"]
    bad = {"id_token": cognito(token_use="id", aud=issuer.audience), "other_client": cognito(client_id="other-app"),
           "no_client_id": cognito(client_id=None), "other_api": cognito(aud="another-api")}
    with caplog.at_level(logging.DEBUG):
        messages = {name: _refusal(api, token, name) for name, token in bad.items()}
    assert messages == {"id_token": "not an access token (token type)",
                        "other_client": "token issued to another client", "no_client_id": "missing required claim",
                        "other_api": "invalid audience"}
    _never_logged([cognito(), *bad.values()], caplog)


def test_a_time_claim_that_is_no_json_number_is_a_401(api: TestClient, issuer: LocalIssuer,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """PyJWT read "1700000000" and true as times: tokens whose exp, iat and nbf were strings were callers."""
    now = int(time.time())
    bad = {"strings": issuer.token(azp="govrag-web", iat=str(now), nbf=str(now), exp=str(now + 300)),
           "nbf_true": issuer.token(azp="govrag-web", nbf=True),
           "exp_infinite": issuer.token(azp="govrag-web", exp=float("inf"))}
    with caplog.at_level(logging.DEBUG):
        messages = {name: _refusal(api, token, name) for name, token in bad.items()}
    assert set(messages.values()) == {"malformed token"}
    _never_logged(bad.values(), caplog)


def test_a_token_living_longer_than_the_maximum_or_without_iat_is_a_401(api: TestClient, issuer: LocalIssuer,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Nothing bounded exp - iat: a token minted to live for years, or without iat, was taken until its exp. The
    lifetime is the token's own (no clock leeway in it): GOVRAG_TOKEN_MAX_LIFETIME_SECONDS exactly is taken."""
    longest = api.app.state.settings.token_max_lifetime_seconds  # type: ignore[attr-defined]
    now = int(time.time())
    assert _status(api, issuer.token(azp="govrag-web", iat=now, exp=now + longest)) == 200
    bad = {
        "one_second_too_long": issuer.token(azp="govrag-web", iat=now, exp=now + longest + 1),
        "ten_years": issuer.token(azp="govrag-web", iat=now, exp=now + 10 * 365 * 86_400),
        "issued_long_ago": issuer.token(azp="govrag-web", iat=now - 30 * 86_400, exp=now + 3600),
        "no_iat": issuer.token(azp="govrag-web", iat=None, exp=now + 3600),
    }
    with caplog.at_level(logging.DEBUG):
        messages = {name: _refusal(api, token, name) for name, token in bad.items()}
    too_long = "token lifetime exceeds the allowed maximum"
    assert messages == {"one_second_too_long": too_long, "ten_years": too_long, "issued_long_ago": too_long,
                        "no_iat": "missing required claim"}
    _never_logged(bad.values(), caplog)


def test_a_plain_http_issuer_is_warned_of_once(issuer: LocalIssuer, caplog: pytest.LogCaptureFixture) -> None:
    """In development an http issuer was warned of at start, then again by discovery on first use (and at each
    retry while discovery failed): one warning says it."""
    with caplog.at_level(logging.WARNING, logger="authz.tokens"):
        api = _whoami_api(_settings(issuer, oidc_required_azp=None))
        assert _status(api, issuer.token()) == 200
        assert _status(api, issuer.token()) == 200
    warnings = [r.getMessage() for r in caplog.records if r.name == "authz.tokens"]
    assert warnings == ["GOVRAG_OIDC_ISSUER is not https; what is fetched from it can be substituted in transit",
                        "the discovered jwks_uri is not https; what is fetched from it can be substituted in transit"]


def test_a_discovered_jwks_uri_whose_port_is_no_number_from_1_to_65535_is_never_fetched(
        caplog: pytest.LogCaptureFixture) -> None:
    """The discovered jwks_uri's port was read by httpx, not as the settings read a configured URL's: `:+PORT`, the
    port in fullwidth digits or after a space had the keys fetched from PORT (an empty `host:` from port 80), and
    `:99999` or `:-1` raised a raw ExceptionGroup out of the verifier. Each is now an unusable IdP answer, a 503,
    nothing fetched, the log line naming what is wrong without quoting the URL or the token."""
    with LocalIssuer() as idp:
        port = str(urlsplit(idp.issuer).port)
        fullwidth = port.translate({ord(d): ord(d) + 0xFEE0 for d in "0123456789"})
        bad = [f"+{port}", fullwidth, f" {port}", "", "99999", "-1", "0"]
        for written in bad:
            idp.jwks_uri = f"http://127.0.0.1:{written}/realms/test/jwks"
            token = idp.token()
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="authz.tokens"), pytest.raises(Unavailable):
                TokenVerifier.from_settings(_settings(idp, oidc_required_azp=None), None).verify(token, admins=[])
            assert ("the identity provider's signing keys could not be fetched: the discovered jwks_uri names a port "
                    "that is not a number from 1 to 65535") in caplog.text, written
            assert idp.jwks_uri not in caplog.text
            _never_logged([token], caplog)
        assert idp.jwks_fetches == 0


@pytest.mark.parametrize(("setting", "url"), [("oidc_jwks_url", "file:///etc/govrag/jwks.json"),
                                              ("oidc_issuer", "https:/sso.example.test/realms/acme")])
def test_govrag_serve_refuses_an_idp_url_it_cannot_fetch_in_one_line(tmp_path: Path, setting: str, url: str) -> None:
    """`govrag serve` with a JWKS URL or discovery issuer that is not http(s) with a host ended in a ValueError's
    traceback; now one line naming the setting (never the URL), exit 2, and uvicorn never starts."""
    env = govrag_env(data_dir=str(tmp_path / "data"), dev_issuer="false", **{setting: url})
    result = run_govrag(["serve", "--port", "0"], env=env, timeout=300)
    assert start_refusal(result) == (2, f"govrag: GOVRAG_{setting.upper()} is not an http(s) URL with a host")
    assert url not in result.stderr


@pytest.mark.parametrize(("settings", "line"), [
    ({"dev_issuer": "false", "oidc_discovery": "false"},
     "no token keys: GOVRAG_OIDC_JWKS_URL is unset and GOVRAG_OIDC_DISCOVERY and GOVRAG_DEV_ISSUER are false (set "
     "GOVRAG_OIDC_JWKS_URL, or GOVRAG_OIDC_DISCOVERY=true with GOVRAG_OIDC_ISSUER; GOVRAG_DEV_ISSUER=true in "
     "development)"),
    ({"oidc_algorithms": '["HS256", "none"]'},
     "GOVRAG_OIDC_ALGORITHMS lists no asymmetric signature algorithm (one of RS256, RS384, RS512, PS256, PS384, "
     "PS512, ES256, ES256K, ES384, ES512, EdDSA)")])
def test_govrag_serve_refuses_token_settings_it_cannot_verify_with_in_one_line(tmp_path: Path, settings: dict[str, str],
                                                                               line: str) -> None:
    """No key source, or no asymmetric algorithm allowed, ended `govrag serve` in a ValueError's traceback, exit 1; now
    one line naming the settings, exit 2, and uvicorn never starts."""
    result = run_govrag(["serve", "--port", "0"], env=govrag_env(data_dir=str(tmp_path / "data"), **settings),
                        timeout=300)
    assert start_refusal(result) == (2, f"govrag: {line}")


def test_a_closed_verifier_refuses_to_fetch_keys_and_closes_again(issuer: LocalIssuer) -> None:
    """A request racing the API's stop finds its verifier closed: a 503, no connection opened (nor left open); closing
    a verifier that never fetched, or twice, is nothing."""
    verifier = TokenVerifier.from_settings(_settings(issuer), None)
    verifier.close()
    connections = issuer.connections
    with pytest.raises(Unavailable):
        verifier.verify(issuer.token(), admins=[])
    verifier.close()
    assert issuer.connections == connections
