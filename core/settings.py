"""Typed settings, read from the environment with the GOVRAG_ prefix."""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Mapping
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import exc as db_errors
from sqlalchemy.engine import make_url

from core import crypto
from core.urls import NO_USABLE_PORT, called_url_port_usable, port_usable, url_has_credentials, url_parts

MAX_DEFAULT_INGEST_CONCURRENCY = 4
DEFAULT_TOKEN_MAX_LIFETIME_SECONDS = 24 * 3600
DEFAULT_KEY_CACHE_SECONDS = 300.0
_KEYRING_FORM = "base64 of 32 bytes, or `v<N>:<base64>` entries (one per version)"
# Each key setting, the parser its users read it with, and what it must be (never quoting what it is).
_KEY_PARSERS = {
    "master_key": (crypto.parse_master_keyring, f"GOVRAG_MASTER_KEY must be {_KEYRING_FORM}"),
    "audit_checkpoint_key": (crypto.decode_master_key, "GOVRAG_AUDIT_CHECKPOINT_KEY must be base64 of 32 bytes"),
    "audit_checkpoint_previous_keys": (crypto.decode_key_list, "GOVRAG_AUDIT_CHECKPOINT_PREVIOUS_KEYS must be "
                                       "comma-separated base64 of 32 bytes each"),
}

# Each setting naming a service govrag connects to: the URL schemes it is reached by (True: a scheme that needs a
# host) and the forms a refusal suggests. The broker's are those govrag reads the broker by (workers/dispatch.py, the
# guard's shared counters, the queue-depth metric); Qdrant's those qdrant-client speaks (it took a bare host too).
_SERVICE_URLS: dict[str, tuple[Mapping[str, bool], str]] = {
    "qdrant_url": ({"http": True, "https": True}, "http://HOST:6333 or https://HOST:6333"),
    "broker_url": ({"memory": False, "redis": True, "rediss": True},
                   "memory://, redis://HOST:6379/0 or rediss://HOST:6379/0"),
    "otel_exporter_otlp_endpoint": ({"http": True, "https": True}, "http://HOST:4318/v1/traces"),
}
_SCHEME_THEN_AUTHORITY = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# A Redis URL's path is its database's number, or nothing (database 0): redis-py (the job sweep, the guard's counters,
# the queue-depth metric) read `/abc` as database 0 and `/1/2` as 12, where kombu (Celery) refused both at its first
# connection.
_REDIS_SCHEMES = frozenset({"redis", "rediss"})
_REDIS_DATABASE_PATH = re.compile(r"(?:/[0-9]*)?")
# The query parameters a Redis URL may hold, each with the values it takes: those kombu (Celery's broker) and redis-py
# both read, and read alike. kombu refuses any other at its first connection (a TypeError in the worker) and redis-py
# hands any other to the connection (a TypeError at its first command). A redis:// URL takes none: kombu reads an
# ssl_ parameter as asking for TLS, redis-py refuses it without. Names are read as written (`SSL_CERT_REQS` by neither);
# a value's case as both read it (`Required` by neither, `FALSE` by both).
_REDIS_TLS_PARAMETERS: dict[str, tuple[re.Pattern[str], str]] = {
    "ssl_cert_reqs": (re.compile("required|optional|none"), "required, optional or none"),
    "ssl_check_hostname": (re.compile("true|false", re.IGNORECASE), "true or false"),
    **dict.fromkeys(("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"), (re.compile(".+", re.DOTALL), "a file's path")),
}
_REDIS_QUERY_TAKEN = f"a redis:// URL takes none, a rediss:// URL only {', '.join(_REDIS_TLS_PARAMETERS)}"
# A database URL's user information and its host and port, as SQLAlchemy reads them (sqlalchemy.engine.url's pattern):
# the user information up to its first `@` (a user name holds no `:` or `/`), the host and port up to a `/` or `?`.
# Each piece is optional: it matches whatever follows a URL's `://`.
_DATABASE_AUTHORITY = re.compile(r"(?:(?P<userinfo>[^:/]*(?::[^@]*)?)@)?(?P<host_and_port>[^/?]*)")
# An unencoded `@`, `:`, `/`, `?` or `#` in a password makes a piece of it read as the host, the port or the path: the
# refusals of either say how to write it, quoting none of it.
_ENCODE_CREDENTIALS = "in a user name or password, percent-encode any @ : / ? #"
_PORT_REFUSAL = f"{NO_USABLE_PORT} ({_ENCODE_CREDENTIALS})"
_STRAY_AT_REFUSAL = f"holds an @ after its host ({_ENCODE_CREDENTIALS})"
# A `/` or a blank in a database URL's user information, which SQLAlchemy reads in it, but the log mask does not; a `?`
# or `#`, which RFC 3986 allows in no user information (a reader following it ends the authority there, as the service
# URLs' checks do), and SQLAlchemy too where a `/` follows in a user name (the rest read as the URL's query, unmasked).
_UNMASKABLE_CREDENTIALS = re.compile(r"[/?#\s]")
_URL_AUTHORITY_END = re.compile(r"[/?#]")
_UNMASKABLE_CREDENTIALS_REFUSAL = ("holds a /, ?, # or a blank in its user name or password, which may end it early "
                                   "and show the rest in the logs: write each / as %2F, each ? as %3F, each # as %23 "
                                   "and each space as %20 (a tab as %09) in the URL; the password itself stays as it "
                                   "is")
