"""Typed settings, read from the environment with the GOVRAG_ prefix."""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Environment(StrEnum):
    development = "development"
    production = "production"


class Settings(BaseSettings):
    """Everything govrag reads from its environment; one instance per process."""

    model_config = SettingsConfigDict(env_prefix="GOVRAG_", extra="ignore")

    env: Environment = Environment.development
    data_dir: Path = Path(".govrag-data")

    # Storage
    database_url: str | None = None  # default: SQLite file under data_dir
    qdrant_url: str | None = None  # production: a Qdrant server
    qdrant_path: Path | None = None  # embedded: local mode; default data_dir/qdrant
    broker_url: str = "memory://"  # embedded: in-process broker and worker thread
    task_queue: str = "govrag-ingest"
    inprocess_worker: bool = True  # run a Celery worker thread inside the API process

    # Identity
    oidc_issuer: str = "govrag-dev-issuer"
    oidc_audience: str = "govrag"
    oidc_jwks_url: str | None = None
    oidc_algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256", "PS256", "EdDSA"])
    oidc_leeway_seconds: int = 30
    groups_claim: str = "groups"
    dev_issuer: bool = True
    admins: list[str] = Field(default_factory=list)  # subjects or "group:<name>"

    # Keys
    master_key: SecretStr | None = None  # base64 of 32 bytes; production source
    master_key_file: Path | None = None  # default data_dir/master.key (created 0600 in dev)

    # Limits and retrieval
    max_upload_bytes: int = 20 * 1024 * 1024
    chunk_max_chars: int = 1000
    default_top_k: int = 5
    max_top_k: int = 20
    min_relevance: float = 0.30

    # --- audit and observability (issue 6) ---

    # --- authorization (issue 4) ---

    # --- ingestion (issue 3) ---

    # --- guardrails and model backends (issue 5) ---

    @model_validator(mode="after")
    def _refuse_dev_defaults_in_production(self) -> Settings:
        if self.env is Environment.production:
            if self.dev_issuer:
                raise ValueError("GOVRAG_DEV_ISSUER must be false in production")
            if not self.oidc_jwks_url:
                raise ValueError("GOVRAG_OIDC_JWKS_URL is required in production")
            if self.master_key is None and self.master_key_file is None:
                raise ValueError(
                    "production needs GOVRAG_MASTER_KEY or an existing GOVRAG_MASTER_KEY_FILE;"
                    " a generated master key is refused"
                )
            if self.master_key_file is not None and not self.master_key_file.exists():
                raise ValueError("GOVRAG_MASTER_KEY_FILE does not exist; it is never generated in production")
            if not self.database_url or self.database_url.startswith("sqlite"):
                raise ValueError("production needs GOVRAG_DATABASE_URL pointing at PostgreSQL")
        return self

    @property
    def is_production(self) -> bool:
        return self.env is Environment.production

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'govrag.db').resolve()}"

    @property
    def resolved_qdrant_path(self) -> Path:
        return self.qdrant_path or self.data_dir / "qdrant"

    @property
    def resolved_master_key_file(self) -> Path:
        return self.master_key_file or self.data_dir / "master.key"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def dev_issuer_dir(self) -> Path:
        return self.data_dir / "dev-issuer"


@lru_cache
def get_settings() -> Settings:
    """The process's settings; tests override by clearing the cache or passing their own."""
    return Settings()
