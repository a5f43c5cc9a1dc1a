"""Production as the settings accept it: one set of values for every test that needs a production start or check."""

from __future__ import annotations

import base64


def production_settings(**overrides: str | None) -> dict[str, str | None]:
    """GOVRAG_ENV=production with each setting it requires, as text (`Settings(**...)` takes it, and so does
    `govrag_env(**...)` for a process); overrides replace or add settings (None: unset, for Settings only)."""
    return {"env": "production", "dev_issuer": "false", "oidc_jwks_url": "https://idp.example/jwks",
            "database_url": "postgresql+psycopg://u@db/govrag", "master_key": base64.b64encode(b"k" * 32).decode(),
            "metrics_token": "scrape-token", **overrides}
