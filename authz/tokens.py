"""Bearer-token verification against a JWKS: an OIDC provider's URL or the dev issuer's keys.

Failures raise GovragError(unauthenticated) with a short fixed reason. Nothing derived from
the token (not even its kid) goes into a message or a log line, and library exceptions are
not chained, because their text can quote token parts.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from authz.dev_issuer import DevIssuer
from authz.identity import MAX_SUBJECT_CHARS, RESERVED_PREFIXES, Identity, is_platform_admin, token_can_carry
from core import forksafe
from core.errors import ErrorCode, GovragError, StartRefused, Unavailable
from core.http import CredentialsInURL, ThreadSessions, UnusablePort, URLRefused, api_url
from core.settings import (
    DEFAULT_TOKEN_MAX_LIFETIME_SECONDS,
    Settings,
    url_scheme,
)

log = logging.getLogger(__name__)

_RSA = (rsa.RSAPublicKey,)
_EC = (ec.EllipticCurvePublicKey,)
_OKP = (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)

# The only algorithms ever accepted, each with the public-key types it may verify with.
# "none" and HS* are absent on purpose: a verifier that holds only public keys must never
# accept a symmetric or unsigned token (alg-confusion attacks).
_KEY_TYPES_BY_ALG: dict[str, tuple[type, ...]] = {
    "RS256": _RSA,
    "RS384": _RSA,
    "RS512": _RSA,
    "PS256": _RSA,
    "PS384": _RSA,
    "PS512": _RSA,
    "ES256": _EC,
    "ES256K": _EC,
    "ES384": _EC,
    "ES512": _EC,
    "EdDSA": _OKP,
}
# the subject claim is configurable and checked after decoding; iat bounds the token's lifetime
_REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud"]
# a Cognito access token's: its app client is in client_id, checked after decoding (_require_cognito_client)
_REQUIRED_COGNITO_CLAIMS = ["exp", "iat", "iss"]
# The `typ` of an access token, in its header (RFC 9068 2.1: "at+jwt"; most IdPs send "JWT" or none) or its payload
# (Keycloak's "Bearer"), compared in lower case without an "application/" prefix (RFC 7515 4.1.9). Any other typ names
# another kind of JWT the IdP may sign with the same keys: in the header a logout token "logout+jwt", a DPoP proof
# "dpop+jwt", a security event "secevent+jwt"; in Keycloak's payload an ID, refresh, offline or logout token ("ID",
# "Refresh", "Offline", "Logout"), or an access token bound to a key ("DPoP": govrag does not check the DPoP proof
# that must come with it). Never a caller.
_ACCESS_TOKEN_TYPES = frozenset({"jwt", "at+jwt", "bearer"})
# AWS Cognito names the kind in a payload claim `token_use` instead: "access", or "id" for its ID token, signed with the
# same keys (its aud the app client's id: an API whose audience is that id took it as a caller). Its access tokens carry
# no aud but the app client's id in `client_id`: a caller only when that client is listed
# (GOVRAG_OIDC_COGNITO_CLIENT_IDS).
_COGNITO_ACCESS = "access"
# The claims that are NumericDates (RFC 7519 2: a JSON number). PyJWT takes whatever int() takes: a string of digits
# ("1700000000", " 1_700_000_000 "), a boolean (true is 1).
_TIME_CLAIMS = ("exp", "iat", "nbf")
_DISCOVERY_PATH = "/.well-known/openid-configuration"
_MAX_TOKEN_CHARS = 16 * 1024
# A fetch from the IdP (discovery document or JWK Set) gets this long in all, headers included, however slowly the
# bytes drip, and at most this many bytes: a slow or hostile IdP cannot hold a request, or the key cache, for longer.
_FETCH_DEADLINE_SECONDS = 10.0
_MAX_FETCH_BYTES = 1024 * 1024


class VerifierSettingsRefused(StartRefused, ValueError):
    """Token-verifier settings it cannot start with (no key source, no asymmetric algorithm, an IdP URL it will not
    fetch): the settings named, never a value, a key or a token; a setting to fix, said in one line at start (exit
    2)."""

    exit_code = 2


class IdPURLRefused(VerifierSettingsRefused):
    """An IdP URL govrag will not fetch, named but never quoted: at start a setting to fix; a discovered one is an
    unusable IdP answer (a ValueError, as any)."""


def _fail(reason: str) -> GovragError:
    """An unauthenticated error carrying a fixed reason (never token content)."""
    return GovragError(ErrorCode.unauthenticated, reason)


def bearer_token(authorization_header: str | None) -> str:
    """The token from an "Authorization: Bearer <token>" header value."""
    if not authorization_header:
        raise _fail("missing bearer token")
    scheme, _, token = authorization_header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or any(c.isspace() for c in token):
        raise _fail("missing bearer token")
    return token


class TokenVerifier:
    """Verifies asymmetric-signed JWTs against one JWKS (a URL or an in-memory set)."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        algorithms: Iterable[str],
        leeway_seconds: int = 30,
        max_lifetime_seconds: int = DEFAULT_TOKEN_MAX_LIFETIME_SECONDS,
        groups_claim: str = "groups",
        subject_claim: str = "sub",
        email_claim: str = "email",
        required_azp: str | None = None,
        cognito_client_ids: Iterable[str] = (),
        jwks_url: str | Callable[[ThreadSessions], str] | None = None,
        jwks: dict[str, Any] | None = None,
        jwks_cache_seconds: float = 300.0,
        jwks_refresh_cooldown_seconds: float = 30.0,
    ) -> None:
        """Give exactly one of jwks_url (or a function finding it on first use, fetching over the sessions it is
        given) or jwks.

        Symmetric and "none" algorithms are dropped.
        """
        if (jwks_url is None) == (jwks is None):
            raise ValueError("give exactly one of jwks_url or jwks")
        self._algorithms = _asymmetric_only(algorithms)
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_seconds
        self._max_lifetime = max_lifetime_seconds
        self._groups_claim = groups_claim
        self._subject_claim = subject_claim
        self._email_claim = email_claim
        self._required_azp = required_azp
        self._cognito_client_ids = frozenset(cognito_client_ids)
        self._remote_keys: _RemoteKeySet | None = None
        self._static_keys: dict[str, _PublishedKey] = {}
        if jwks is None:
            self._remote_keys = _RemoteKeySet(
                jwks_url if callable(jwks_url) else lambda _idp: jwks_url,
                cache_seconds=jwks_cache_seconds,
                cooldown_seconds=jwks_refresh_cooldown_seconds,
            )
        else:
            self._static_keys = _static_signing_keys(jwks)

    def close(self) -> None:
        """Close the connections to the IdP (and their event loops) that fetching its keys opened, once a fetch in
        flight ended: the API's stop does, never on an event loop (`ThreadSessions.close` leaves them then). Keys needed
        from the IdP after it are Unavailable (a request racing the stop: a 503, never a connection left open)."""
        if self._remote_keys is not None:
            self._remote_keys.close()

    @classmethod
    def from_settings(cls, settings: Settings, dev_issuer: DevIssuer | None) -> TokenVerifier:
        """The OIDC provider's JWKS URL if configured, else the dev issuer's keys if enabled."""
        jwks_url, production = settings.oidc_jwks_url, settings.is_production
        if jwks_url:
            _check_idp_url(jwks_url, "GOVRAG_OIDC_JWKS_URL", production=production)
            return cls(jwks_url=jwks_url, **_common_options(settings))
        if settings.oidc_discovery and (not settings.dev_issuer or production):
            _check_idp_url(settings.oidc_issuer, "GOVRAG_OIDC_ISSUER", production=production)
            # on first use, so an IdP that is down at start-up is a 503 that recovers, not an API that won't start
            return cls(jwks_url=lambda idp: discover_jwks_uri(settings.oidc_issuer, idp, production=production),
                       **_common_options(settings))
        if not settings.dev_issuer or settings.is_production:  # production's settings refuse this case already
            raise VerifierSettingsRefused(
                "no token keys: GOVRAG_OIDC_JWKS_URL is unset and GOVRAG_OIDC_DISCOVERY and GOVRAG_DEV_ISSUER are false"
                " (set GOVRAG_OIDC_JWKS_URL, or GOVRAG_OIDC_DISCOVERY=true with GOVRAG_OIDC_ISSUER; "
                "GOVRAG_DEV_ISSUER=true in development)")
        if dev_issuer is None:  # the caller's mistake, no setting's: create_app loads one whenever the setting is true
            raise ValueError("GOVRAG_DEV_ISSUER is true but no dev issuer was loaded")
        if (dev_issuer.issuer, dev_issuer.audience) != (settings.oidc_issuer, settings.oidc_audience):
            raise VerifierSettingsRefused("the dev issuer's issuer/audience differ from GOVRAG_OIDC_ISSUER/"
                                          "GOVRAG_OIDC_AUDIENCE")
        return cls(jwks=dev_issuer.jwks(), **_common_options(settings))

    def verify(self, token: str, admins: list[str]) -> Identity:
        """Verify a compact JWS and return the caller's Identity, or raise unauthenticated."""
        alg, kid, holds_no_audience = self._read_unverified(token)
        key = self._signing_key(kid)
        # the audience goes unchecked only where Cognito app clients are listed and the payload has no aud: then the
        # token must name one of them, decided by the same flag that skipped the check (never re-read from claims);
        # the signed decode then refuses any aud (PyJWT given no audience), so the unverified read cannot let one by
        without_audience = bool(self._cognito_client_ids) and holds_no_audience
        claims = self._decode(token, alg, key, without_audience=without_audience)
        _require_access_token(claims, ("typ", "token_use"))
        if without_audience:
            self._require_cognito_client(claims)
        if not all(_is_numeric_date(claims[name]) for name in _TIME_CLAIMS if name in claims):
            raise _fail("malformed token")  # as PyJWT says of a NaN, an infinity or a list
        # both read as PyJWT read them when it checked them; the lifetime is the token's own, no clock leeway in it
        if int(claims["exp"]) - int(claims["iat"]) > self._max_lifetime:
            raise _fail("token lifetime exceeds the allowed maximum")
        if self._required_azp is not None and claims.get("azp", self._required_azp) != self._required_azp:
            raise _fail("token issued to another client")
        subject = _subject(claim_at(claims, self._subject_claim))
        groups = _groups(claim_at(claims, self._groups_claim))
        email = claim_at(claims, self._email_claim)
        return Identity(subject=subject, groups=groups, is_platform_admin=is_platform_admin(subject, groups, admins),
                        email=email if isinstance(email, str) and email.isprintable() else None)

    def _read_unverified(self, token: str) -> tuple[str, str, bool]:
        """The header's alg and kid, checked against the allowlist before any crypto, and whether the payload has no
        aud at all: the token read once before its signature is checked, only to choose the key and how to check it."""
        if isinstance(token, str) and len(token) > _MAX_TOKEN_CHARS:  # e.g. a groups claim of thousands of groups
            raise _fail(f"token too large (over {_MAX_TOKEN_CHARS} characters)")
        if not isinstance(token, str) or not token or token.count(".") != 2:
            raise _fail("malformed token")
        try:
            unverified = jwt.decode_complete(token, options={"verify_signature": False})
        except (jwt.PyJWTError, ValueError, TypeError):
            raise _fail("malformed token") from None
        header = unverified["header"]
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise _fail("unsupported token algorithm")
        _require_access_token(header, ("typ",))
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _fail("unknown signing key")
        return alg, kid, "aud" not in unverified["payload"]

    def _signing_key(self, kid: str) -> _PublishedKey:
        """The JWK for kid, from the in-memory set or the (cached) JWKS endpoint."""
        keys = self._static_keys if self._remote_keys is None else self._remote_keys.keys_for(kid)
        key = keys.get(kid)
        if key is None:
            raise _fail("unknown signing key")
        return key

    def _decode(self, token: str, alg: str, key: _PublishedKey, *, without_audience: bool) -> dict[str, Any]:
        """Check the signature and the registered claims (aud too unless without_audience); one path for both key
        sources."""
        if not isinstance(key.key, _KEY_TYPES_BY_ALG[alg]):
            raise _fail("unsupported token algorithm")
        # RFC 8725 3.1: a key published for one algorithm verifies that algorithm only (an RS256 key no PS256 token)
        if key.alg not in (None, alg):
            raise _fail("token algorithm does not match its signing key")
        try:
            return jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                audience=None if without_audience else self._audience,  # None: PyJWT refuses any aud, even one of ours
                issuer=self._issuer,
                leeway=self._leeway,
                options={
                    "require": _REQUIRED_COGNITO_CLAIMS if without_audience else _REQUIRED_CLAIMS,
                    "verify_signature": True,
                    "verify_exp": True,
                    "verify_nbf": True,
                    "verify_iat": True,
                    "verify_aud": True,
                    "verify_iss": True,
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.PyJWTError as exc:
            raise _fail(_reason(exc)) from None
        except (ValueError, TypeError):
            raise _fail("malformed token") from None

    def _require_cognito_client(self, claims: dict[str, Any]) -> None:
        """A token without aud is a caller only as a Cognito access token (token_use "access") whose client_id is one
        of the listed app clients; anything else without aud is refused as it was before there was a list."""
        if claims.get("token_use") != _COGNITO_ACCESS or "client_id" not in claims:
            raise _fail("missing required claim")
        client_id = claims["client_id"]
        if not isinstance(client_id, str):
            raise _fail("malformed token")
        if client_id not in self._cognito_client_ids:
            raise _fail("token issued to another client")


def _reason(exc: jwt.PyJWTError) -> str:
    """A fixed, token-free reason for a PyJWT failure."""
    reasons: list[tuple[type[jwt.PyJWTError], str]] = [
        (jwt.ExpiredSignatureError, "token expired"),
        (jwt.ImmatureSignatureError, "token not yet valid"),
        (jwt.InvalidAudienceError, "invalid audience"),
        (jwt.InvalidIssuerError, "invalid issuer"),
        (jwt.MissingRequiredClaimError, "missing required claim"),
        (jwt.InvalidSignatureError, "invalid signature"),
        (jwt.InvalidAlgorithmError, "unsupported token algorithm"),
        (jwt.InvalidKeyError, "unsupported signing key"),
    ]
    for exc_type, reason in reasons:
        if isinstance(exc, exc_type):
            return reason
    return "malformed token"


def _require_access_token(fields: dict[str, Any], names: tuple[str, ...]) -> None:
    """Unauthenticated unless each of `names` (a header's typ; a payload's typ and token_use) that `fields` holds says
    an access token: a typ one of _ACCESS_TOKEN_TYPES in any case, a token_use _COGNITO_ACCESS. Absent, either is
    taken; present but no string (null, a number, a list) it is malformed, as no IdP writes it."""
    said = {name: fields[name] for name in names if name in fields}
    if not all(isinstance(value, str) for value in said.values()):
        raise _fail("malformed token")
    typ, token_use = said.get("typ", "jwt"), said.get("token_use", _COGNITO_ACCESS)
    if typ.lower().removeprefix("application/") not in _ACCESS_TOKEN_TYPES or token_use != _COGNITO_ACCESS:
        raise _fail("not an access token (token type)")


def _is_numeric_date(value: Any) -> bool:
    """Whether a time claim is a JSON number, as RFC 7519 has it: an int or a finite float, not a bool or a string
    (PyJWT has refused a NaN or an infinity already; a float() of a huge int would overflow, so ints are not read)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool)


def _asymmetric_only(algorithms: Iterable[str]) -> frozenset[str]:
    """The configured algorithms minus anything symmetric, unsigned or unknown."""
    configured = list(algorithms)
    allowed = frozenset(a for a in configured if a in _KEY_TYPES_BY_ALG)
    dropped = sorted(set(configured) - allowed)
    if dropped:
        log.warning("ignoring token algorithms that are not asymmetric signatures: %s", ", ".join(dropped))
    if not allowed:
        raise VerifierSettingsRefused("GOVRAG_OIDC_ALGORITHMS lists no asymmetric signature algorithm (one of "
                                      f"{', '.join(_KEY_TYPES_BY_ALG)})")
    return allowed


class _PublishedKey(NamedTuple):
    """A JWK Set's public key and the `alg` its JWK names, None if it names none (PyJWK's algorithm_name cannot tell:
    it falls back to a default for the key type)."""

    key: Any  # a cryptography public key (a private one is refused for an in-memory set)
    alg: str | None


def _static_signing_keys(jwks: dict[str, Any]) -> dict[str, _PublishedKey]:
    """The signing keys of an in-memory JWKS by kid; private or unusable keys are refused."""
    keys = _signing_keys_by_kid(jwks)
    if not all(isinstance(k.key, _RSA + _EC + _OKP) for k in keys.values()):
        raise ValueError("the JWKS must hold public asymmetric keys only")
    return keys


def _signing_keys_by_kid(jwks: Any) -> dict[str, _PublishedKey]:
    """The keys with a kid that may sign (`use` "sig" or absent) of a JWK Set; ValueError if there are none.

    Each JWK is parsed on its own (as PyJWKSet does, skipping those that are unusable), so its `alg` stays with it."""
    if not isinstance(jwks, dict):
        raise ValueError("the JWKS is not a JSON object")
    entries = jwks.get("keys")
    if not isinstance(entries, list):
        raise ValueError("the JWKS holds no usable keys")
    keys = {jwk["kid"]: key for jwk in entries if (key := _published_key(jwk)) is not None}
    if not keys:
        raise ValueError("the JWKS holds no usable signing key with a kid")
    return keys


def _published_key(jwk: Any) -> _PublishedKey | None:
    """A JWK's key if it has a kid, may sign and parses; None to skip it."""
    if not isinstance(jwk, dict) or not _is_kid(jwk.get("kid")) or jwk.get("use") not in ("sig", None):
        return None
    try:
        return _PublishedKey(jwt.PyJWK(jwk).key, jwk.get("alg") or None)  # PyJWK reads an empty alg as none too
    except (jwt.PyJWTError, LookupError, TypeError, ValueError):  # an unknown kty, crv or alg; a member missing
        return None


