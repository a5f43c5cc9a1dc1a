"""Token verification: the happy path, every rejection, JWKS-over-HTTP with rotation, dev issuer keys."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import math
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError

from api import cli
from authz.dev_issuer import DevIssuer, jwk_thumbprint, rsa_public_jwk
from authz.identity import Identity, is_platform_admin
from authz.tokens import TokenVerifier, bearer_token
from core.errors import ErrorCode, GovragError, StartRefused, Unavailable, UnusablePath
from core.settings import Settings, get_settings
from tests.support.production import production_settings

ISSUER = "https://idp.example.test/realms/govrag"
AUDIENCE = "govrag-api"
ALGORITHMS = ["RS256", "ES256", "PS256", "EdDSA"]


def _b64url(data: bytes) -> str:
    """Unpadded base64url."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _segment(obj: dict[str, Any]) -> str:
    """A compact-JWS segment for a JSON object."""
    return _b64url(json.dumps(obj, separators=(",", ":")).encode("utf-8"))


class SigningKey:
    """A real RSA key with its kid and public JWK, for minting test tokens."""

    def __init__(self, kid: str | None = None) -> None:
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_jwk = rsa_public_jwk(self.private.public_key())
        self.kid = kid or jwk_thumbprint(self.public_jwk)

    def jwk(self) -> dict[str, str]:
        """The public JWK as an IdP would publish it."""
        return {**self.public_jwk, "kid": self.kid, "alg": "RS256", "use": "sig"}

    def public_pem(self) -> bytes:
        """The public key as PEM (what a key-confusion attacker would use as an HMAC secret)."""
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, overrides: dict[str, Any] | None = None, drop: tuple[str, ...] = (), alg: str = "RS256") -> str:
        """A token with sane defaults, claims overridden or dropped as asked."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "alice",
            "groups": ["eng", "ops"],
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "jti": "j-1",
        }
        claims.update(overrides or {})
        for name in drop:
            claims.pop(name, None)
        return jwt.encode(claims, self.private, algorithm=alg, headers={"kid": self.kid})


@pytest.fixture(scope="module")
def key() -> SigningKey:
    """The trusted signing key, generated fresh for this run."""
    return SigningKey()


@pytest.fixture(scope="module")
def verifier(key: SigningKey) -> TokenVerifier:
    """A verifier trusting only `key`, via an in-memory JWKS."""
    return TokenVerifier(
        issuer=ISSUER, audience=AUDIENCE, algorithms=ALGORITHMS, leeway_seconds=30, jwks={"keys": [key.jwk()]}
    )


def _rejects(verifier: TokenVerifier, token: str, reason: str | None = None) -> GovragError:
    """Assert the token is refused as unauthenticated, without echoing any of it."""
    with pytest.raises(GovragError) as caught:
        verifier.verify(token, admins=[])
    err = caught.value
    assert err.code is ErrorCode.unauthenticated
    assert token not in str(err)
    for part in token.split("."):
        if len(part) >= 8:
            assert part not in str(err)
            assert part not in repr(err)
    assert err.__cause__ is None
    if reason is not None:
        assert err.message == reason
    return err


def test_valid_token_gives_identity(verifier: TokenVerifier, key: SigningKey) -> None:
    identity = verifier.verify(key.sign(), admins=[])
    assert identity == Identity(subject="alice", groups=("eng", "ops"), is_platform_admin=False)
    assert identity.subjects == ("alice", "group:eng", "group:ops")


def test_platform_admin_by_subject_and_by_group(verifier: TokenVerifier, key: SigningKey) -> None:
    assert verifier.verify(key.sign(), admins=["alice"]).is_platform_admin
    assert verifier.verify(key.sign({"sub": "bob"}), admins=["group:ops"]).is_platform_admin
    assert not verifier.verify(key.sign({"sub": "bob"}), admins=["alice", "group:admins"]).is_platform_admin


def test_is_platform_admin_keeps_subjects_and_groups_apart() -> None:
    assert is_platform_admin("alice", [], ["alice"])
    assert is_platform_admin("bob", ["ops"], ["group:ops"])
    assert not is_platform_admin("ops", [], ["group:ops"])  # a subject named like a group is not that group
    assert not is_platform_admin("bob", ["alice"], ["alice"])  # a group named like a subject is not that subject


def test_missing_groups_claim_means_no_groups(verifier: TokenVerifier, key: SigningKey) -> None:
    assert verifier.verify(key.sign(drop=("groups",)), admins=[]).groups == ()


def test_leeway_accepts_small_clock_skew(verifier: TokenVerifier, key: SigningKey) -> None:
    now = int(time.time())
    assert verifier.verify(key.sign({"nbf": now + 10, "iat": now + 10}), admins=[]).subject == "alice"


def test_expired(verifier: TokenVerifier, key: SigningKey) -> None:
    now = int(time.time())
    _rejects(verifier, key.sign({"iat": now - 7200, "nbf": now - 7200, "exp": now - 3600}), "token expired")


def test_not_yet_valid(verifier: TokenVerifier, key: SigningKey) -> None:
    now = int(time.time())
    _rejects(verifier, key.sign({"nbf": now + 600, "exp": now + 1200}), "token not yet valid")


def test_wrong_audience(verifier: TokenVerifier, key: SigningKey) -> None:
    _rejects(verifier, key.sign({"aud": "some-other-api"}), "invalid audience")


def test_wrong_issuer(verifier: TokenVerifier, key: SigningKey) -> None:
    _rejects(verifier, key.sign({"iss": "https://evil.example.test"}), "invalid issuer")


def test_forged_signature_with_same_kid(verifier: TokenVerifier, key: SigningKey) -> None:
    forger = SigningKey(kid=key.kid)
    _rejects(verifier, forger.sign({"sub": "mallory"}), "invalid signature")


def test_alg_none(verifier: TokenVerifier, key: SigningKey) -> None:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "iat": now, "exp": now + 300}
    for alg in ("none", "None", "NONE"):
        token = f"{_segment({'alg': alg, 'typ': 'JWT', 'kid': key.kid})}.{_segment(payload)}."
        _rejects(verifier, token, "unsupported token algorithm")


def test_hs256_key_confusion_with_public_pem(verifier: TokenVerifier, key: SigningKey) -> None:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "iat": now, "exp": now + 300}
    signing_input = f"{_segment({'alg': 'HS256', 'typ': 'JWT', 'kid': key.kid})}.{_segment(payload)}"
    signature = hmac.new(key.public_pem(), signing_input.encode("ascii"), hashlib.sha256).digest()
    _rejects(verifier, f"{signing_input}.{_b64url(signature)}", "unsupported token algorithm")


def test_symmetric_algorithms_are_stripped_from_the_allowlist(key: SigningKey) -> None:
    lax = TokenVerifier(
        issuer=ISSUER, audience=AUDIENCE, algorithms=["none", "HS256", "RS256"], jwks={"keys": [key.jwk()]}
    )
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "iat": now, "exp": now + 300}
    signing_input = f"{_segment({'alg': 'HS256', 'kid': key.kid})}.{_segment(payload)}"
    signature = hmac.new(key.public_pem(), signing_input.encode("ascii"), hashlib.sha256).digest()
    _rejects(lax, f"{signing_input}.{_b64url(signature)}", "unsupported token algorithm")
    _rejects(lax, f"{_segment({'alg': 'none', 'kid': key.kid})}.{_segment(payload)}.", "unsupported token algorithm")
    assert lax.verify(key.sign(), admins=[]).subject == "alice"
    with pytest.raises(ValueError):
        TokenVerifier(issuer=ISSUER, audience=AUDIENCE, algorithms=["HS256", "none"], jwks={"keys": [key.jwk()]})


def test_algorithm_outside_allowlist(key: SigningKey) -> None:
    strict = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, algorithms=["ES256"], jwks={"keys": [key.jwk()]})
    _rejects(strict, key.sign(), "unsupported token algorithm")


def test_algorithm_must_match_key_type() -> None:
    ec_private = ec.generate_private_key(ec.SECP256R1())
    ec_jwk = jwt.algorithms.ECAlgorithm.to_jwk(ec_private.public_key(), as_dict=True)
    ec_jwk.update({"kid": "ec-1", "use": "sig"})
    ec_verifier = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, algorithms=ALGORITHMS, jwks={"keys": [ec_jwk]})
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "carol", "iat": now, "exp": now + 300}
    good = jwt.encode(claims, ec_private, algorithm="ES256", headers={"kid": "ec-1"})
    assert ec_verifier.verify(good, admins=[]).subject == "carol"
    rsa_key = SigningKey(kid="ec-1")
    _rejects(ec_verifier, rsa_key.sign(), "unsupported token algorithm")


def test_pss_with_rsa_key(key: SigningKey) -> None:
    """An RSA JWK published without `alg` verifies any RSA algorithm on the allowlist, PSS too."""
    no_alg = {k: v for k, v in key.jwk().items() if k != "alg"}
    verifier = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, algorithms=ALGORITHMS, jwks={"keys": [no_alg]})
    assert verifier.verify(key.sign(alg="PS256"), admins=[]).subject == "alice"
    assert verifier.verify(key.sign(alg="RS256"), admins=[]).subject == "alice"


@pytest.mark.parametrize("published", ["RS256", "PS256"])
def test_a_jwk_published_with_an_alg_verifies_that_alg_only(key: SigningKey, published: str) -> None:
    """RFC 8725 3.1: a key published for RS256 also verified PS256 tokens (any RSA algorithm on the allowlist)."""
    verifier = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, algorithms=ALGORITHMS,
                             jwks={"keys": [{**key.jwk(), "alg": published}]})
    assert verifier.verify(key.sign(alg=published), admins=[]).subject == "alice"
    other = "PS256" if published == "RS256" else "RS256"
    _rejects(verifier, key.sign(alg=other), "token algorithm does not match its signing key")


def test_a_jwk_alg_binds_keys_fetched_from_a_jwks_url(jwks_server: _JwksServer, key: SigningKey) -> None:
    jwks_server.jwks = {"keys": [key.jwk()]}  # published with alg RS256
    remote = _remote(jwks_server)
    assert remote.verify(key.sign(), admins=[]).subject == "alice"
    _rejects(remote, key.sign(alg="PS256"), "token algorithm does not match its signing key")


def test_unknown_kid(verifier: TokenVerifier) -> None:
    stranger = SigningKey(kid="not-a-known-kid")
    _rejects(verifier, stranger.sign(), "unknown signing key")


def test_missing_kid(verifier: TokenVerifier, key: SigningKey) -> None:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300}
    _rejects(verifier, jwt.encode(claims, key.private, algorithm="RS256"), "unknown signing key")


@pytest.mark.parametrize("claim", ["sub", "exp", "iat", "iss", "aud"])
def test_missing_required_claim(verifier: TokenVerifier, key: SigningKey, claim: str) -> None:
    _rejects(verifier, key.sign(drop=(claim,)), "missing required claim")


@pytest.mark.parametrize("subject", ["", "   ", "group:admins", "role:admin", "system:guard", "cli:root", "x" * 300,
                                     "ali\nce", "ali\U000e0041ce",
                                     # variation selectors: invisible (`isprintable` passes them), one may hide a byte
                                     "alice\ufe0f", "alice\U000e0151\U000e0152"])
def test_invalid_subject(verifier: TokenVerifier, key: SigningKey, subject: str) -> None:
    _rejects(verifier, key.sign({"sub": subject}), "invalid subject")


@pytest.mark.parametrize(
    "garbage",
    [
        "garbage",
        "not.a.jwt",
        "a.b",
        "a.b.c.d.e",
        "",
        "eyJhbGciOiJSUzI1NiJ9.%%%%.sig",
        "e30.e30.",
        "W10.e30.",
        "x" * 20_000,
    ],
)
def test_garbage(verifier: TokenVerifier, garbage: str) -> None:
    with pytest.raises(GovragError) as caught:
        verifier.verify(garbage, admins=[])
    assert caught.value.code is ErrorCode.unauthenticated
    if garbage:
        assert garbage not in str(caught.value)


def test_an_oversized_token_says_so(verifier: TokenVerifier, key: SigningKey) -> None:
    """A signed token of thousands of groups (an IdP emitting every directory group) was refused as "malformed"."""
    _rejects(verifier, key.sign({"groups": [f"group-{n}" for n in range(2000)]}),
             "token too large (over 16384 characters)")


@pytest.mark.parametrize("groups", ["admins", {"admins": True}, ["ok", 7], 42, ["ok", "\ud800"], ["a\x00b"],
                                    ["ok", "admins\ufe00\ufe01"], ["ok\U000e0100"]])
def test_groups_claim_not_a_list_of_strings(verifier: TokenVerifier, key: SigningKey, groups: object) -> None:
    _rejects(verifier, key.sign({"groups": groups}), "invalid groups claim")


def test_custom_groups_claim(key: SigningKey) -> None:
    custom = TokenVerifier(
        issuer=ISSUER, audience=AUDIENCE, algorithms=ALGORITHMS, groups_claim="roles", jwks={"keys": [key.jwk()]}
    )
    assert custom.verify(key.sign({"roles": ["r1", "r1", "r2"]}), admins=["group:r2"]) == Identity(
        subject="alice", groups=("r1", "r2"), is_platform_admin=True
    )


def test_bearer_token() -> None:
    assert bearer_token("Bearer abc.def.ghi") == "abc.def.ghi"
    assert bearer_token("bearer  abc.def.ghi ") == "abc.def.ghi"
    for header in (None, "", "Bearer", "Bearer ", "Basic dXNlcjpwdw==", "abc.def.ghi", "Bearer a b"):
        with pytest.raises(GovragError) as caught:
            bearer_token(header)
        assert caught.value.code is ErrorCode.unauthenticated
        assert caught.value.message == "missing bearer token"


class _JwksServer:
    """A JWKS endpoint on 127.0.0.1 whose key set a test can swap (key rotation) or make misbehave."""

    def __init__(self) -> None:
        self.jwks: dict[str, Any] = {"keys": []}
        self.raw: bytes | None = None  # served instead of the key set when set (HTML, "[]", ...)
        self.status = 200
        self.drip = False  # promise a large body, then send one byte a second until closed
        self.drip_headers = False  # send the status line, then one header line a second until closed
        self.hits = 0
        self.requested = threading.Event()
        self.closing = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                outer.requested.set()
                if outer.drip or outer.drip_headers:
                    self._drip()
                    return
                body = outer.raw if outer.raw is not None else json.dumps(outer.jwks).encode("utf-8")
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if 300 <= outer.status < 400:
                    self.send_header("Location", self.path)
                self.end_headers()
                self.wfile.write(body)

            def _drip(self) -> None:
                self.send_response(200)
                if outer.drip_headers:
                    self.flush_headers()  # the status line goes out; the headers never end
                else:
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    self.wfile.write(b'{"keys": [')
                while not outer.closing.wait(1.0):
                    try:
                        self.wfile.write(b"X-Wait: 1\r\n" if outer.drip_headers else b" ")
                        self.wfile.flush()
                    except OSError:
                        return

            def log_message(self, *_args: object) -> None:
                """Keep test output quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def jwks_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[_JwksServer]:
    """A live JWKS endpoint, reached directly even if a proxy is configured."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    with _JwksServer() as server:
        yield server


def test_jwks_url_mode_with_key_rotation(jwks_server: _JwksServer, key: SigningKey) -> None:
    jwks_server.jwks = {"keys": [key.jwk()]}
    remote = TokenVerifier(
        issuer=ISSUER,
        audience=AUDIENCE,
        algorithms=ALGORITHMS,
        jwks_url=jwks_server.url,
        jwks_refresh_cooldown_seconds=0,
    )
    assert remote.verify(key.sign(), admins=["group:ops"]).is_platform_admin
    hits_after_first = jwks_server.hits
    assert remote.verify(key.sign(), admins=[]).subject == "alice"
    assert jwks_server.hits == hits_after_first  # cached, no refetch

    rotated = SigningKey()
    jwks_server.jwks = {"keys": [rotated.jwk()]}
    assert remote.verify(rotated.sign({"sub": "dave"}), admins=[]).subject == "dave"

    _rejects(remote, SigningKey(kid="never-published").sign(), "unknown signing key")
    _rejects(remote, SigningKey(kid=rotated.kid).sign(), "invalid signature")


def test_jwks_url_mode_drops_withdrawn_keys(jwks_server: _JwksServer, key: SigningKey) -> None:
    jwks_server.jwks = {"keys": [key.jwk()]}
    remote = TokenVerifier(
        issuer=ISSUER,
        audience=AUDIENCE,
        algorithms=ALGORITHMS,
        jwks_url=jwks_server.url,
        jwks_cache_seconds=0.2,
        jwks_refresh_cooldown_seconds=0,
    )
    assert remote.verify(key.sign(), admins=[]).subject == "alice"
    jwks_server.jwks = {"keys": [SigningKey().jwk()]}  # the IdP withdraws the old key
    time.sleep(0.3)  # let the JWK Set cache expire; no timing is asserted
    _rejects(remote, key.sign(), "unknown signing key")


def test_jwks_url_unreachable_is_unavailable(key: SigningKey, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with _JwksServer() as server:
        url = server.url
    remote = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, algorithms=ALGORITHMS, jwks_url=url)
    token = key.sign()
    with pytest.raises(Unavailable) as caught:  # the API's 503 to retry (tests/integration/test_dependency_outage)
        remote.verify(token, admins=[])
    assert caught.value.dependency == "identity provider"
    assert token not in str(caught.value)


def _remote(jwks_server: _JwksServer, cooldown: float = 60.0) -> TokenVerifier:
    """A verifier fetching jwks_server's key set, with a long refetch cooldown unless told."""
    return TokenVerifier(issuer=ISSUER, audience=AUDIENCE, algorithms=ALGORITHMS, jwks_url=jwks_server.url,
                         jwks_refresh_cooldown_seconds=cooldown)


