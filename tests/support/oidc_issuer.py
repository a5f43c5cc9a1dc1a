"""A real OpenID provider for tests: discovery + JWKS over HTTP on 127.0.0.1, keys generated per run."""

from __future__ import annotations

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from authz.dev_issuer import jwk_thumbprint, rsa_public_jwk


class SigningKey:
    """An RSA key with its kid and public JWK."""

    def __init__(self) -> None:
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_jwk = rsa_public_jwk(self.private.public_key())
        self.kid = jwk_thumbprint(self.public_jwk)

    def jwk(self) -> dict[str, str]:
        return {**self.public_jwk, "kid": self.kid, "alg": "RS256", "use": "sig"}


class LocalIssuer:
    """Serves /realms/test/.well-known/openid-configuration and /realms/test/jwks, keeping HTTP/1.1 connections alive;
    counts JWKS fetches and connections accepted."""

    def __init__(self, audience: str = "govrag-api") -> None:
        self.audience = audience
        self.keys = [SigningKey()]
        self.jwks_fetches = 0
        self.connections = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.issuer = f"http://127.0.0.1:{self._server.server_address[1]}/realms/test"
        self.jwks_uri = f"{self.issuer}/jwks"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> LocalIssuer:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def rotate(self) -> SigningKey:
        """Publish a new key first in the set (the old one stays until dropped)."""
        self.keys.insert(0, SigningKey())
        return self.keys[0]

    def claims(self, subject: str = "user-1", **overrides: Any) -> dict[str, Any]:
        """A Keycloak access token's claims (its payload `typ` "Bearer"); an override of None leaves a claim out."""
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.issuer, "aud": self.audience, "sub": subject, "iat": now, "nbf": now,
                                  "exp": now + 300, "jti": secrets.token_urlsafe(8), "typ": "Bearer"}
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, key: SigningKey | None = None, headers: dict[str, Any] | None = None, **claims: Any) -> str:
        key = key or self.keys[0]
        return jwt.encode(self.claims(**claims), key.private, algorithm="RS256",
                          headers={"kid": key.kid, **(headers or {})})

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                issuer.connections += 1

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path == "/realms/test/.well-known/openid-configuration":
                    body: dict[str, Any] = {"issuer": issuer.issuer, "jwks_uri": issuer.jwks_uri,
                                            "id_token_signing_alg_values_supported": ["RS256"]}
                elif self.path == "/realms/test/jwks":
                    issuer.jwks_fetches += 1
                    body = {"keys": [k.jwk() for k in issuer.keys]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args: Any) -> None:
                return

        return Handler


def ec_key() -> ec.EllipticCurvePrivateKey:
    """A P-256 key (for tokens signed by a key the issuer never published)."""
    return ec.generate_private_key(ec.SECP256R1())