def _is_kid(kid: Any) -> bool:
    """A JWK's kid a token's header can name: a non-empty string (a list or an object could not even be looked up)."""
    return isinstance(kid, str) and bool(kid)


class _RemoteKeySet:
    """An IdP's signing keys, cached for cache_seconds and fetched again at most once per cooldown.

    A known kid is looked up in the current snapshot without waiting for a fetch in flight; only a
    caller whose cache has expired waits for it (at most two fetch deadlines). Every fetch attempt,
    failed or not, starts the cooldown, so invented kids cannot hammer a failing IdP.
    """

    def __init__(self, find_jwks_url: Callable[[ThreadSessions], str], *, cache_seconds: float,
                 cooldown_seconds: float) -> None:
        self._find_jwks_url = find_jwks_url
        self._idp = ThreadSessions()  # a thread's fetches (the discovery document, then the keys) over one connection
        self._jwks_url: str | None = None  # found on the first fetch (discovery), then kept
        self._cache_seconds = cache_seconds
        self._cooldown_seconds = cooldown_seconds
        self._keys: dict[str, _PublishedKey] = {}
        self._fetched_at = -math.inf
        self._attempted_at = -math.inf
        self._attempt_lock = forksafe.lock()  # held only to claim an attempt, never across a fetch
        self._fetch_lock = forksafe.lock()
        self._closed = False

    def close(self) -> None:
        """Close every thread's session to the IdP once no fetch is in flight (one takes at most its deadlines); no
        fetch after it."""
        with self._fetch_lock:
            self._closed = True
            self._idp.close()

    def keys_for(self, kid: str) -> dict[str, _PublishedKey]:
        """Signing keys that hold kid if the IdP publishes it; Unavailable if they cannot be had."""
        keys, fresh = self._snapshot()
        if fresh and kid in keys:
            return keys
        if self._claim_attempt():
            return self._fetch()
        if fresh:
            return keys  # an unknown kid within the cooldown
        return self._after_fetch_in_flight()

    def _snapshot(self) -> tuple[dict[str, _PublishedKey], bool]:
        """The cached keys and whether they are still within cache_seconds."""
        keys, fetched_at = self._keys, self._fetched_at
        return keys, time.monotonic() - fetched_at < self._cache_seconds

    def _claim_attempt(self) -> bool:
        """True (and the cooldown restarted) if no fetch was attempted within the cooldown."""
        with self._attempt_lock:
            now = time.monotonic()
            if now - self._attempted_at < self._cooldown_seconds:
                return False
            self._attempted_at = now
            return True

    def _fetch(self) -> dict[str, _PublishedKey]:
        """Fetch and cache the key set; any fetch or parse failure is the IdP being unavailable."""
        with self._fetch_lock:
            if self._closed:
                raise Unavailable("identity provider")
            try:
                self._jwks_url = self._jwks_url or self._find_jwks_url(self._idp)
                keys = _signing_keys_by_kid(_fetch_json(self._idp, self._jwks_url))
            except ValueError as exc:  # our own fixed messages: nothing from a token reaches this
                log.warning("the identity provider's signing keys could not be fetched: %s", exc)
                raise Unavailable("identity provider") from None
            self._keys, self._fetched_at = keys, time.monotonic()
            return keys

    def _after_fetch_in_flight(self) -> dict[str, _PublishedKey]:
        """The keys once a fetch in flight ends; Unavailable if they are still expired."""
        if self._fetch_lock.acquire(timeout=2 * _FETCH_DEADLINE_SECONDS):  # the discovery document, then the key set
            self._fetch_lock.release()
        keys, fresh = self._snapshot()
        if not fresh:
            raise Unavailable("identity provider")
        return keys


