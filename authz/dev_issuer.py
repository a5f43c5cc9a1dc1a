"""DEV-ONLY token issuer: a local RSA key that mints JWTs so govrag runs without an IdP.

Never use this in production. It signs whatever subject and groups it is asked for, so
anyone who can call it (or read its private key) can become any user, including an
admin. Settings refuse GOVRAG_DEV_ISSUER=true when GOVRAG_ENV=production.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from core.errors import UnusablePath
from core.settings import DEFAULT_TOKEN_MAX_LIFETIME_SECONDS, Settings

log = logging.getLogger(__name__)

ALGORITHM = "RS256"
KEY_FILE = "private.pem"
_KEY_BITS = 2048
DEFAULT_TTL_SECONDS = 3600


def _b64url_uint(value: int) -> str:
    """Base64url (unpadded) of an unsigned big-endian integer, as JWK "n" and "e" want."""
    raw = value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def rsa_public_jwk(public_key: rsa.RSAPublicKey) -> dict[str, str]:
    """The required members of an RSA public JWK (RFC 7517/7518)."""
    numbers = public_key.public_numbers()
    return {"kty": "RSA", "n": _b64url_uint(numbers.n), "e": _b64url_uint(numbers.e)}


def jwk_thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 SHA-256 thumbprint of an RSA JWK, base64url without padding."""
    canonical = json.dumps({k: jwk[k] for k in ("e", "kty", "n")}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _load_private_key(path: Path) -> rsa.RSAPrivateKey:
    """Read the PEM private key at path, tightening its mode to 0600 if it was looser."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("dev issuer key file was group/world accessible; restricting it to 0600")
        path.chmod(0o600)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise TypeError("dev issuer key file does not hold an RSA private key")
    return key


def _create_private_key(path: Path) -> None:
    """Generate a key and publish it at path atomically (0600); a concurrent winner is kept."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=_KEY_BITS)
    pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)  # fails if another process published first; theirs wins
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class DevIssuer:
    """DEV-ONLY: signs RS256 tokens for any subject; trust it only on a developer machine."""

    issuer: str
    audience: str
    kid: str
    max_ttl_seconds: int  # the verifier's GOVRAG_TOKEN_MAX_LIFETIME_SECONDS: no token it mints lives longer
    _private_key: rsa.RSAPrivateKey = field(repr=False)
    _public_jwk: dict[str, str] = field(repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> DevIssuer:
        """The issuer the settings' verifier trusts: their data dir's key, issuer, audience and maximum lifetime."""
        return cls.load_or_create(settings.dev_issuer_dir, settings.oidc_issuer, settings.oidc_audience,
                                  max_ttl_seconds=settings.token_max_lifetime_seconds)

    @classmethod
    def load_or_create(cls, directory: Path, issuer: str, audience: str, *,
                       max_ttl_seconds: int = DEFAULT_TOKEN_MAX_LIFETIME_SECONDS) -> DevIssuer:
        """Reuse directory/private.pem, or create it (dir 0700, file 0600) on first run; UnusablePath if the
        directory cannot be used or the key there does not parse."""
        path = directory / KEY_FILE
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.chmod(0o700)
            if not path.exists():
                _create_private_key(path)
            private_key = _load_private_key(path)
        except OSError as error:
            raise UnusablePath.refused(f"the dev issuer's key in {directory}", error, "GOVRAG_DATA_DIR") from None
        except (ValueError, TypeError):  # not PEM, not RSA, or encrypted
            raise UnusablePath(f"the dev issuer's key {path} must hold an unencrypted RSA private key in PEM: remove "
                               "it and a new one is made (the tokens the old one signed stop verifying)") from None
        public_jwk = rsa_public_jwk(private_key.public_key())
        kid = jwk_thumbprint(public_jwk)
        log.warning("DEV-ONLY token issuer in use (kid %s); never enable it in production", kid)
        return cls(issuer=issuer, audience=audience, kid=kid, max_ttl_seconds=max_ttl_seconds, _private_key=private_key,
                   _public_jwk=public_jwk)

    @property
    def default_ttl_seconds(self) -> int:
        """How long a token lives unless asked otherwise: an hour, or the maximum lifetime if that is shorter."""
        return min(DEFAULT_TTL_SECONDS, self.max_ttl_seconds)

    def jwks(self) -> dict[str, Any]:
        """The public JWK Set (no private members) that verifies this issuer's tokens."""
        return {"keys": [{**self._public_jwk, "kid": self.kid, "alg": ALGORITHM, "use": "sig"}]}

    def issue(
        self,
        subject: str,
        groups: list[str],
        ttl_seconds: int | None = None,
        extra_claims: dict[str, Any] | None = None,
    ) -> str:
        """Mint a signed token living ttl_seconds (default DEFAULT_TTL_SECONDS, at most max_ttl_seconds); extra_claims
        are merged last and may override the defaults (tests mint bad tokens so)."""
        ttl_seconds = self.default_ttl_seconds if ttl_seconds is None else ttl_seconds
        if not 0 < ttl_seconds <= self.max_ttl_seconds:
            raise ValueError(f"the lifetime must be 1 to {self.max_ttl_seconds} seconds "
                             "(GOVRAG_TOKEN_MAX_LIFETIME_SECONDS)")
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "groups": list(groups),
            "iat": now,
            "nbf": now,
            "exp": now + ttl_seconds,
            "jti": secrets.token_urlsafe(16),
        }
        claims.update(extra_claims or {})
        return jwt.encode(claims, self._private_key, algorithm=ALGORITHM, headers={"kid": self.kid})
