"""Settings refuse dev defaults in production; envelope encryption round-trips and fails closed."""

from __future__ import annotations

import base64
import os
import stat
import threading
import traceback
from pathlib import Path

import pytest
from pydantic import ValidationError

from core import crypto
from core.settings import MAX_DEFAULT_INGEST_CONCURRENCY, Settings
from tests.support.lock_waits import waits_for_a_file_lock
from tests.support.polling import wait_until
from tests.support.production import production_settings

PROD = production_settings()


def test_production_accepts_a_complete_configuration() -> None:
    assert Settings(**PROD).is_production


@pytest.mark.parametrize(("override", "complaint"), [
    ({"dev_issuer": True}, "DEV_ISSUER"),
    ({"master_key": None}, "generated master key"),
    ({"database_url": None}, "PostgreSQL"),
    ({"oidc_jwks_url": None}, "JWKS"),
    # keys fetched in clear can be substituted; the issuer (discovery) has no loopback exception either
    ({"oidc_jwks_url": "http://idp.example/jwks"}, "https GOVRAG_OIDC_JWKS_URL"),
    ({"oidc_jwks_url": "http://127.0.0.1:8080/jwks"}, "https GOVRAG_OIDC_JWKS_URL"),
    ({"metrics_token": None}, "GOVRAG_METRICS_TOKEN"),  # an open /metrics names every department
    ({"metrics_token": ""}, "GOVRAG_METRICS_TOKEN"),
])
def test_production_refuses_dev_defaults(override: dict[str, object], complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        Settings(**{**PROD, **override})


@pytest.mark.parametrize("override", [{"oidc_jwks_url": "HTTPS://IDP.example/jwks"},
                                      {"oidc_jwks_url": None, "oidc_issuer": "HTTPS://idp.example/realms/govrag"}])
def test_production_reads_the_https_scheme_in_any_case(override: dict[str, object]) -> None:
    """A scheme is case-insensitive, and the fetch reads "HTTPS://" as https; a prefix test refused it at start."""
    assert Settings(**{**PROD, **override}).is_production


def test_development_takes_a_plain_http_jwks_url() -> None:
    assert Settings(oidc_jwks_url="http://127.0.0.1:8080/jwks").oidc_jwks_url == "http://127.0.0.1:8080/jwks"


def test_production_refuses_a_missing_master_key_file(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="never generated"):
        Settings(**{**PROD, "master_key": None, "master_key_file": tmp_path / "absent.key"})


@pytest.mark.parametrize("override", [
    {"master_key": ""},
    {"master_key": "not-base64-key-material"},
    {"master_key": base64.b64encode(b"k" * 16).decode()},  # AES-128-sized
    {"master_key": "v0:" + base64.b64encode(b"k" * 32).decode()},  # versions start at 1
    {"audit_checkpoint_key": "not-base64-key-material"},
])
def test_unusable_key_material_is_refused_at_start_without_quoting_it(override: dict[str, str]) -> None:
    """Not at the first upload, query or checkpoint: a 500 then, and every audited query after 100 rows."""
    with pytest.raises(ValidationError, match="must be base64 of 32 bytes") as refused:
        Settings(**{**PROD, **override})
    (value,) = override.values()
    assert not value or value not in str(refused.value)


@pytest.mark.parametrize("content", [
    "",  # emptied
    "not-base64-key-material\n",
    base64.b64encode(b"k" * 16).decode() + "\n",  # AES-128-sized
    "v1:" + base64.b64encode(b"k" * 32).decode() + "\nv1:" + base64.b64encode(b"j" * 32).decode() + "\n",
    b"\xff\xfe binary",
], ids=["empty", "not-base64", "16-bytes", "version-twice", "not-text"])
@pytest.mark.parametrize("env", ["development", "production"])
def test_an_unusable_master_key_file_is_refused_at_start_without_quoting_it(
        tmp_path: Path, content: str | bytes, env: str) -> None:
    """It was read only by the first upload or query (a 500, in production as in the embedded default)."""
    path = tmp_path / "master.key"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    path.chmod(0o600)
    settings = {**PROD, "master_key": None, "master_key_file": path} if env == "production" else {
        "data_dir": tmp_path}
    with pytest.raises(ValidationError, match=f"master key file {path} must hold base64 of 32 bytes") as refused:
        Settings(**settings)
    text = content.decode(errors="replace") if isinstance(content, bytes) else content
    assert not any(entry in str(refused.value) for entry in text.split())


def test_a_master_key_file_that_cannot_be_read_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "master.key").mkdir()
    with pytest.raises(ValidationError, match=f"master key file {tmp_path / 'master.key'} cannot be read"):
        Settings(data_dir=tmp_path)