def _common_options(settings: Settings) -> dict[str, Any]:
    """Verifier options shared by both key sources."""
    return {
        "issuer": settings.oidc_issuer,
        "audience": settings.oidc_audience,
        "algorithms": settings.oidc_algorithms,
        "leeway_seconds": settings.oidc_leeway_seconds,
        "max_lifetime_seconds": settings.token_max_lifetime_seconds,
        "groups_claim": settings.groups_claim,
        "subject_claim": settings.subject_claim,
        "email_claim": settings.email_claim,
        "required_azp": settings.oidc_required_azp,
        "cognito_client_ids": settings.oidc_cognito_client_ids,
        "jwks_refresh_cooldown_seconds": settings.oidc_jwks_refetch_cooldown_seconds,
    }


def discover_jwks_uri(issuer: str, idp: ThreadSessions, *, production: bool = False) -> str:
    """The jwks_uri from the issuer's OpenID configuration (fetched over `idp`), whose issuer must match exactly (OIDC
    Discovery 4.3).

    A failure is a ValueError, which the key set's first fetch maps to Unavailable: in production a plain-http
    jwks_uri is one, as a plain-http GOVRAG_OIDC_JWKS_URL is refused at start. A plain-http issuer is not warned of
    here: from_settings did at start, and this runs again at each fetch attempt until discovery succeeds."""
    _check_idp_url(issuer, "GOVRAG_OIDC_ISSUER", production=production, warn=False)
    try:
        document = _fetch_json(idp, issuer.rstrip("/") + _DISCOVERY_PATH)
    except ValueError as exc:
        raise ValueError("OIDC discovery failed: the issuer's openid-configuration could not be read") from exc
    if not isinstance(document, dict) or document.get("issuer") != issuer:
        raise ValueError("OIDC discovery failed: the configuration names a different issuer")
    jwks_uri = document.get("jwks_uri")
    if not isinstance(jwks_uri, str):
        raise ValueError("OIDC discovery failed: no usable jwks_uri")
    _check_idp_url(jwks_uri, "the discovered jwks_uri", production=production)
    return jwks_uri