# The longest scheme or database driver a refusal quotes whole, above the longest drivers' names
# (`postgresql+psycopg2cffi`); a longer one is something else pasted in, quoted as its start and an ellipsis.
_QUOTED_NAME_CHARS = 32

logger = logging.getLogger(__name__)


class Environment(StrEnum):
    development = "development"
    production = "production"


class Settings(BaseSettings):
    """Everything govrag reads from its environment; one instance per process."""

    # A refusal never echoes the values it was given (they include keys and tokens).
    model_config = SettingsConfigDict(env_prefix="GOVRAG_", extra="ignore", hide_input_in_errors=True)

    env: Environment = Environment.development
    data_dir: Path = Path(".govrag-data")

    # Storage
    database_url: str | None = None  # default: SQLite file under data_dir
    qdrant_url: str | None = None  # production: a Qdrant server
    qdrant_path: Path | None = None  # embedded: local mode; default data_dir/qdrant
    broker_url: str = "memory://"  # embedded: in-process broker and worker thread
    task_queue: str = "govrag-ingest"
    inprocess_worker: bool = True  # run a Celery worker thread inside the API process
    # Documents a `govrag worker` ingests at once, one process each: PII detection runs on one core, so a second
    # document in flight keeps the other busy (bench/ingest.py measures it). The in-process worker takes one.
    # Default: the cores, at most MAX_DEFAULT_INGEST_CONCURRENCY (each process loads its own models, ~1 GiB).
    ingest_concurrency: int = Field(default_factory=lambda: min(os.cpu_count() or 1, MAX_DEFAULT_INGEST_CONCURRENCY),
                                    ge=1, le=64)

    # Identity
    oidc_issuer: str = "govrag-dev-issuer"
    oidc_audience: str = "govrag"
    oidc_jwks_url: str | None = None
    oidc_algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256", "PS256", "EdDSA"])
    # clock skew allowed on exp/nbf/iat; more than 5 minutes would accept tokens long expired
    oidc_leeway_seconds: int = Field(default=30, ge=0, le=300)
    # longest a token may live (exp - iat; a token without iat is refused): a minute to a week, since a token that
    # lives longer is a standing credential, not a session. The dev issuer mints within it.
    token_max_lifetime_seconds: int = Field(default=DEFAULT_TOKEN_MAX_LIFETIME_SECONDS, ge=60, le=7 * 24 * 3600)
    groups_claim: str = "groups"
    dev_issuer: bool = True
    admins: list[str] = Field(default_factory=list)  # subjects or "group:<name>"

    # Keys
    master_key: SecretStr | None = None  # base64 of 32 bytes; production source
    master_key_file: Path | None = None  # default data_dir/master.key (created 0600 in dev)
    # Unwrapped keys (and the master keys read from the key file) a process keeps in memory at most this long: a deleted
    # document's key (or a retired department key version) leaves every other process within it. 0: none kept (an
    # unwrap per document read); at most an hour.
    key_cache_seconds: float = Field(default=DEFAULT_KEY_CACHE_SECONDS, ge=0, le=3600)

    # Limits and retrieval
    max_upload_bytes: int = 20 * 1024 * 1024
    chunk_max_chars: int = 1000
    default_top_k: int = 5
    max_top_k: int = 20
    min_relevance: float = 0.30

    # --- audit and observability (issue 6) ---
    audit_checkpoint_every: int = 100  # a signed checkpoint every N ledger rows (0: only manual/purge ones)
    audit_checkpoint_key: SecretStr | None = None  # base64 of 32 bytes; default: derived from the master key
    # The checkpoint keys used before GOVRAG_AUDIT_CHECKPOINT_KEY was changed (comma-separated base64): `govrag audit
    # verify` takes the checkpoints they signed through the newest one the current key signs; they sign nothing.
    audit_checkpoint_previous_keys: SecretStr | None = None
    audit_checkpoint_file: Path | None = None  # append-only mirror of checkpoints; default data_dir/...
    # None: keep the ledger forever. At least a day (a cutoff in the future would purge it all), at most 100 years.
    audit_retention_days: int | None = Field(default=None, ge=1, le=36500)
    compliance_officers: list[str] = Field(default_factory=list)  # global compliance: subjects or "group:<name>"
    log_level: str = "INFO"
    otel_enabled: bool = False  # tracing off by default
    otel_exporter_otlp_endpoint: str | None = None  # e.g. http://otel-collector:4318/v1/traces
    otel_service_name: str = "govrag"
    server_timing: bool = False  # per-stage durations in a Server-Timing header (benchmarks; a timing side channel)
    api_threads: int = Field(default=8, ge=1)  # requests worked on at once per API process; the rest wait their turn
    # when set, GET /metrics needs "Authorization: Bearer <token>"; required in production
    metrics_token: SecretStr | None = None

    # --- authorization (issue 4) ---
    oidc_discovery: bool = True  # no JWKS URL given: read <issuer>/.well-known/openid-configuration
    oidc_required_azp: str | None = None  # when set, tokens carrying azp must name this client
    # AWS Cognito user pools: their access tokens carry no aud but the app client's id in client_id. A token without
    # aud whose token_use is "access" and whose client_id is listed here is a caller; empty (the default): none is.
    oidc_cognito_client_ids: list[str] = Field(default_factory=list)
    # unknown kid: at most one JWKS refetch per this long; under a second, invented kids would hammer the IdP
    oidc_jwks_refetch_cooldown_seconds: float = Field(default=10.0, ge=1.0)
    subject_claim: str = "sub"  # Entra ID: "oid"; dotted paths reach nested claims
    email_claim: str = "email"
    authz_default_clearance: str = "internal"  # public | internal | confidential | restricted
    authz_policy_check_seconds: float = 0.5  # how stale a process's policy may be between queries

    # --- ingestion (issue 3) ---
    max_decompressed_bytes: int = 200 * 1024 * 1024  # sum of a zip container's members (docx, xlsx, epub…)
    max_compression_ratio: int = 200  # a member inflating more than this is a zip bomb
    max_pages: int = 2000
    max_elements: int = 50_000
    parse_timeout_seconds: float = 120.0
    # hard limit per document in a prefork worker: the child is replaced and the document fails (a parser stuck
    # where the parse timeout's alarm cannot reach it, e.g. native code)
    ingest_time_limit_seconds: float = 1800.0
    broker_visibility_timeout: int = 3600  # seconds before an unacknowledged task (dead worker) is redelivered
    # A Redis broker that does not answer a socket operation within this long counts as down (a publish gives up
    # and the job waits unsent for the sweep). Above kombu's 1 s BRPOP poll, well above a healthy round trip.
    broker_socket_timeout_seconds: float = Field(default=3.0, gt=1.0)
    # An ingestion job whose task has not reached the broker this long after it was created (the broker was down,
    # the API stopped between its commit and the send) is sent again; each API process looks every
    # `job_sweep_seconds` (0: never). See workers/dispatch.py.
    job_resend_after_seconds: float = Field(default=30.0, ge=0)
    job_sweep_seconds: float = Field(default=10.0, ge=0)

    # --- guardrails and model backends (issue 5) ---
    answer_backend: Literal["extractive", "llamacpp", "openai"] = "extractive"
    llm_model_path: Path | None = None  # llamacpp: a GGUF file
    llm_base_url: str | None = None  # openai: an OpenAI-compatible server inside the network
    llm_model: str = "local"  # openai: the model name the server expects
    llm_api_key: SecretStr | None = None  # openai: sent as a bearer token if set
    llm_allowed_hosts: list[str] = Field(default_factory=lambda: ["127.0.0.1", "localhost", "::1"])
    llm_timeout_seconds: float = 60.0
    # prompt budget: system + question + chunks (+ the chat template's markers) must fit, with room to answer; both at
    # least 1: llama.cpp reads a context of 0 as the model's own, and an answer of 0 tokens as no limit
    llm_context_tokens: int = Field(default=2048, ge=1)
    llm_max_answer_tokens: int = Field(default=256, ge=1)
    firewall_default_mode: Literal["block", "flag", "off"] = "block"
    scan_retrieved_text: bool = True  # drop chunks that read like instructions before a model sees them
    guard_cache_seconds: float = 0.5  # kill-switch / mode changes reach every process within this
    guard_auto_trip_per_minute: int = 10  # blocked injections or output-guard hits per department; 0 = never

    # --- performance (issue 7) ---
    vector_backend: Literal["edge", "qdrant_local"] = "edge"  # embedded engine when no GOVRAG_QDRANT_URL
    embedding_backend: Literal["onnx", "torch"] = "onnx"  # same vectors (tested); onnx is faster on CPU
    qdrant_replication_factor: int = Field(default=1, ge=1)  # copies of each department's shards on a cluster

    @field_validator(*_KEY_PARSERS)
    @classmethod
    def _key_material_usable(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        """Key material is parsed at start, as its users parse it: an unusable key refuses to start rather than fail
        the first upload, query or checkpoint."""
        if value is not None:
            parse, requirement = _KEY_PARSERS[info.field_name]
            try:
                parse(value.get_secret_value())
            except ValueError:
                raise ValueError(requirement) from None
        return value

    @field_validator("oidc_issuer", "oidc_jwks_url", "llm_base_url")
    @classmethod
    def _url_without_credentials(cls, value: str | None) -> str | None:
        """A URL govrag calls holds no user name or password: httpx would send them (Basic, in clear over http) in
        place of the bearer token, to a server that answers 401 (GOVRAG_LLM_API_KEY is the model server's key)."""
        if value is not None and url_has_credentials(value):
            raise ValueError("must not hold a user name or password (user:password@host)")
        return value

    @field_validator("oidc_issuer", "oidc_jwks_url", "llm_base_url")
    @classmethod
    def _called_url_port_usable(cls, value: str | None) -> str | None:
        """A URL govrag calls (the IdP, the model server) names no port or one from 1 to 65535, refused at start, not
        at each call (every token refused, every answer extractive): httpx takes 99999 and fails `:8o80` only when
        called; an empty one (`host:`, a port deleted or never typed) is refused too. One that does not parse is left
        to the checks naming the setting (the allowlist, the IdP URL's)."""
        if value is not None and not called_url_port_usable(value):
            raise ValueError(NO_USABLE_PORT)
        return value

    @field_validator(*_SERVICE_URLS)
    @classmethod
    def _service_url_usable(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A service URL is read at start as its client reads it: one that cannot reach its service (a bare host, a
        typo'd scheme, no host, a port no server listens on) refuses to start in one line, quoted no more than its
        scheme (a broker URL may hold a password), rather than fail every readiness check or be retried for ever.
        An empty one of a setting unset by default (`GOVRAG_QDRANT_URL=` in a deployment template) is unset, as the code
        reading it always took it: the embedded store, no OTLP exporter."""
        if value is None or (value == "" and cls.model_fields[info.field_name].default is None):
            return None
        schemes, forms = _SERVICE_URLS[info.field_name]
        return service_url(value, schemes, forms)

    @field_validator("database_url")
    @classmethod
    def _database_url_usable(cls, value: str | None) -> str | None:
        """The database URL parses as SQLAlchemy reads it and its driver loads: refused at start in one line, never
        quoted (it may hold a password), rather than a traceback from the first engine made."""
        if value is not None:
            _require_database_driver(value)
        return value

    @field_validator("oidc_cognito_client_ids")
    @classmethod
    def _cognito_client_ids_named(cls, value: list[str]) -> list[str]:
        """Each listed app client id is one a token's client_id can name: not empty, no spaces or control characters."""
        if not all(client_id.split() == [client_id] and client_id.isprintable() for client_id in value):
            raise ValueError("must list Cognito app client ids, none empty or holding spaces")
        return value

    @model_validator(mode="after")
    def _master_key_file_usable(self) -> Settings:
        """The key file (read when GOVRAG_MASTER_KEY is not set) is parsed at start as the key store parses it, like
        GOVRAG_MASTER_KEY; a missing one is generated outside production and refused in it (below)."""
        if self.master_key is None:
            _check_master_key_file(self.resolved_master_key_file, production=self.is_production)
        return self

    @model_validator(mode="after")
    def _previous_checkpoint_keys_rotated(self) -> Settings:
        """A previous checkpoint key is no longer the current one: the same key in both settings (the new one never
        set) left the old key signing, with the rotation seeming done."""
        current, previous = self.audit_checkpoint_key, self.audit_checkpoint_previous_keys
        if current is not None and previous is not None and crypto.decode_master_key(
                current.get_secret_value()) in crypto.decode_key_list(previous.get_secret_value()):
            raise ValueError("GOVRAG_AUDIT_CHECKPOINT_PREVIOUS_KEYS holds GOVRAG_AUDIT_CHECKPOINT_KEY itself: set the "
                             "new key as GOVRAG_AUDIT_CHECKPOINT_KEY")
        return self

    @model_validator(mode="after")
    def _llm_host_on_allowlist(self) -> Settings:
        """Customer data may only go to a model server on the allowlist: anything else refuses to start."""
        if self.answer_backend == "openai":
            if not self.llm_host_allowed:
                raise ValueError("GOVRAG_LLM_BASE_URL must name a host listed in GOVRAG_LLM_ALLOWED_HOSTS")
        if self.answer_backend == "llamacpp" and self.llm_model_path is None:
            raise ValueError("GOVRAG_ANSWER_BACKEND=llamacpp needs GOVRAG_LLM_MODEL_PATH")
        return self

    @model_validator(mode="after")
    def _llm_answer_leaves_room(self) -> Settings:
        """A model is given what the answer leaves of its window: an answer as long as the window is no prompt, every
        query answered extractively."""
        if self.answer_backend != "extractive" and self.llm_max_answer_tokens >= self.llm_context_tokens:
            raise ValueError("GOVRAG_LLM_MAX_ANSWER_TOKENS must be less than GOVRAG_LLM_CONTEXT_TOKENS: the prompt is "
                             "given what the answer leaves of the window")
        return self

    @model_validator(mode="after")
    def _refuse_dev_defaults_in_production(self) -> Settings:
        if self.env is Environment.production:
            if self.dev_issuer:
                raise ValueError("GOVRAG_DEV_ISSUER must be false in production")
            if not self.oidc_jwks_url and not (self.oidc_discovery and url_scheme(self.oidc_issuer) == "https"):
                raise ValueError("production needs GOVRAG_OIDC_JWKS_URL or an https GOVRAG_OIDC_ISSUER (discovery)")
            if self.oidc_jwks_url and url_scheme(self.oidc_jwks_url) != "https":
                raise ValueError("production needs an https GOVRAG_OIDC_JWKS_URL: signing keys fetched over plain http"
                                 " can be substituted in transit")
            if self.master_key is None and self.master_key_file is None:
                raise ValueError(
                    "production needs GOVRAG_MASTER_KEY or an existing GOVRAG_MASTER_KEY_FILE;"
                    " a generated master key is refused"
                )
            if self.master_key_file is not None and not self.master_key_file.exists():
                raise ValueError("GOVRAG_MASTER_KEY_FILE does not exist; it is never generated in production")
            if self.embedded_database:
                raise ValueError("production needs GOVRAG_DATABASE_URL pointing at PostgreSQL")
            if self.metrics_token is None or not self.metrics_token.get_secret_value():
                raise ValueError("production needs GOVRAG_METRICS_TOKEN: an open /metrics names every department and"
                                 " its kill-switch state")
        return self

    @property
    def llm_host_allowed(self) -> bool:
        """True when GOVRAG_LLM_BASE_URL is http(s) to a host on GOVRAG_LLM_ALLOWED_HOSTS (issue 5)."""
        parts = url_parts(self.llm_base_url or "")
        if parts is None:  # refused by the check that names the setting, not by urlsplit's own message
            return False
        host = (parts.hostname or "").lower()
        return parts.scheme in {"http", "https"} and bool(host) and host in {h.lower() for h in self.llm_allowed_hosts}

    @property
    def is_production(self) -> bool:
        return self.env is Environment.production

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'govrag.db').resolve()}"

    @property
    def embedded_database(self) -> bool:
        """True on the embedded SQLite database (the default, a file in the data dir, or any GOVRAG_DATABASE_URL
        `sqlite:`), False on a server database (PostgreSQL)."""
        return self.resolved_database_url.startswith("sqlite")

    @property
    def resolved_qdrant_path(self) -> Path:
        default = "edge" if self.vector_backend == "edge" else "qdrant"
        return self.qdrant_path or self.data_dir / default

    @property
    def resolved_master_key_file(self) -> Path:
        return self.master_key_file or self.data_dir / "master.key"

    @property
    def resolved_checkpoint_file(self) -> Path:
        return self.audit_checkpoint_file or self.data_dir / "audit-checkpoints.jsonl"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def dev_issuer_dir(self) -> Path:
        return self.data_dir / "dev-issuer"


def url_scheme(url: str) -> str:
    """The scheme of url in lower case, as it is read when fetching ("HTTPS://idp" is https); "" if it does not parse.

    One reading for every https check (the issuer, the JWKS URL, a discovered jwks_uri): a prefix test would refuse
    "HTTPS://" at start that the fetch itself takes."""
    parts = url_parts(url)
    return parts.scheme if parts else ""


def service_url(url: str, schemes: Mapping[str, bool], forms: str) -> str:
    """`url` with its scheme in lower case (the code picking a client by it compares it so), once it is
    `scheme://...` with a scheme of `schemes`, a host where the scheme needs one (True), a port from 1 to 65535 if
    it names one, and for Redis a path that is a database's number or nothing and a query both its clients read alike.
    Else a ValueError saying what to fix in `forms`' terms, quoting at most the scheme (and a TLS query parameter's
    name, as govrag writes it): never the host, user name, password or anything else of the query."""
    parts = url_parts(url)
    if parts is None or not _SCHEME_THEN_AUTHORITY.match(url):
        raise ValueError(f"is not a URL ({forms})")
    if parts.scheme not in schemes:
        raise ValueError(f"names a scheme govrag does not support ({_quoted_name(parts.scheme)}): use {forms}")
    if any("@" in piece for piece in (parts.path, parts.query, parts.fragment)):
        raise ValueError(_STRAY_AT_REFUSAL)
    if not port_usable(parts.netloc, empty_is_default=True):
        raise ValueError(_PORT_REFUSAL)
    if schemes[parts.scheme] and not parts.hostname:
        raise ValueError(f"names no host ({forms})")
    # the user information as written: urlsplit drops a tab or a newline, which the logged URL keeps
    _require_maskable_credentials(_URL_AUTHORITY_END.split(url.partition("://")[2], maxsplit=1)[0].rpartition("@")[0])
    if parts.scheme in _REDIS_SCHEMES:
        if not _REDIS_DATABASE_PATH.fullmatch(parts.path):
            raise ValueError(f"names a Redis database that is not a number (/0, /1, ...): use {forms}")
        _require_redis_query(parts.query, tls=parts.scheme == "rediss", forms=forms)
    return parts.scheme + url[len(parts.scheme):]


def _require_redis_query(query: str, *, tls: bool, forms: str) -> None:
    """ValueError unless each parameter of a Redis URL's query, decoded as kombu and redis-py decode it, is one of
    _REDIS_TLS_PARAMETERS (on a rediss:// URL), named once, with a value both read alike. A refusal quotes nothing of
    the query but a name of _REDIS_TLS_PARAMETERS: any other (a bare `?hunter2`) may be a secret pasted in. redis-py
    reads `?db=` over the path (`-1` and a fullwidth `１` too), kombu refuses it."""
    named: set[str] = set()
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name.lower() == "db":
            raise ValueError("names its Redis database in the query (?db=), which Celery does not read: name it in the "
                             f"path (/0, /1, ...): use {forms}")
        if not tls or name not in _REDIS_TLS_PARAMETERS:
            quoted = f" ({name})" if name in _REDIS_TLS_PARAMETERS else ""
            raise ValueError(f"holds a query parameter{quoted} that Celery's broker and redis-py do not both read: "
                             f"{_REDIS_QUERY_TAKEN}")
        if name in named:  # kombu reads the last, redis-py the first
            raise ValueError(f"names the query parameter {name} more than once: name it once")
        values, described = _REDIS_TLS_PARAMETERS[name]
        if not values.fullmatch(value):
            raise ValueError(f"gives the query parameter {name} a value other than {described}")
        named.add(name)


def _require_maskable_credentials(userinfo: str) -> None:
    """ValueError unless a URL's user name and password hold no '/', '?', '#' or blank: the clients (SQLAlchemy,
    redis-py, httpx) read a '/' or a blank as part of them, but the log mask (reading a URL as RFC 3986 does, a blank
    ending it) ends the password there, and the URL was logged unmasked; SQLAlchemy reads a '?' or '#' in them, a '?'
    then a '/' in a user name as the start of the query (a service URL's reader ends them at either)."""
    if _UNMASKABLE_CREDENTIALS.search(userinfo):
        raise ValueError(_UNMASKABLE_CREDENTIALS_REFUSAL)


def _quoted_name(name: str) -> str:
    """A URL's scheme (or a database URL's driver) as a refusal quotes it: its first _QUOTED_NAME_CHARS characters and
    an ellipsis, so a value pasted into the wrong setting does not flood the log line (it holds no credentials: a
    scheme is letters, digits, `+`, `-` and `.`)."""
    return name if len(name) <= _QUOTED_NAME_CHARS else name[:_QUOTED_NAME_CHARS] + "…"


def _require_database_driver(url: str) -> None:
    """ValueError unless SQLAlchemy reads `url`, with a port from 1 to 65535 if any and a user name and password the
    log mask reads whole, and loads its dialect and driver; the message names the scheme only."""
    try:
        parsed = make_url(url)
    except db_errors.ArgumentError:
        raise ValueError("is not a database URL (postgresql+psycopg://USER@HOST/DATABASE, or sqlite:///PATH)") from None
    except ValueError:  # int() of a port that is no number, quoting it (a piece of a password holding '@' then ':')
        raise ValueError(_PORT_REFUSAL) from None
    after_scheme = url.partition("://")[2]
    authority = _DATABASE_AUTHORITY.match(after_scheme)  # as make_url read it
    if not port_usable(authority["host_and_port"], empty_is_default=False):
        raise ValueError(_PORT_REFUSAL)
    # SQLAlchemy ends the user information at its first '@': an '@' in a password leaves the rest in the host, a '/' in
    # a user name all of it, password and all, in a server database's name (quoted by the server's "does not exist"),
    # a '?' then a '/' in a user name all of it in the query.
    query = after_scheme[authority.end():].partition("?")[2]
    if "@" in (parsed.host or "") or (parsed.host and "@" in (parsed.database or "")) or "@" in query:
        raise ValueError(_STRAY_AT_REFUSAL)
    _require_maskable_credentials(authority["userinfo"] or "")
    try:
        parsed.get_dialect().import_dbapi()
    except (db_errors.NoSuchModuleError, ImportError):
        raise ValueError(f"names a database driver this install does not have ({_quoted_name(parsed.drivername)}): use "
                         "postgresql+psycopg:// (or sqlite:///)") from None


def _check_master_key_file(path: Path, *, production: bool) -> None:
    """Refuse a key file that cannot be read or parsed (never quoting it); one other users may read or write is
    refused in production and warned of in development (the generated file is 0600)."""
    if not path.exists():
        return
    where = f"the master key file {path}"
    try:
        crypto.parse_master_keyring(path.read_text(encoding="utf-8"))
    except OSError as exc:  # a folder, no permission
        raise ValueError(f"{where} cannot be read ({exc.strerror or type(exc).__name__})") from None
    except ValueError:  # not text, not base64, not 32 bytes, empty
        raise ValueError(f"{where} must hold {_KEYRING_FORM}") from None
    if path.stat().st_mode & (stat.S_IROTH | stat.S_IWOTH):
        complaint = f"{where} is readable or writable by other users: chmod 600 it"
        if production:
            raise ValueError(complaint)
        logger.warning(complaint)


@lru_cache
def get_settings() -> Settings:
    """The process's settings; tests override by clearing the cache or passing their own."""
    return Settings()