def test_a_master_key_file_every_user_can_read_is_refused_in_production_and_warned_of_in_development(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "master.key"
    crypto.write_master_keyring(path, {1: crypto.new_key()})
    assert Settings(**{**PROD, "master_key": None, "master_key_file": path}).is_production  # created 0600: usable
    path.chmod(0o644)
    with pytest.raises(ValidationError, match="readable or writable by other users: chmod 600"):
        Settings(**{**PROD, "master_key": None, "master_key_file": path})
    with caplog.at_level("WARNING", logger="core.settings"):
        assert not Settings(data_dir=tmp_path).is_production
    assert "readable or writable by other users" in caplog.text
    assert Settings(**PROD, master_key_file=path).master_key is not None  # GOVRAG_MASTER_KEY: the file is unused


def test_a_usable_checkpoint_key_and_keyring_are_accepted() -> None:
    key = base64.b64encode(b"c" * 32).decode()
    settings = Settings(**{**PROD, "audit_checkpoint_key": key, "master_key": f"v2:{key},v1:{PROD['master_key']}"})
    assert crypto.decode_master_key(settings.audit_checkpoint_key.get_secret_value()) == b"c" * 32


def test_a_refusal_never_quotes_the_values_it_was_given() -> None:
    with pytest.raises(ValidationError, match="DEV_ISSUER") as refused:
        Settings(**{**PROD, "dev_issuer": True})
    assert PROD["metrics_token"] not in str(refused.value)


_WITH_CREDENTIALS = [
    {"answer_backend": "openai", "llm_base_url": "http://llm:s3cret@127.0.0.1:8080"},
    {"answer_backend": "openai", "llm_base_url": "http://127.0.0.1@evil.example:8080"},  # no password, still refused
    {"oidc_jwks_url": "https://govrag:s3cret@idp.example/jwks"},
    {"oidc_issuer": "https://govrag:s3cret@idp.example/realms/x"},
]


@pytest.mark.parametrize("override", _WITH_CREDENTIALS)
def test_a_url_govrag_calls_is_refused_at_start_with_a_user_name_or_password(override: dict[str, str]) -> None:
    """The model server's and the IdP's URLs were taken with `user:password@` in them: httpx then sent them as an
    Authorization: Basic header (in clear over http) in place of the bearer key, and the server said 401. Refused at
    start, the setting named, its value never quoted."""
    with pytest.raises(ValidationError, match="must not hold a user name or password") as refused:
        Settings(**override)
    (name, url), = ((k, v) for k, v in override.items() if k != "answer_backend")
    assert name in str(refused.value) and "s3cret" not in str(refused.value) and url not in str(refused.value)


@pytest.mark.parametrize(("setting", "url"), [
    ("llm_base_url", "http://127.0.0.1:99999/v1"), ("llm_base_url", "http://127.0.0.1:8o80"),
    ("llm_base_url", "http://127.0.0.1:"), ("llm_base_url", "http://[::1]:/v1"), ("llm_base_url", "http://localhost:0"),
    ("llm_base_url", "http://127.0.0.1:\uff18\uff10/v1"), ("llm_base_url", "http://127.0.0.1:+80/v1"),
    ("oidc_jwks_url", "https://idp.example:844300/jwks"), ("oidc_jwks_url", "https://idp.example:/jwks"),
    ("oidc_issuer", "https://idp.example:-443/realms/x"), ("oidc_issuer", "https://idp.example:/realms/x"),
    ("llm_base_url", "http://[::1]8080/v1"), ("oidc_jwks_url", "https://[2001:db8::1]99999/jwks"),
    ("llm_base_url", "http://[::1]:8080]/v1"), ("oidc_jwks_url", "https://[2001:db8::1]]:8443/jwks"),
])
def test_a_url_govrag_calls_is_refused_at_start_with_a_port_no_server_listens_on(setting: str, url: str) -> None:
    """The model server's and the IdP's URLs were taken with any port (no check but the host's allowlist and the
    scheme's): httpx called port 99999 and refused `:8o80` at each call, every answer extractive, every token refused.
    An empty port is refused as well: a port deleted or never typed, and so is one after an IPv6 host's `]` with no `:`,
    which httpx reads as the port and urlsplit as none. Refused at start, the setting named, unquoted."""
    with pytest.raises(ValidationError) as refused:
        Settings(**{**({"answer_backend": "openai"} if setting == "llm_base_url" else PROD), setting: url})
    assert [(error["loc"], error["msg"]) for error in refused.value.errors()] == [
        ((setting,), "Value error, names a port that is not a number from 1 to 65535")]
    assert url not in str(refused.value) and "idp.example" not in str(refused.value)


def test_govrag_names_a_url_with_credentials_in_one_line_at_start(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from api import cli
    from core.settings import get_settings

    monkeypatch.setenv("GOVRAG_ANSWER_BACKEND", "openai")
    monkeypatch.setenv("GOVRAG_LLM_BASE_URL", "http://llm:s3cret@127.0.0.1:8080")
    get_settings.cache_clear()
    try:
        assert cli.main(["token", "--sub", "alice"]) == 2
    finally:
        get_settings.cache_clear()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        "govrag: the settings were refused; nothing was started\n"
        "  GOVRAG_LLM_BASE_URL: Value error, must not hold a user name or password (user:password@host)\n")


@pytest.mark.parametrize("days", [-30, 0, 36501, 1_000_000])
def test_a_retention_period_outside_a_day_to_a_century_is_refused(days: int) -> None:
    """Negative: the cutoff lies in the future and `govrag audit purge` deletes the whole ledger; huge: it crashes."""
    with pytest.raises(ValidationError, match="audit_retention_days"):
        Settings(audit_retention_days=days)


def test_embedded_master_key_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "master.key"
    first = crypto.load_or_create_master_keyring(path, create=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert crypto.load_or_create_master_keyring(path, create=False) == first
    with pytest.raises(FileNotFoundError):
        crypto.load_or_create_master_keyring(tmp_path / "other.key", create=False)


def test_the_master_key_file_is_created_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Created as a rotation writes it: the file and its directory are fsynced (a power cut after the first upload
    could leave an empty key file), no temp file is left, and a file another process created first is read, never
    replaced."""
    synced: list[bool] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real_fsync(fd))[1])
    path = tmp_path / "master.key"
    crypto.load_or_create_master_keyring(path, create=True)
    assert sorted(synced) == [False, True]
    assert _key_folder(tmp_path) == [".master.key.lock", "master.key"]  # no temp file left

    theirs, real_new_key = {1: crypto.new_key()}, crypto.new_key
    raced = tmp_path / "raced.key"

    def created_meanwhile() -> bytes:
        crypto.write_master_keyring(raced, theirs)
        return real_new_key()

    monkeypatch.setattr(crypto, "new_key", created_meanwhile)
    assert crypto.load_or_create_master_keyring(raced, create=True) == theirs


def test_a_process_creating_the_master_key_while_another_does_uses_the_one_created_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """They wrote one temp file name (`.master.key.tmp`), each removing the one before: a creator starting while
    another was between writing its key and publishing it removed that one's temp file, which then failed ("No such
    file or directory"). Every writer of the key file now holds its lock: the second creator waits, then reads the
    key the first created."""
    path = tmp_path / "fresh" / "master.key"
    written, publish, real_link = threading.Event(), threading.Event(), os.link

    def link_the_first_key_when_told(source: Path, target: Path) -> None:
        if not written.is_set():
            written.set()
            publish.wait(timeout=300)
        real_link(source, target)

    monkeypatch.setattr(os, "link", link_the_first_key_when_told)
    outcomes: dict[str, dict[int, bytes] | str] = {}

    def create(name: str) -> None:
        try:
            outcomes[name] = crypto.load_or_create_master_keyring(path, create=True)
        except Exception as exc:  # reported, for the test to show
            outcomes[name] = f"{type(exc).__name__}: {exc}"

    first = threading.Thread(target=create, args=("first",))
    first.start()
    assert written.wait(timeout=300)
    second = threading.Thread(target=create, args=("second",))
    second.start()
    wait_until(lambda: not second.is_alive() or waits_for_a_file_lock(os.getpid()), timeout=300,
               what="the second creator to finish or to wait for a lock")
    publish.set()
    first.join(timeout=300)
    second.join(timeout=300)
    ring = crypto.load_or_create_master_keyring(path, create=False)
    assert outcomes == {"first": ring, "second": ring}
    assert _key_folder(path.parent) == [".master.key.lock", "master.key"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_temp_file_a_crashed_writer_left_is_gone_after_the_next_write(tmp_path: Path) -> None:
    """A writer killed between writing its temp file and publishing it leaves key material beside the key file; the
    next write, creating the file or rotating, holds the lock (nobody else is mid-write) and removes it."""
    path, left = tmp_path / "master.key", tmp_path / ".master.key.tmp"
    left.write_text(crypto.format_master_keyring({1: crypto.new_key()}))
    ring = crypto.load_or_create_master_keyring(path, create=True)
    assert _key_folder(tmp_path) == [".master.key.lock", "master.key"]
    left.write_text(crypto.format_master_keyring({**ring, 2: crypto.new_key()}))
    with crypto.master_keyring_lock(path):
        crypto.write_master_keyring(path, {**ring, 3: crypto.new_key()})
    assert _key_folder(tmp_path) == [".master.key.lock", "master.key"]
    assert set(crypto.load_or_create_master_keyring(path, create=False)) == {1, 3}


def _key_folder(folder: Path) -> list[str]:
    """The names in the key file's folder."""
    return sorted(entry.name for entry in folder.iterdir())


def test_sealed_text_round_trips_and_is_bound_to_its_context() -> None:
    key = crypto.new_key()
    sealed = crypto.seal_text(key, "quarterly numbers", "govrag:chunk:doc:0")
    assert "quarterly" not in sealed
    assert crypto.open_text(key, sealed, "govrag:chunk:doc:0") == "quarterly numbers"
    with pytest.raises(crypto.DecryptionError):
        crypto.open_text(key, sealed, "govrag:chunk:doc:1")
    with pytest.raises(crypto.DecryptionError):
        crypto.open_text(crypto.new_key(), sealed, "govrag:chunk:doc:0")


CHUNK = "govrag:chunk:doc:0"
SEALED = crypto.seal_text(b"k" * 32, "quarterly numbers", CHUNK)


@pytest.mark.parametrize("token", ["abc", "!!!!", "é", "", SEALED[:-1], SEALED[:8]])
def test_a_malformed_token_fails_closed(token: str) -> None:
    """An altered payload that is not base64 (or is cut short) is a DecryptionError like a forged one, so the query's
    re-check drops the chunk instead of failing the query."""
    assert crypto.open_text(b"k" * 32, SEALED, CHUNK) == "quarterly numbers"
    with pytest.raises(crypto.DecryptionError):
        crypto.open_text(b"k" * 32, token, CHUNK)


def test_master_key_must_be_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        crypto.decode_master_key(base64.b64encode(b"short").decode())


_KEY, _OTHER_KEY = base64.b64encode(b"k" * 32).decode(), base64.b64encode(b"j" * 32).decode()


@pytest.mark.parametrize("text", [f"v2:{_KEY};v1:{_OTHER_KEY}", f"{_KEY}:", f"key-{_KEY}:{_OTHER_KEY}"],
                         ids=["semicolons", "trailing-colon", "bad-label"])
def test_a_keyring_that_does_not_parse_is_refused_without_quoting_it(text: str) -> None:
    """An entry whose version label was not a number (a wrong separator, a stray colon) was refused with int()'s
    message, which quotes the label: the keys in it, on the terminal of a command that read a key file changed under
    it. The refusal now says what an entry must be, and nothing it was given, chained errors included."""
    with pytest.raises(ValueError, match="v<N>:<base64>") as refused:
        crypto.parse_master_keyring(text)
    shown = "".join(traceback.format_exception(refused.value))
    assert _KEY not in shown and _OTHER_KEY not in shown and _KEY[:16] not in shown


def test_a_worker_ingests_one_document_per_core_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    from api.cli import _parser

    monkeypatch.delenv("GOVRAG_INGEST_CONCURRENCY", raising=False)
    assert Settings().ingest_concurrency == min(os.cpu_count() or 1, MAX_DEFAULT_INGEST_CONCURRENCY)
    monkeypatch.setenv("GOVRAG_INGEST_CONCURRENCY", "3")
    assert Settings().ingest_concurrency == 3
    monkeypatch.setenv("GOVRAG_INGEST_CONCURRENCY", "0")
    with pytest.raises(ValidationError):
        Settings()
    assert _parser().parse_args(["worker"]).concurrency is None  # the setting decides
    assert _parser().parse_args(["worker", "--concurrency", "4"]).concurrency == 4
    with pytest.raises(SystemExit):
        _parser().parse_args(["worker", "--concurrency", "0"])


def test_production_serves_no_api_pages_that_load_scripts_from_a_public_cdn(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from api.app import create_app

    production = create_app(Settings(**PROD, data_dir=tmp_path))
    development = create_app(Settings(data_dir=tmp_path))

    assert (production.docs_url, production.redoc_url) == (None, None)
    assert production.openapi_url == "/openapi.json"
    assert development.docs_url == "/docs"