def _check_idp_url(url: str, name: str, *, production: bool, warn: bool = True) -> None:
    """What govrag fetches from the IdP needs a URL http.api_url takes (no port or one from 1 to 65535: httpx fetched a
    discovered `:８０` or `:+80` from port 80 and crashed on `:99999`; http(s) with a host, as the fetch reads it, and
    read by urlsplit, whose reading the port and https checks take: one it cannot read, such as a stray `]`, would
    pass both unchecked; no user name or password); IdPURLRefused naming it (never quoting it) otherwise.

    Over plain http the answer (a configuration, the signing keys) can be substituted in transit: refused in
    production, a warning in development (unless warn is False: said already)."""
    try:
        api_url(url)
    except UnusablePort as refused:
        raise IdPURLRefused(f"{name} {refused}") from None
    except CredentialsInURL:
        raise IdPURLRefused(f"{name} must not hold a user name or password (user:password@host)") from None
    except URLRefused:  # another scheme, no host ("https:/idp"), or one httpx or urlsplit cannot read
        raise IdPURLRefused(f"{name} is not an http(s) URL with a host") from None
    scheme = url_scheme(url)
    if scheme == "http" and production:
        raise IdPURLRefused(f"{name} is not https (refused in production)")
    if scheme == "http" and warn:
        log.warning("%s is not https; what is fetched from it can be substituted in transit", name)