def _verify_in_thread(verifier: TokenVerifier, token: str) -> tuple[threading.Thread, list[object]]:
    """Start verifying token in a daemon thread; the list receives the Identity or the exception."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(verifier.verify(token, admins=[]))
        except Exception as exc:  # noqa: BLE001 (the test inspects whatever came out)
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_a_slow_drip_refetch_ends_unavailable_and_cached_keys_keep_working(jwks_server: _JwksServer,
                                                                           key: SigningKey) -> None:
    """PyJWKClient's timeout was per read (a JWKS dripping a byte a second never timed out) and it held a lock
    while fetching that every cached-key lookup needed, so one invented kid stalled every request."""
    jwks_server.jwks = {"keys": [key.jwk()]}
    remote = _remote(jwks_server, cooldown=0)
    assert remote.verify(key.sign(), admins=[]).subject == "alice"  # the key set is cached
    jwks_server.drip = True
    jwks_server.requested.clear()
    refetch, refetch_outcome = _verify_in_thread(remote, SigningKey(kid="invented").sign())
    assert jwks_server.requested.wait(30)  # the refetch is in flight
    good, good_outcome = _verify_in_thread(remote, key.sign())
    good.join(timeout=8)  # well inside the fetch deadline: the cached key must not wait for the refetch
    assert [type(o) for o in good_outcome] == [Identity]
    refetch.join(timeout=60)  # generous: the fetch has an overall deadline however slowly bytes drip
    assert not refetch.is_alive()
    assert [type(o) for o in refetch_outcome] == [Unavailable]


def test_a_jwks_server_dripping_its_headers_is_unavailable_within_the_fetch_deadline(jwks_server: _JwksServer,
                                                                                     key: SigningKey) -> None:
    """The fetch deadline was checked only while reading the body: a server sending a header line every second (each
    read well inside the read timeout) held the request, and the fetch lock every later refetch waits on, for ever."""
    jwks_server.drip_headers = True
    fetch, outcome = _verify_in_thread(_remote(jwks_server), key.sign())
    fetch.join(timeout=60)  # generous: the fetch has an overall deadline, its headers included
    assert not fetch.is_alive()
    assert [type(o) for o in outcome] == [Unavailable]


def test_a_failed_fetch_starts_the_refetch_cooldown(jwks_server: _JwksServer, key: SigningKey) -> None:
    """The cooldown only started after a successful fetch: invented kids hammered a failing IdP."""
    jwks_server.status = 500
    remote = _remote(jwks_server)
    invented = [SigningKey(kid=f"invented-{n}").sign() for n in range(5)]
    with pytest.raises(Unavailable):
        remote.verify(key.sign(), admins=[])
    for token in invented:
        with pytest.raises(Unavailable):
            remote.verify(token, admins=[])
    assert jwks_server.hits == 1


@pytest.mark.parametrize("body", [b"[]", b'{"keys": []}', b'{"keys": "none"}', b"<html>login</html>",
                                  b'{"keys": [{"kty": "RSA", "kid": "x"}]}', b'{"keys": ["x"]}', b"enc-only",
                                  b'{"keys": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"kid-list", b"kid-number"],
                         ids=["list", "no-keys", "keys-not-a-list", "html", "no-key-material", "key-not-an-object",
                              "enc-only", "nested-too-deep", "kid-a-list", "kid-a-number"])
def test_a_key_set_without_signing_keys_is_an_unavailable_idp(jwks_server: _JwksServer, key: SigningKey,
                                                              body: bytes) -> None:
    """A JWKS that was not an object, or held no signing keys, was a 401 "unknown signing key" instead of a 503; one
    nested deeper than the JSON parser goes, or whose only key had a list for its kid, was a TypeError or
    RecursionError (a 500)."""
    altered = {b"enc-only": {"use": "enc"}, b"kid-list": {"kid": [key.kid]}, b"kid-number": {"kid": 7}}
    jwks_server.raw = json.dumps({"keys": [{**key.jwk(), **altered[body]}]}).encode() if body in altered else body
    with pytest.raises(Unavailable):
        _remote(jwks_server).verify(key.sign(), admins=[])


def test_keys_without_a_string_kid_are_skipped(jwks_server: _JwksServer, key: SigningKey) -> None:
    """One key whose kid was a list or an object (unhashable) made every fetch of the set a TypeError, a 500."""
    jwks_server.jwks = {"keys": [{**SigningKey().jwk(), "kid": {"id": key.kid}}, {**SigningKey().jwk(), "kid": 7},
                                 key.jwk()]}
    assert _remote(jwks_server).verify(key.sign(), admins=[]).subject == "alice"


def test_keys_that_do_not_parse_are_skipped(jwks_server: _JwksServer, key: SigningKey) -> None:
    """One key missing a member PyJWT reads by index (an `oct` key without `k`) made every fetch of the set a
    KeyError, a 500; one whose alg was not a string made the whole set unusable, a 503."""
    jwks_server.jwks = {"keys": [{"kty": "oct", "kid": "no-k"}, {**SigningKey().jwk(), "kid": "a", "alg": ["RS256"]},
                                 key.jwk()]}
    assert _remote(jwks_server).verify(key.sign(), admins=[]).subject == "alice"


def test_a_jwks_url_that_does_not_parse_is_unavailable(key: SigningKey) -> None:
    """httpx's InvalidURL is no HTTPError: a jwks_uri the IdP's discovery document gave with a broken host was a 500."""
    remote = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, algorithms=ALGORITHMS, jwks_url="https://[::1/jwks")
    with pytest.raises(Unavailable):
        remote.verify(key.sign(), admins=[])


@pytest.mark.parametrize("status", [302, 500])
def test_a_redirect_or_error_from_the_jwks_url_is_unavailable(jwks_server: _JwksServer, key: SigningKey,
                                                               status: int) -> None:
    jwks_server.jwks = {"keys": [key.jwk()]}
    jwks_server.status = status
    with pytest.raises(Unavailable):
        _remote(jwks_server).verify(key.sign(), admins=[])
    assert jwks_server.hits == 1  # the redirect was not followed


def test_an_oversized_jwks_is_unavailable(jwks_server: _JwksServer, key: SigningKey) -> None:
    jwks_server.jwks = {"keys": [key.jwk()], "padding": "x" * (2 * 1024 * 1024)}
    with pytest.raises(Unavailable):
        _remote(jwks_server).verify(key.sign(), admins=[])


def test_constructor_needs_exactly_one_key_source(key: SigningKey) -> None:
    with pytest.raises(ValueError):
        TokenVerifier(issuer=ISSUER, audience=AUDIENCE, algorithms=ALGORITHMS)
    with pytest.raises(ValueError):
        TokenVerifier(
            issuer=ISSUER, audience=AUDIENCE, algorithms=ALGORITHMS, jwks={"keys": [key.jwk()]}, jwks_url="http://x/"
        )


def test_static_jwks_refuses_private_keys(key: SigningKey) -> None:
    private_jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.private, as_dict=True)
    private_jwk.update({"kid": "priv", "use": "sig"})
    with pytest.raises(ValueError):
        TokenVerifier(issuer=ISSUER, audience=AUDIENCE, algorithms=ALGORITHMS, jwks={"keys": [private_jwk]})


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Development settings rooted in tmp_path, independent of the process environment."""
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "env": "development",
        "oidc_issuer": "govrag-dev-issuer",
        "oidc_audience": "govrag",
        "oidc_jwks_url": None,
        "dev_issuer": True,
        "oidc_algorithms": ALGORITHMS,
        "oidc_leeway_seconds": 30,
        "groups_claim": "groups",
    }
    values.update(overrides)
    return Settings(**values)


