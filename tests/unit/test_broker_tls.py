"""A rediss:// broker's certificate is checked by Celery's connection (kombu) as redis-py checks it. kombu read a
rediss:// URL naming no ssl_ parameter as TLS without the check (CERT_NONE, a warning in the log), so a Redis
impersonated between govrag and the real one got the tasks (the documents' ids, the departments) while redis-py,
with the same URL, refused it."""

from __future__ import annotations

import logging
from contextlib import closing
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from kombu.exceptions import OperationalError

from core.settings import Settings
from tests.conftest import REDIS_URL
from tests.support.tls_redis import LOOPBACK, make_tls_files, tls_redis
from workers.celery_app import create_celery

_ONE_TRY = {"max_retries": 0}


def _celery_pings(settings: Settings) -> bool:
    with create_celery(settings).connection_for_write() as connection:
        connection.ensure_connection(**_ONE_TRY)
        return bool(connection.default_channel.client.ping())


def _settings(tmp_path: Path, url: str) -> Settings:
    return Settings(data_dir=tmp_path / "data", broker_url=url, broker_socket_timeout_seconds=5)


def test_celery_refuses_a_rediss_broker_whose_certificate_no_trusted_ca_signed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The relay's certificate is signed by a CA the client does not trust: Celery's connection is refused as
    redis-py's is. Trusting the CA (OpenSSL's SSL_CERT_FILE, the system's CAs as both read them) lets both in, so
    the certificate check is what refused them; `ssl_cert_reqs=none` lets Celery in, said in the log."""
    files = make_tls_files(tmp_path)
    redis_at = urlsplit(REDIS_URL)
    with tls_redis(files, (redis_at.hostname or LOOPBACK, redis_at.port or 6379), client_certificate=False) as port:
        settings = _settings(tmp_path, f"rediss://{LOOPBACK}:{port}/0")
        with pytest.raises(OperationalError, match="certificate verify failed"):
            _celery_pings(settings)
        with closing(redis.Redis.from_url(settings.broker_url, socket_timeout=5)) as client, \
                pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            client.ping()

        monkeypatch.setenv("SSL_CERT_FILE", str(files.ca))
        assert _celery_pings(settings)
        with closing(redis.Redis.from_url(settings.broker_url, socket_timeout=5)) as client:
            assert client.ping()

        monkeypatch.delenv("SSL_CERT_FILE")
        with caplog.at_level(logging.WARNING, logger="workers.celery_app"):
            assert _celery_pings(_settings(tmp_path, f"rediss://{LOOPBACK}:{port}/0?ssl_cert_reqs=none"))
        assert [record.getMessage() for record in caplog.records if record.name == "workers.celery_app"] == [
            "GOVRAG_BROKER_URL asks for no check of the Redis server's certificate (ssl_cert_reqs=none): anyone "
            "between govrag and Redis can read and change the tasks"]


@pytest.mark.parametrize("url", ["memory://", "redis://127.0.0.1:6379/0"])
def test_a_broker_without_tls_is_given_no_tls_options(tmp_path: Path, url: str) -> None:
    """kombu speaks TLS to a broker given TLS options, a redis:// one too."""
    assert not create_celery(_settings(tmp_path, url)).conf.broker_use_ssl