def _fetch_json(idp: ThreadSessions, url: str) -> Any:
    """The JSON document at url, read over `idp` (the calling thread's connection kept for its next fetch) within a
    wall-clock deadline (headers included) and size cap; ValueError on any failure.

    Redirects are not followed (a 3xx is a failure), so the document comes from the configured host.
    """
    try:
        return json.loads(idp.request_within("GET", url, seconds=_FETCH_DEADLINE_SECONDS, max_bytes=_MAX_FETCH_BYTES))
    # InvalidURL is no HTTPError (a jwks_uri with a broken host); RecursionError: JSON nested past the parser's depth
    except (httpx.HTTPError, httpx.InvalidURL, RecursionError):
        raise ValueError("the document could not be fetched") from None


def claim_at(claims: dict[str, Any], path: str) -> Any:
    """A claim by name, or by dotted path into nested objects (Keycloak "realm_access.roles")."""
    if path in claims:
        return claims[path]  # a flat claim wins, even when its name holds dots (URL-named claims)
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _subject(subject: Any) -> str:
    """The subject claim: a non-empty string that cannot pose as a group or role principal."""
    if subject is None:
        raise _fail("missing required claim")
    if not isinstance(subject, str) or not subject.strip():
        raise _fail("invalid subject")
    if len(subject) > MAX_SUBJECT_CHARS or subject.startswith(RESERVED_PREFIXES) or not token_can_carry(subject):
        raise _fail("invalid subject")
    return subject


def _groups(value: Any) -> tuple[str, ...]:
    """The groups claim as a de-duplicated tuple; absent means none, anything but printable strings is refused."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(g, str) and token_can_carry(g) for g in value):
        raise _fail("invalid groups claim")  # a lone surrogate or control character would break the audit row
    return tuple(dict.fromkeys(g for g in value if g))