def test_dev_issuer_key_persists_with_tight_permissions(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    first = DevIssuer.load_or_create(settings.dev_issuer_dir, settings.oidc_issuer, settings.oidc_audience)
    key_file = settings.dev_issuer_dir / "private.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(settings.dev_issuer_dir.stat().st_mode) == 0o700
    second = DevIssuer.load_or_create(settings.dev_issuer_dir, settings.oidc_issuer, settings.oidc_audience)
    assert second.kid == first.kid
    assert [f.name for f in settings.dev_issuer_dir.iterdir()] == ["private.pem"]

    verifier = TokenVerifier.from_settings(settings, second)
    token = first.issue("dev-user", ["admins"])
    assert verifier.verify(token, admins=["group:admins"]) == Identity(
        subject="dev-user", groups=("admins",), is_platform_admin=True
    )
    header = jwt.get_unverified_header(token)
    assert header["kid"] == first.kid
    assert header["alg"] == "RS256"
    claims = jwt.decode(token, options={"verify_signature": False})
    assert set(claims) >= {"iss", "aud", "sub", "groups", "iat", "nbf", "exp", "jti"}


def test_dev_issuer_jwks_is_public_only(tmp_path: Path) -> None:
    issuer = DevIssuer.load_or_create(tmp_path / "dev", "iss", "aud")
    (jwk,) = issuer.jwks()["keys"]
    assert set(jwk) == {"kty", "n", "e", "kid", "alg", "use"}
    assert (jwk["alg"], jwk["use"], jwk["kid"]) == ("RS256", "sig", issuer.kid)
    assert issuer.kid == jwk_thumbprint(jwk)
    assert "private" not in repr(issuer).lower()


def _pkcs8(private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
           encryption: serialization.KeySerializationEncryption) -> bytes:
    return private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


@pytest.mark.parametrize("content", [
    lambda _: b"not a key\n",
    lambda _: _pkcs8(ec.generate_private_key(ec.SECP256R1()), serialization.NoEncryption()),
    lambda key: _pkcs8(key.private, serialization.BestAvailableEncryption(b"a passphrase")),
], ids=["not-pem", "not-rsa", "encrypted"])
def test_a_dev_issuer_key_that_does_not_parse_is_a_path_to_fix(content: Callable[[SigningKey], bytes], key: SigningKey,
                                                               tmp_path: Path) -> None:
    """It exited 1, as a failure, where a master key file that does not parse is a setting to fix, exit 2 (README's
    exit codes); the key is left for the user to remove."""
    key_file = tmp_path / "dev" / "private.pem"
    key_file.parent.mkdir()
    written = content(key)
    key_file.write_bytes(written)
    with pytest.raises(UnusablePath) as refused:
        DevIssuer.load_or_create(key_file.parent, "iss", "aud")
    assert (str(refused.value), refused.value.exit_code) == (
        f"the dev issuer's key {key_file} must hold an unencrypted RSA private key in PEM: remove it and a new one is "
        "made (the tokens the old one signed stop verifying)", 2)
    assert key_file.read_bytes() == written


def test_dev_issuer_rfc7638_thumbprint_vector() -> None:
    jwk = {
        "kty": "RSA",
        "n": (
            "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECP"
            "ebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY"
            "368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0f"
            "M4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
        ),
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_dev_issuer_expired_token_is_rejected(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    issuer = DevIssuer.load_or_create(settings.dev_issuer_dir, settings.oidc_issuer, settings.oidc_audience)
    verifier = TokenVerifier.from_settings(settings, issuer)
    now = int(time.time())
    _rejects(verifier, issuer.issue("u", [], extra_claims={"exp": now - 3600, "iat": now - 7200}), "token expired")


def test_the_dev_issuer_mints_within_the_maximum_lifetime(tmp_path: Path) -> None:
    """Its tokens lived an hour, or any ttl asked, whatever the verifier took: with GOVRAG_TOKEN_MAX_LIFETIME_SECONDS
    under an hour, every token it minted would be refused."""
    settings = _settings(tmp_path, token_max_lifetime_seconds=600)
    issuer = DevIssuer.from_settings(settings)
    verifier = TokenVerifier.from_settings(settings, issuer)
    token = issuer.issue("u", [])
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 600
    assert verifier.verify(token, admins=[]).subject == "u"
    for ttl in (601, 0):
        with pytest.raises(ValueError, match=r"^the lifetime must be 1 to 600 seconds"):
            issuer.issue("u", [], ttl_seconds=ttl)
    now = int(time.time())
    _rejects(verifier, issuer.issue("u", [], extra_claims={"iat": now, "exp": now + 601}),
             "token lifetime exceeds the allowed maximum")


def test_govrag_token_refuses_a_ttl_over_the_maximum_lifetime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`govrag token --ttl` minted a token for any lifetime (one the verifier now refuses), and a ttl of 0 ended in a
    traceback; its default lifetime keeps within the maximum."""
    monkeypatch.setenv("GOVRAG_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("GOVRAG_TOKEN_MAX_LIFETIME_SECONDS", "600")
    get_settings.cache_clear()
    try:
        assert cli.main(["token", "--sub", "alice"]) == 0
        claims = jwt.decode(capsys.readouterr().out.strip(), options={"verify_signature": False})
        refused = {ttl: cli.main(["token", "--sub", "alice", "--ttl", ttl]) for ttl in ("601", "0")}
        said = capsys.readouterr()
    finally:
        get_settings.cache_clear()
    assert claims["exp"] - claims["iat"] == 600
    assert refused == {"601": 2, "0": 2} and said.out == ""
    assert said.err.splitlines() == ["govrag: --ttl refused: the lifetime must be 1 to 600 seconds "
                                     "(GOVRAG_TOKEN_MAX_LIFETIME_SECONDS)"] * 2


@pytest.mark.parametrize("claims", [
    lambda _now: {"iat": -1}, lambda _now: {"iat": 1.5}, lambda _now: {"exp": 10**30}, lambda _now: {"exp": 10**400},
    lambda now: {"iat": now - 2 * 86_400, "nbf": now},  # minted two days ago, valid only from now: still two days
], ids=["negative iat", "float iat", "exp centuries off", "exp past any float", "nbf later than iat"])
def test_a_lifetime_is_bounded_whatever_number_iat_and_exp_are(verifier: TokenVerifier, key: SigningKey,
                                                               claims: Callable[[int], dict[str, Any]]) -> None:
    """exp - iat is read from the claims as PyJWT took them (a float, an int no float holds): a signed token valid
    now whose iat is negative or a float near 0, whose exp is centuries off, or whose nbf is later than its iat,
    lives too long (a 401 with the fixed reason, never a 500); none was refused before."""
    _rejects(verifier, key.sign(claims(int(time.time()))), "token lifetime exceeds the allowed maximum")


def _time_claims_of_other_json_types(now: int) -> dict[str, dict[str, Any]]:
    """Signed claims whose exp, iat or nbf is no JSON number, each naming a time at which the token is valid now."""
    return {"all numeric strings": {"iat": str(now), "nbf": str(now), "exp": str(now + 300)},
            "exp a string with spaces and underscores": {"exp": f" {now + 300:_} "},
            "iat false": {"iat": False}, "iat a numeric string": {"iat": "-86400"}, "nbf true": {"nbf": True},
            "nbf a string": {"nbf": "0"}, "exp NaN": {"exp": math.nan}, "exp infinite": {"exp": math.inf},
            "iat infinite": {"iat": math.inf}, "nbf minus infinity": {"nbf": -math.inf}, "exp a list": {"exp": [now]}}


@pytest.mark.parametrize("name", list(_time_claims_of_other_json_types(0)))
def test_a_time_claim_must_be_a_json_number(verifier: TokenVerifier, key: SigningKey, name: str) -> None:
    """RFC 7519's NumericDate is a JSON number, but PyJWT took whatever int() takes: a string of digits (spaces and
    underscores too) or a boolean; a token whose exp, iat and nbf were strings, or whose nbf was true, was a caller.
    Each is a 401 "malformed token" (as PyJWT's refusal of a NaN, an infinity or a list is), never a 500."""
    _rejects(verifier, key.sign(_time_claims_of_other_json_types(int(time.time()))[name]), "malformed token")


def test_a_time_claim_may_be_any_json_number(verifier: TokenVerifier, key: SigningKey) -> None:
    now = int(time.time())
    numbers = {"iat": float(now), "nbf": now - 0.5, "exp": now + 300.25}
    assert verifier.verify(key.sign(numbers), admins=[]).subject == "alice"


@pytest.mark.parametrize("typ", ["ID", "Refresh", "Offline", "Logout", "DPoP", "id", "Serialized-ID", ""])
def test_a_payload_typ_naming_another_kind_of_token_is_refused(verifier: TokenVerifier, key: SigningKey,
                                                              typ: object) -> None:
    """Keycloak names the kind of token in a payload claim `typ` and signs its ID, refresh, offline and logout tokens
    with its access tokens' keys; only the audience kept an ID token out (and not where the API's audience is the
    client's id). Any typ but an access token's is now refused, with a fixed reason."""
    _rejects(verifier, key.sign({"typ": typ}), "not an access token (token type)")


@pytest.mark.parametrize("typ", ["Bearer", "bearer", "at+jwt", None])
def test_an_access_tokens_payload_typ_is_taken(verifier: TokenVerifier, key: SigningKey, typ: str | None) -> None:
    """Keycloak's access token says "Bearer"; most IdPs' say nothing."""
    token = key.sign({"typ": typ} if typ else {})
    assert verifier.verify(token, admins=[]).subject == "alice"


def _signed_with_header(key: SigningKey, header: dict[str, Any], claims: dict[str, Any] | None = None) -> str:
    """A token of `key.sign(claims)`'s claims under exactly `header` (PyJWT leaves out a typ of null), signed RS256."""
    payload = jwt.decode(key.sign(claims), options={"verify_signature": False})
    signing_input = f"{_segment({'alg': 'RS256', 'kid': key.kid, **header})}.{_segment(payload)}".encode("ascii")
    signature = jwt.algorithms.RSAAlgorithm(jwt.algorithms.RSAAlgorithm.SHA256).sign(signing_input, key.private)
    return f"{signing_input.decode('ascii')}.{_b64url(signature)}"


@pytest.mark.parametrize(("where", "fields"), [
    ("payload", {"typ": None}), ("payload", {"typ": 7}), ("payload", {"typ": ["Bearer"]}), ("payload", {"typ": {}}),
    ("payload", {"typ": True}), ("payload", {"token_use": None}), ("payload", {"token_use": ["access"]}),
    ("payload", {"token_use": 1}), ("header", {"typ": None}), ("header", {"typ": 7}), ("header", {"typ": ["JWT"]})])
def test_a_typ_or_token_use_that_is_no_string_is_a_malformed_token(verifier: TokenVerifier, key: SigningKey,
                                                                   where: str, fields: dict[str, Any]) -> None:
    """A `"typ": null` was read as no typ, and the token taken; a typ that was a number or a list was "not an access
    token". No IdP writes either: each is a 401 "malformed token" (an absent typ is still taken)."""
    token = key.sign(fields) if where == "payload" else _signed_with_header(key, fields)
    _rejects(verifier, token, "malformed token")


def _cognito(token_use: str, key: SigningKey) -> str:
    """A token shaped as an AWS Cognito user pool signs it (no typ; the kind in `token_use`), its aud this API's."""
    return key.sign({"token_use": token_use, "cognito:username": "alice", "cognito:groups": ["eng"],
                     "origin_jti": "o-1", "event_id": "e-1", "auth_time": int(time.time()), "client_id": AUDIENCE})


@pytest.mark.parametrize("token_use", ["id", "ID", "refresh", "", "access ", "Access"])
def test_a_cognito_token_whose_token_use_is_not_access_is_refused(verifier: TokenVerifier, key: SigningKey,
                                                                   token_use: str) -> None:
    """Cognito writes no typ: its ID token says `"token_use": "id"`, and an API whose audience is the app client's id
    (what an ID token's aud is) took it as a caller. Any token_use but "access" is refused as Keycloak's ID token is
    by its typ; one saying "access" with this API's aud is taken (Cognito's own access tokens carry no aud: refused,
    as any token without one)."""
    _rejects(verifier, _cognito(token_use, key), "not an access token (token type)")
    assert verifier.verify(_cognito("access", key), admins=[]).subject == "alice"
    payload = jwt.decode(_cognito("access", key), options={"verify_signature": False})
    _rejects(verifier, key.sign(payload, drop=("aud",)), "missing required claim")


COGNITO_CLIENT = "5u9a1cognitoappclient"


_LEFT_OUT = object()  # an override leaving a claim out (None is a JSON null)


def _cognito_access(key: SigningKey, **overrides: Any) -> str:
    """An access token as a Cognito user pool signs it: no aud, no nbf, no typ; the app client in client_id, the kind
    in token_use, the groups in cognito:groups."""
    now = int(time.time())
    claims: dict[str, Any] = {"token_use": "access", "client_id": COGNITO_CLIENT, "username": "alice",
                              "cognito:groups": ["eng"], "scope": "aws.cognito.signin.user.admin", "auth_time": now,
                              "origin_jti": "o-1", "event_id": "e-1", **overrides}
    left_out = [name for name, value in claims.items() if value is _LEFT_OUT]
    if "aud" not in overrides:
        left_out.append("aud")
    return key.sign({k: v for k, v in claims.items() if v is not _LEFT_OUT}, drop=("nbf", *left_out))


def _cognito_verifier(key: SigningKey, client_ids: list[str]) -> TokenVerifier:
    return TokenVerifier(issuer=ISSUER, audience=AUDIENCE, algorithms=ALGORITHMS, jwks={"keys": [key.jwk()]},
                         groups_claim="cognito:groups", cognito_client_ids=client_ids)


def test_a_cognito_access_token_of_a_listed_app_client_is_taken(key: SigningKey) -> None:
    """Cognito's access tokens carry no aud (its app client is in client_id): no Cognito user pool could be used. With
    the app client listed (GOVRAG_OIDC_COGNITO_CLIENT_IDS) its access token is a caller; by default it is not."""
    identity = _cognito_verifier(key, [COGNITO_CLIENT, "another-client"]).verify(_cognito_access(key), admins=[])
    assert (identity.subject, identity.groups) == ("alice", ("eng",))
    _rejects(_cognito_verifier(key, []), _cognito_access(key), "missing required claim")


_COGNITO_REFUSALS: dict[str, tuple[dict[str, Any], str]] = {
    "an ID token (aud this API's)": ({"token_use": "id", "aud": AUDIENCE, "client_id": _LEFT_OUT},
                                     "not an access token (token type)"),
    "an ID token without aud": ({"token_use": "id"}, "not an access token (token type)"),
    "another app client": ({"client_id": "someone-elses-client"}, "token issued to another client"),
    "a client_id in another case": ({"client_id": COGNITO_CLIENT.upper()}, "token issued to another client"),
    "no client_id": ({"client_id": _LEFT_OUT}, "missing required claim"),
    "a client_id of null": ({"client_id": None}, "malformed token"),
    "a client_id that is no string": ({"client_id": [COGNITO_CLIENT]}, "malformed token"),
    "no token_use": ({"token_use": _LEFT_OUT}, "missing required claim"),
    "an aud of another API": ({"aud": "another-api"}, "invalid audience"),
    "an aud naming the app client": ({"aud": COGNITO_CLIENT}, "invalid audience"),
    "an aud of null": ({"aud": None}, "missing required claim"),
    "an empty aud": ({"aud": []}, "missing required claim"),
    "another issuer": ({"iss": "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_other"}, "invalid issuer"),
}


@pytest.mark.parametrize("case", list(_COGNITO_REFUSALS))
def test_with_cognito_app_clients_listed_only_their_access_tokens_go_without_aud(key: SigningKey, case: str) -> None:
    """Listing app clients lets a token without aud through only as an access token (token_use "access") naming one
    of them in client_id; an ID token, another client, a token with an aud that is not this API's, is refused."""
    overrides, reason = _COGNITO_REFUSALS[case]
    _rejects(_cognito_verifier(key, [COGNITO_CLIENT]), _cognito_access(key, **overrides), reason)


def test_with_cognito_app_clients_listed_other_idps_tokens_are_checked_as_before(key: SigningKey) -> None:
    """The list changes nothing for a token with an aud: this API's is taken, any other refused."""
    verifier = _cognito_verifier(key, [COGNITO_CLIENT])
    assert verifier.verify(key.sign(), admins=[]).subject == "alice"
    _rejects(verifier, key.sign({"aud": COGNITO_CLIENT}), "invalid audience")
    _rejects(verifier, key.sign(drop=("aud",)), "missing required claim")


def test_a_cognito_token_is_read_once_before_its_signature_is_checked(key: SigningKey,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """With app clients listed, a token was split and decoded three times: its header read, its payload read unverified
    (is there an aud?), then the signed decode. The header and the payload are read together once, then the signed
    decode: PyJWT's reading of a token (PyJWS._load, spied on and called through) runs twice."""
    reads: list[object] = []
    real_load = jwt.api_jws.PyJWS._load

    def counted(self: jwt.api_jws.PyJWS, token: str | bytes) -> object:
        reads.append(token)
        return real_load(self, token)

    monkeypatch.setattr(jwt.api_jws.PyJWS, "_load", counted)
    assert _cognito_verifier(key, [COGNITO_CLIENT]).verify(_cognito_access(key), admins=[]).subject == "alice"
    assert len(reads) == 2


# Access tokens as each IdP signs them (header beyond alg and kid; payload beyond iss, aud, sub, iat, nbf, exp, jti).
_REAL_ACCESS_TOKENS = {
    "keycloak": ({"typ": "JWT"}, {"typ": "Bearer", "azp": "govrag-web", "sid": "s-1", "scope": "openid email",
                                  "realm_access": {"roles": ["offline_access"]}, "preferred_username": "alice"}),
    "entra-v2": ({"typ": "JWT", "x5t": "x5t-1"}, {"ver": "2.0", "azp": "c-1", "azpacr": "1", "oid": "o-1",
                                                 "tid": "t-1", "scp": "access_as_user", "uti": "u-1", "rh": "r"}),
    "entra-v1": ({"typ": "JWT", "x5t": "x5t-1"}, {"ver": "1.0", "appid": "c-1", "appidacr": "1", "oid": "o-1",
                                                 "tid": "t-1", "scp": "user_impersonation", "unique_name": "alice"}),
    "okta": ({}, {"ver": 1, "cid": "c-1", "uid": "u-1", "scp": ["openid"], "auth_time": 1700000000}),
    "auth0": ({"typ": "at+jwt"}, {"aud": [AUDIENCE, "https://tenant.auth0.com/userinfo"], "azp": "c-1",
                                  "scope": "openid read:documents", "permissions": ["read"]}),
    "auth0-legacy": ({"typ": "JWT"}, {"azp": "c-1", "scope": "openid", "gty": "password"}),
}


@pytest.mark.parametrize("idp", sorted(_REAL_ACCESS_TOKENS))
def test_the_access_tokens_of_real_idps_are_taken(verifier: TokenVerifier, key: SigningKey, idp: str) -> None:
    """The typ and token_use checks refuse what says it is no access token, or is malformed; the access tokens of
    Keycloak (payload typ "Bearer"), Entra (v1 and v2), Okta (no typ at all) and Auth0 ("at+jwt" or "JWT") say
    neither, and are still taken."""
    header, claims = _REAL_ACCESS_TOKENS[idp]
    assert verifier.verify(_signed_with_header(key, header, claims), admins=[]).subject == "alice"


def test_the_dev_issuer_id_token_is_refused_and_its_access_token_taken(tmp_path: Path) -> None:
    """The same keys, issuer and audience: the payload's typ alone tells an ID token from an access token."""
    issuer = DevIssuer.load_or_create(tmp_path / "dev", ISSUER, AUDIENCE)
    verifier = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, algorithms=["RS256"], jwks=issuer.jwks())
    _rejects(verifier, issuer.issue("u", [], extra_claims={"typ": "ID"}), "not an access token (token type)")
    assert verifier.verify(issuer.issue("u", [], extra_claims={"typ": "Bearer"}), admins=[]).subject == "u"
    assert verifier.verify(issuer.issue("u", []), admins=[]).subject == "u"  # what `govrag token` mints


@pytest.mark.parametrize("value", [0, 59, 7 * 86_400 + 1, 10 * 365 * 86_400])
def test_settings_refuse_a_maximum_token_lifetime_out_of_range(tmp_path: Path, value: int) -> None:
    """A minute to a week: less would refuse every IdP's tokens (a value meant in minutes or hours, say), more lets a
    token be a standing credential. There was no such setting: no lifetime was ever refused."""
    with pytest.raises(ValidationError, match="token_max_lifetime_seconds"):
        _settings(tmp_path, token_max_lifetime_seconds=value)


@pytest.mark.parametrize(("setting", "value"), [("oidc_leeway_seconds", 86_400), ("oidc_leeway_seconds", -5),
                                                ("oidc_jwks_refetch_cooldown_seconds", 0),
                                                ("oidc_jwks_refetch_cooldown_seconds", -1)])
def test_settings_refuse_a_leeway_or_refetch_cooldown_that_defeats_its_purpose(tmp_path: Path, setting: str,
                                                                               value: int) -> None:
    """A day of leeway accepted tokens a day after they expired, and a cooldown of 0 let every invented kid refetch
    the JWK Set from the IdP: both started without a word."""
    with pytest.raises(ValidationError, match=setting):
        _settings(tmp_path, **{setting: value})


def test_from_settings_key_sources(tmp_path: Path) -> None:
    issuer = DevIssuer.load_or_create(tmp_path / "dev", "govrag-dev-issuer", "govrag")
    with pytest.raises(ValueError):
        TokenVerifier.from_settings(_settings(tmp_path, dev_issuer=False), issuer)
    with pytest.raises(ValueError):
        TokenVerifier.from_settings(_settings(tmp_path), None)
    remote = TokenVerifier.from_settings(_settings(tmp_path, oidc_jwks_url="https://idp.example.test/jwks"), issuer)
    assert isinstance(remote, TokenVerifier)


@pytest.mark.parametrize("overrides", [{"oidc_issuer": "someone-else"}, {"oidc_audience": "another-api"}])
def test_a_dev_issuer_for_another_issuer_or_audience_is_a_start_refusal(tmp_path: Path,
                                                                        overrides: dict[str, str]) -> None:
    """A ValueError, a traceback at start; now a setting to fix said in one line (exit 2), as every refusal of the
    verifier's settings (`govrag serve` loads its dev issuer from the same settings, so it never meets this one)."""
    issuer = DevIssuer.load_or_create(tmp_path / "dev", "govrag-dev-issuer", "govrag")
    with pytest.raises(StartRefused) as refused:
        TokenVerifier.from_settings(_settings(tmp_path, **overrides), issuer)
    assert str(refused.value) == ("the dev issuer's issuer/audience differ from GOVRAG_OIDC_ISSUER/"
                                  "GOVRAG_OIDC_AUDIENCE")
    assert refused.value.exit_code == 2


def test_cognito_app_clients_are_read_from_the_settings(tmp_path: Path, key: SigningKey,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """GOVRAG_OIDC_COGNITO_CLIENT_IDS (a JSON list) reaches the verifier; unset, no token without aud is taken."""
    _idp_answering(monkeypatch, lambda _request: _as_received(httpx.Response(200, json={"keys": [key.jwk()]})))
    remote = {"oidc_jwks_url": "https://idp.example.test/keys", "oidc_issuer": ISSUER, "oidc_audience": AUDIENCE,
              "dev_issuer": False, "groups_claim": "cognito:groups"}
    monkeypatch.setenv("GOVRAG_OIDC_COGNITO_CLIENT_IDS", f'["{COGNITO_CLIENT}"]')
    listed = TokenVerifier.from_settings(_settings(tmp_path, **remote), None)
    assert listed.verify(_cognito_access(key), admins=[]).groups == ("eng",)
    monkeypatch.delenv("GOVRAG_OIDC_COGNITO_CLIENT_IDS")
    _rejects(TokenVerifier.from_settings(_settings(tmp_path, **remote), None), _cognito_access(key),
             "missing required claim")


@pytest.mark.parametrize("client_ids", [[""], [" "], ["app client"], [f" {COGNITO_CLIENT}"], ["client\x00"]])
def test_settings_refuse_a_cognito_app_client_id_no_token_can_name(tmp_path: Path, client_ids: list[str]) -> None:
    with pytest.raises(ValidationError, match="oidc_cognito_client_ids") as refused:
        _settings(tmp_path, oidc_cognito_client_ids=client_ids)
    assert "must list Cognito app client ids, none empty or holding spaces" in str(refused.value)


def test_a_jwks_url_that_is_not_http_is_refused_at_start(tmp_path: Path) -> None:
    """It was taken with a warning (not https), then every token was a 503 no retry could end."""
    with pytest.raises(ValueError, match="GOVRAG_OIDC_JWKS_URL is not an http"):
        TokenVerifier.from_settings(_settings(tmp_path, oidc_jwks_url="file:///etc/jwks.json"), None)


@pytest.mark.parametrize(("setting", "url"), [
    ("oidc_jwks_url", "https:/idp.example.test/keys"), ("oidc_jwks_url", "https:///keys"),
    ("oidc_jwks_url", " https://idp.example.test/keys"), ("oidc_issuer", "https:idp.example.test/realms/x")])
def test_an_idp_url_without_a_host_is_refused_at_start(tmp_path: Path, setting: str, url: str) -> None:
    """A slash short (or a space before it) and the URL has no host as the fetch reads it: it was taken, then every
    token was a 503 no retry could end. Refused at start as a URL that is not http(s), named, never quoted."""
    with pytest.raises(StartRefused) as refused:  # said in one line by `govrag serve`, exit 2
        TokenVerifier.from_settings(_settings(tmp_path, dev_issuer=False, **{setting: url}), None)
    assert str(refused.value) == f"GOVRAG_{setting.upper()} is not an http(s) URL with a host"
    assert refused.value.exit_code == 2


def _as_received(made: httpx.Response) -> httpx.Response:
    """`made` as a server's response arrives, its body still to read (one made with content= is read already)."""
    return httpx.Response(made.status_code, headers=made.headers, stream=httpx.ByteStream(made.content))


@pytest.mark.parametrize(("env", "jwks_scheme", "verifies"), [("development", "http", True),
                                                              ("production", "https", True),
                                                              ("production", "http", False),
                                                              ("production", "HTTP", False)])
def test_a_plain_http_jwks_uri_from_discovery_is_refused_in_production(
        tmp_path: Path, key: SigningKey, monkeypatch: pytest.MonkeyPatch, env: str, jwks_scheme: str,
        verifies: bool) -> None:
    """Production needs an https issuer for discovery, yet the jwks_uri its document named could be plain http (only
    a warning): the keys, fetched in clear, could be substituted. Now that is a 503, as any unusable IdP answer.
    The IdP is outside the boundary: an httpx MockTransport answers for it, over https as a real one would."""
    jwks_uri = f"{jwks_scheme}://idp.example.test/keys"

    def idp(request: httpx.Request) -> httpx.Response:
        if str(request.url) == f"{ISSUER}/.well-known/openid-configuration":
            return _as_received(httpx.Response(200, json={"issuer": ISSUER, "jwks_uri": jwks_uri}))
        if request.url == httpx.URL(jwks_uri):
            return _as_received(httpx.Response(200, json={"keys": [key.jwk()]}))
        return httpx.Response(404)

    monkeypatch.setattr(httpx, "AsyncClient", functools.partial(httpx.AsyncClient, transport=httpx.MockTransport(idp)))
    environment = production_settings(oidc_jwks_url=None) if env == "production" else {"dev_issuer": "false"}
    settings = _settings(tmp_path, oidc_issuer=ISSUER, oidc_audience=AUDIENCE, **environment)
    verifier = TokenVerifier.from_settings(settings, None)
    if verifies:
        assert verifier.verify(key.sign(), admins=[]).subject == "alice"
    else:
        with pytest.raises(Unavailable) as caught:
            verifier.verify(key.sign(), admins=[])
        assert caught.value.dependency == "identity provider"


NOT_HTTP = "is not an http(s) URL with a host"
NO_PORT = "names a port that is not a number from 1 to 65535"


@pytest.mark.parametrize(("jwks_uri", "why"), [
    ("http://idp.example.test]/keys", NOT_HTTP), ("https://idp.example.test]:99999/keys", NOT_HTTP),
    ("https://idp.example.test]:+443/keys", NOT_HTTP), ("https://[2001:db8::1]8443/keys", NO_PORT),
    ("https://[2001:db8::1]99999/keys", NO_PORT)])
def test_a_discovered_jwks_uri_httpx_reads_otherwise_than_the_settings_is_never_fetched(
        tmp_path: Path, key: SigningKey, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        jwks_uri: str, why: str) -> None:
    """The port and https checks read a URL as the settings do (urlsplit), the fetch as httpx does. A stray `]` after
    the host: urlsplit refuses the URL, httpx reads it (the host as `idp.example.test%5D`), and the checks took one they
    could not read as nothing to check. Text after an IPv6 host's `]` with no `:`: httpx reads it as the port, urlsplit
    as none. Either way the keys were fetched (in production over plain http, or from the port httpx read) and tokens
    verified with them. Such a jwks_uri is now an unusable IdP answer, a 503, nothing fetched; as GOVRAG_OIDC_JWKS_URL
    it is refused at start."""
    asked: list[str] = []

    def idp(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        if request.url.path.endswith("/.well-known/openid-configuration"):
            return _as_received(httpx.Response(200, json={"issuer": ISSUER, "jwks_uri": jwks_uri}))
        return _as_received(httpx.Response(200, json={"keys": [key.jwk()]}))

    _idp_answering(monkeypatch, idp)
    production = production_settings(oidc_jwks_url=None)
    verifier = TokenVerifier.from_settings(_settings(tmp_path, oidc_issuer=ISSUER, oidc_audience=AUDIENCE,
                                                     **production), None)
    with pytest.raises(Unavailable):
        verifier.verify(key.sign(), admins=[])
    assert asked == ["/realms/govrag/.well-known/openid-configuration"]
    assert f"could not be fetched: the discovered jwks_uri {why}" in caplog.text
    with pytest.raises((StartRefused, ValidationError), match=re.escape(why)):
        TokenVerifier.from_settings(_settings(tmp_path, dev_issuer=False, oidc_jwks_url=jwks_uri), None)


def _idp_answering(monkeypatch: pytest.MonkeyPatch, answer: Callable[[httpx.Request], httpx.Response]) -> None:
    """The IdP (outside the boundary) answered by an httpx MockTransport, as in the test above."""
    monkeypatch.setattr(httpx, "AsyncClient",
                        functools.partial(httpx.AsyncClient, transport=httpx.MockTransport(answer)))


def test_a_discovered_jwks_uri_with_credentials_is_never_fetched(tmp_path: Path, key: SigningKey,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A discovery document naming `https://user:password@host/keys` had the keys fetched with those credentials sent
    as a Basic Authorization header. The URL is refused before connecting: the IdP is unavailable, a 503, and the
    log line names no credential."""
    asked: list[str] = []

    def idp(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        if request.url.path.endswith("/.well-known/openid-configuration"):
            return _as_received(httpx.Response(200, json={"issuer": ISSUER,
                                                          "jwks_uri": "https://idp:s3cret@idp.example.test/keys"}))
        return _as_received(httpx.Response(200, json={"keys": [key.jwk()]}))

    _idp_answering(monkeypatch, idp)
    verifier = TokenVerifier.from_settings(_settings(tmp_path, oidc_issuer=ISSUER, oidc_audience=AUDIENCE,
                                                     dev_issuer=False), None)
    with pytest.raises(Unavailable):
        verifier.verify(key.sign(), admins=[])
    assert asked == ["/realms/govrag/.well-known/openid-configuration"]
    assert "s3cret" not in caplog.text and "could not be fetched" in caplog.text


def test_an_idp_answer_in_an_encoding_not_asked_for_writes_nothing_of_it_to_the_log(
        tmp_path: Path, key: SigningKey, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The log line quoted the JWKS answer's Content-Encoding (40 characters of it): a hostile or broken server wrote
    into govrag's log. The line says a fixed category."""

    def idp(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Encoding": "x-forged admin=granted"},
                              stream=httpx.ByteStream(b"{}"))

    _idp_answering(monkeypatch, idp)
    verifier = TokenVerifier.from_settings(_settings(tmp_path, oidc_jwks_url="https://idp.example.test/keys",
                                                     dev_issuer=False), None)
    with pytest.raises(Unavailable):
        verifier.verify(key.sign(), admins=[])
    assert "x-forged" not in caplog.text and "admin=granted" not in caplog.text
    assert ("the identity provider's signing keys could not be fetched: a Content-Encoding that was not asked for"
            in caplog.text)
