"""The URLs of the services govrag connects to (Qdrant, the broker, the OTLP collector, the database) are read at start
as their clients read them: one that cannot reach its service is refused, the setting named, quoted no more than its
scheme. `GOVRAG_QDRANT_URL=garbage` and `GOVRAG_BROKER_URL=garbage` started (qdrant-client took a bare word for a host,
/readyz failed later; Celery retried for ever), and a port over 65535 passed the database URL's check."""

from __future__ import annotations

import random
from contextlib import closing
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest
import redis
from kombu import Connection
from pydantic import ValidationError

from core.logs import mask
from core.settings import Settings, service_url
from tests.conftest import REDIS_URL
from tests.support.tls_redis import LOOPBACK, make_tls_files, tls_redis

REDIS = {"memory": False, "redis": True, "rediss": True}
REDIS_FORMS = "memory://, redis://HOST:6379/0 or rediss://HOST:6379/0"
PORT = ("names a port that is not a number from 1 to 65535 (in a user name or password, percent-encode any "
        "@ : / ? #)")
ENCODE = "in a user name or password, percent-encode any @ : / ? #"
STRAY_AT = f"holds an @ after its host ({ENCODE})"
UNMASKABLE = ("holds a /, ?, # or a blank in its user name or password, which may end it early and show the rest in "
              "the logs: write each / as %2F, each ? as %3F, each # as %23 and each space as %20 (a tab as %09) in the "
              "URL; the password itself stays as it is")
PASSWORD = "hunter@2:s3cret/x"  # every character that ends a piece of a URL early
SECRET_PIECES = ("hunter", "s3cret")
URL_BREAKERS = "@:/?#[]% \t=&"


@pytest.mark.parametrize("url", [
    "memory://", "memory://localhost/", "redis://redis:6379/0", "rediss://cache.example:6380/1", "redis://[::1]:6379",
    "redis://:hunter%402%3As3cret%2Fx@redis:6379/0", "redis://govrag:hunter@2:s3cret@redis:6379/0",
    "redis://redis:/0"])
def test_a_broker_url_its_clients_reach_is_taken_as_it_is(url: str) -> None:
    """A password with an '@' and a ':' but no '/' reads as redis-py and kombu read it (the authority ends at its last
    '@'); an empty port is the scheme's default."""
    assert service_url(url, REDIS, REDIS_FORMS) == url


def test_the_scheme_is_taken_in_any_case_and_handed_on_in_lower_case() -> None:
    """The code choosing a client by the broker's scheme compares it in lower case."""
    assert service_url("REDIS://Redis:6379/0", REDIS, REDIS_FORMS) == "redis://Redis:6379/0"


@pytest.mark.parametrize(("url", "why"), [
    ("garbage", f"is not a URL ({REDIS_FORMS})"),
    ("localhost:6379", f"is not a URL ({REDIS_FORMS})"),
    (" redis://redis:6379/0", f"is not a URL ({REDIS_FORMS})"),
    ("redis://[::1:6379/0", f"is not a URL ({REDIS_FORMS})"),
    ("redsi://govrag:s3cret@redis:6379/0", f"names a scheme govrag does not support (redsi): use {REDIS_FORMS}"),
    ("amqp://guest:s3cret@rabbit:5672//", f"names a scheme govrag does not support (amqp): use {REDIS_FORMS}"),
    ("sentinel://:s3cret@sentinel:26379", f"names a scheme govrag does not support (sentinel): use {REDIS_FORMS}"),
    ("redis+socket:///run/s3cret.sock", f"names a scheme govrag does not support (redis+socket): use {REDIS_FORMS}"),
    ("redis:///0", f"names no host ({REDIS_FORMS})"),
    ("redis://:s3cret@:6379/0", f"names no host ({REDIS_FORMS})"),
    ("redis://redis:0/0", PORT),
    ("redis://redis:65536/0", PORT),
    ("redis://redis:6379s3cret/0", PORT),
    ("redis://redis:-1/0", PORT),
    ("redis://redis:\uff16\uff13\uff17\uff19/0", PORT),
    ("redis://redis:+6379/0", PORT),
])
def test_a_broker_url_no_client_reaches_is_refused_naming_at_most_its_scheme(url: str, why: str) -> None:
    with pytest.raises(ValueError) as refused:
        service_url(url, REDIS, REDIS_FORMS)
    assert str(refused.value) == why and "s3cret" not in why


@pytest.mark.parametrize("url", [
    "redis://redis:6379/abc", "redis://redis:6379/0/extra", "rediss://:s3cret@redis:6380/1/2", "redis://redis:6379/-1",
    "redis://redis:6379/%31", "redis://redis:6379/\u0663", "redis://redis:6379/0 ", "redis://redis/0/"])
def test_a_redis_url_whose_path_is_no_database_number_is_refused(url: str) -> None:
    """The path was taken as it was: redis-py (the job sweep, the guard's counters, the queue-depth metric) read `/abc`
    as database 0 and `/1/2` as database 12, and kombu (Celery) refused both at its first connection; `/-1` is no
    database Redis has."""
    with pytest.raises(ValueError) as refused:
        service_url(url, REDIS, REDIS_FORMS)
    assert str(refused.value) == f"names a Redis database that is not a number (/0, /1, ...): use {REDIS_FORMS}"


@pytest.mark.parametrize(("url", "why"), [
    (f"redis://govrag:{PASSWORD}@redis:6379/0", STRAY_AT),  # the '/' ends the authority inside the password
    ("redis://govrag:s3cret/x@redis:6379/0", STRAY_AT),  # "s3cret" read as the port
    ("redis://govrag:12/34@redis:6379/0", STRAY_AT),  # "12" read as the port, "govrag" as the host
    ("redis://govrag:12?34@redis:6379/0", STRAY_AT),
    ("redis://govrag:12#34@redis:6379/0", STRAY_AT),
])
def test_a_password_holding_an_unencoded_slash_is_refused_without_a_piece_of_it(url: str, why: str) -> None:
    """urlsplit's own message quoted the piece of the password it took for the port ("Port could not be cast to
    integer value as 's3cret'"); a piece that is a number was a host and port to call, quoted by the client's errors."""
    with pytest.raises(ValueError) as refused:
        service_url(url, REDIS, REDIS_FORMS)
    assert str(refused.value) == why and not any(piece in why for piece in SECRET_PIECES)


@pytest.mark.parametrize(("url", "why"), [
    ("garbage", "is not a URL (http://HOST:6333 or https://HOST:6333)"),  # qdrant-client: http://garbage:6333
    ("qdrant", "is not a URL (http://HOST:6333 or https://HOST:6333)"),
    ("localhost:6333", "is not a URL (http://HOST:6333 or https://HOST:6333)"),
    ("grpc://qdrant:6334", "names a scheme govrag does not support (grpc): use http://HOST:6333 or https://HOST:6333"),
    ("http://:6333", "names no host (http://HOST:6333 or https://HOST:6333)"),
    ("http://qdrant:0", PORT),  # qdrant-client called port 6333
    ("http://qdrant:70000", PORT),  # urllib3's LocationParseError quoted the whole URL
])
def test_settings_refuse_a_qdrant_url_that_is_not_an_http_url_of_a_host(url: str, why: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(qdrant_url=url)
    assert [(error["loc"], error["msg"]) for error in refused.value.errors()] == [(("qdrant_url",),
                                                                                  f"Value error, {why}")]


@pytest.mark.parametrize("url", ["http://qdrant:6333", "https://qdrant.example", "http://gateway:8080/qdrant"])
def test_settings_take_a_qdrant_server_url(url: str) -> None:
    assert Settings(qdrant_url=url).qdrant_url == url


@pytest.mark.parametrize(("setting", "url", "why"), [
    ("broker_url", f"redis://govrag:{PASSWORD}@redis:6379/0", STRAY_AT),
    ("broker_url", "redis://govrag:hunter@2:s3cret@redis:70000/0", PORT),
    ("broker_url", "rediss://govrag:hunter@2:s3cret@redis:0/0", PORT),
    ("broker_url", "redis://gov?x/y:hunter@redis:6379/0", STRAY_AT),  # a ? or # ends the authority: the rest the query
    ("broker_url", "redis://govrag:hunter#s3cret@redis:6379/0", STRAY_AT),
    ("qdrant_url", "https://gov?rag:hunter@qdrant:6333", STRAY_AT),
    ("qdrant_url", "https://gov#x/y:hunter@qdrant:6333", STRAY_AT),
    ("otel_exporter_otlp_endpoint", "http://govrag:hunter?s3cret@collector:4318/v1/traces", STRAY_AT),
    ("otel_exporter_otlp_endpoint", "http://gov#rag:hunter@collector:4318/v1/traces", STRAY_AT),
    ("otel_exporter_otlp_endpoint", "http://collector:431800/v1/traces", PORT),  # a digit too many: export errors
    ("qdrant_url", "http://[::1]6333", PORT),  # httpx reads port 6333 after the ], urlsplit none
    ("qdrant_url", "http://[::1]]:6333", PORT),  # urlsplit: host ::1, port 6333; httpx: an invalid IPv6 host
    ("database_url", "postgresql+psycopg://govrag:hunter@[::1]5432/govrag", PORT),  # SQLAlchemy: no port, no database
    ("database_url", "postgresql+psycopg://govrag:hunter@[::1]]:5432/govrag", PORT),  # SQLAlchemy: host "::1]"
    ("database_url", "postgresql+psycopg://govrag:hunter@[::1]:5432]/govrag", PORT),  # SQLAlchemy: host "::1]:5432"
    ("database_url", "postgresql+psycopg://govrag:hunter@2:s3cret@127.0.0.1:5432/govrag", PORT),  # int()'s ValueError
    ("database_url", "postgresql+psycopg://govrag:hunter@2@127.0.0.1:5432/govrag", STRAY_AT),  # host "2@127.0.0.1"
    ("database_url", "postgresql+psycopg://govrag:hunter@127.0.0.1:65536/govrag", PORT),
    ("database_url", "postgresql+psycopg://govrag:hunter@127.0.0.1:0/govrag", PORT),
    ("database_url", "sqlite://localhost:99999/govrag.db", PORT),
])
def test_settings_refuse_a_port_or_an_at_sign_no_client_reads_without_quoting_the_url(setting: str, url: str,
                                                                                     why: str) -> None:
    """The database URL's port was read by SQLAlchemy as any number: 65536 passed the check (psycopg then refused it
    at the first connection); a password holding an '@' and no ':' after it made the rest of it the host to call."""
    with pytest.raises(ValidationError) as refused:
        Settings(**{setting: url})
    assert [(error["loc"], error["msg"]) for error in refused.value.errors()] == [((setting,), f"Value error, {why}")]
    assert not any(piece in str(refused.value) for piece in (*SECRET_PIECES, url, "collector"))


@pytest.mark.parametrize("url", ["postgresql+psycopg://govrag:hunter%402%3As3cret%2Fx@127.0.0.1:5432/govrag",
                                 "postgresql+psycopg://govrag:s3cret%2Fx@127.0.0.1:65535/govrag",
                                 "postgresql+psycopg://gov%3Fr%23ag:s3%3Fc%23ret%40x%2Fy@127.0.0.1:5432/govrag",
                                 "postgresql+psycopg://govrag:s3cret@127.0.0.1:0080/govrag", "sqlite:///govrag.db",
                                 "sqlite:////srv/govrag@prod/govrag.db"])
def test_settings_take_a_database_url_whose_port_and_password_read_as_written(url: str) -> None:
    """A '/', '?', '#' or '@' in a user name or password percent-encoded (SQLAlchemy decodes them); an '@' in an SQLite
    file's path."""
    assert Settings(database_url=url).database_url == url


@pytest.mark.parametrize(("url", "why"), [
    ("postgresql+psycopg://govrag:s3cret/x@db/govrag", UNMASKABLE),
    ("postgresql+psycopg://govrag:s3cret?x/y@db:5432/govrag", UNMASKABLE),
    ("postgresql+psycopg://govrag:/s3cret@db/govrag", UNMASKABLE),
    ("postgresql+psycopg://govrag:s3cret x@db/govrag", UNMASKABLE),
    ("postgresql+psycopg://govrag:s3cret\tx@db/govrag", UNMASKABLE),
    ("postgresql+psycopg://gov rag:s3cret@db/govrag", UNMASKABLE),
    ("postgresql+psycopg://gov/rag:s3cret@db/govrag", STRAY_AT),  # SQLAlchemy: host "gov", the rest the database
])
def test_a_database_url_whose_credentials_the_log_mask_cannot_read_is_refused(url: str, why: str) -> None:
    """SQLAlchemy read `govrag:s3cret/x@db` as password `s3cret/x` (and `s3cret x` as `s3cret x`), but the log mask
    (reading a URL as RFC 3986 does, a '/' or a blank ending the password) left it unmasked: the URL was logged whole.
    A '/' in the user name made SQLAlchemy read the password into the database's name. Refused at start, saying to
    percent-encode, quoting none of the URL."""
    with pytest.raises(ValidationError) as refused:
        Settings(database_url=url)
    assert [(error["loc"], error["msg"]) for error in refused.value.errors()] == [(("database_url",),
                                                                                  f"Value error, {why}")]
    assert "s3cret" not in str(refused.value) and "rag:" not in str(refused.value)


@pytest.mark.parametrize(("url", "why"), [
    ("postgresql+psycopg://gov?x/y:s3cret@db/govrag", STRAY_AT),  # SQLAlchemy: host "gov", the rest the query
    ("postgresql+psycopg://?x/y:s3cret@db/govrag", STRAY_AT),
    ("postgresql+psycopg://gov#x?y/z:s3cret@db/govrag", STRAY_AT),
    ("postgresql+psycopg://gov?rag:s3cret@db/govrag", UNMASKABLE),
    ("postgresql+psycopg://gov#rag:s3cret@db/govrag", UNMASKABLE),
    ("postgresql+psycopg://gov?rag@db/govrag", UNMASKABLE),
    ("postgresql+psycopg://govrag:s3cret?x@db/govrag", UNMASKABLE),
    ("postgresql+psycopg://govrag:s3cret#x@db:5432/govrag", UNMASKABLE),
    ("postgresql+psycopg://govrag:s3cret#x@db/govrag?sslmode=require", UNMASKABLE),
])
def test_a_database_url_with_an_unencoded_question_mark_or_hash_in_its_credentials_is_refused(url: str,
                                                                                              why: str) -> None:
    """`gov?x/y:s3cret@db` was taken: SQLAlchemy read host `gov` and the rest, password and all, as the query, which
    neither the log mask nor the credential checks read. A `?` or `#` that SQLAlchemy does read in the user name or
    password ends them for a reader of the URL as RFC 3986 writes it, and for the service URLs' checks: refused alike,
    saying to percent-encode, quoting none of the URL."""
    with pytest.raises(ValidationError) as refused:
        Settings(database_url=url)
    assert [(error["loc"], error["msg"]) for error in refused.value.errors()] == [(("database_url",),
                                                                                  f"Value error, {why}")]
    assert "s3cret" not in str(refused.value) and "rag:" not in str(refused.value)


@pytest.mark.parametrize("breaker", sorted(URL_BREAKERS + "\n"))
@pytest.mark.parametrize(("setting", "url"), [("broker_url", "redis://{userinfo}@redis:6379/0"),
                                              ("qdrant_url", "https://{userinfo}@qdrant:6333"),
                                              ("otel_exporter_otlp_endpoint", "http://{userinfo}@otel:4318/v1/traces")])
def test_a_service_url_the_settings_take_is_logged_with_its_credentials_masked(setting: str, url: str,
                                                                                breaker: str) -> None:
    """As for the database URL: a service URL whose password held a blank (`redis://u:pa ss@redis`, a tab too, which
    urlsplit drops but the logged URL keeps) was taken and logged unmasked. Whatever character a user name or password
    holds unencoded (then a `/` in the user name, which ends it for the mask), a service URL the settings take comes
    out of the log mask without a piece of either."""
    for user, password in (("u5er9x", f"s3c{breaker}r3t"), ("u5er9x", f"{breaker}s3cr3t"),
                           ("u5er9x", f"s3cr3t{breaker}"), (f"u5e{breaker}r9x", "s3cr3t"),
                           (f"u5e{breaker}r/9x", "s3cr3t")):
        written = url.format(userinfo=f"{user}:{password}")
        try:
            Settings(**{setting: written})
        except ValidationError as refused:
            assert not any(piece in str(refused) for piece in ("u5e", "r9x", "s3c", "r3t")), written
            continue
        assert not any(piece in mask(f"connecting to {written} failed") for piece in ("u5e", "r9x", "s3c", "r3t")), \
            written


@pytest.mark.parametrize("breaker", sorted(URL_BREAKERS + "\n"))
def test_a_database_url_the_settings_take_is_logged_with_its_credentials_masked(breaker: str) -> None:
    """Whatever character a user name or password holds unencoded (then a `/` in the user name, which ends it for the
    mask), a database URL the settings take (as SQLAlchemy reads it) comes out of the log mask without a piece of
    either: the URL is refused, or masked whole. `u5e?r/9x:s3cr3t@db` was taken: SQLAlchemy read host `u5e` and the
    rest as the query, and the mask left it."""
    taken = 0
    for user, password in (("u5er9x", f"s3c{breaker}r3t"), ("u5er9x", f"{breaker}s3cr3t"),
                           ("u5er9x", f"s3cr3t{breaker}"), (f"u5e{breaker}r9x", "s3cr3t"),
                           (f"u5e{breaker}r/9x", "s3cr3t")):
        url = f"postgresql+psycopg://{user}:{password}@db:5432/govrag?sslmode=require"
        try:
            Settings(database_url=url)
        except ValidationError:
            continue
        taken += 1
        assert not any(piece in mask(f"connecting to {url} failed") for piece in ("u5e", "r9x", "s3c", "r3t")), url
    assert taken or breaker in "@/?# \t\n"  # only those make SQLAlchemy, the mask or RFC 3986 read the URL otherwise


@pytest.mark.parametrize("port", ["\uff18\uff10", "+80", "-80", " 80", "80 ", "5_432", "0", "00", "65536", "000080"])
def test_a_database_url_s_port_is_one_to_five_ascii_digits_naming_1_to_65535(port: str) -> None:
    """SQLAlchemy reads a port with int(): `:８０` (fullwidth), `:+80`, `: 80` and `:5_432` passed as ports 80 and 5432,
    where the model server's, the IdP's and the service URLs refuse them."""
    for host in ("db", "[::1]"):
        with pytest.raises(ValidationError) as refused:
            Settings(database_url=f"postgresql+psycopg://govrag:s3cret@{host}:{port}/govrag")
        assert [(error["loc"], error["msg"]) for error in refused.value.errors()] == [(("database_url",),
                                                                                      f"Value error, {PORT}")]
        assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize("url", [
    "redis://:s3cret@redis:6379/0?db=1", "redis://:s3cret@redis:6379/0?db=abc", "redis://:s3cret@redis:6379/0?db=-1",
    "redis://:s3cret@redis:6379/0?db=\uff11", "redis://:s3cret@redis:6379/0?db=", "redis://:s3cret@redis:6379/0?%64b=2",
    "rediss://:s3cret@redis:6379/0?ssl_cert_reqs=none&db=1", "redis://:s3cret@redis:6379/0?DB=1",
    "rediss://:s3cret@redis:6379/0?Db=1", "redis://redis:6379/0?db"])
def test_a_redis_url_naming_its_database_in_the_query_is_refused(url: str) -> None:
    """redis-py (the job sweep, the guard's counters, the queue-depth metric) read `?db=` over the path, `-1` and a
    fullwidth `１` too, and refused `abc` only when first used; kombu (Celery) refused a URL holding any `db` in its
    query at its first connection, so the workers never connected. `?DB=` passed, which kombu refuses and redis-py
    hands to the connection, a TypeError at its first command."""
    with pytest.raises(ValidationError) as refused:
        Settings(broker_url=url)
    assert [(error["loc"], error["msg"]) for error in refused.value.errors()] == [(
        ("broker_url",), "Value error, names its Redis database in the query (?db=), which Celery does not read: "
                         f"name it in the path (/0, /1, ...): use {REDIS_FORMS}")]
    assert "s3cret" not in str(refused.value)


TLS_PARAMETERS = "ssl_cert_reqs, ssl_check_hostname, ssl_ca_certs, ssl_certfile, ssl_keyfile"
UNREAD = ("that Celery's broker and redis-py do not both read: a redis:// URL takes none, a rediss:// URL only "
          f"{TLS_PARAMETERS}")


@pytest.mark.parametrize("scheme", ["redis", "rediss"])
@pytest.mark.parametrize("query", [
    # kombu's Connection refuses each at its first connection (TypeError: unexpected keyword argument)
    "socket_timeout=2", "socket_connect_timeout=2", "health_check_interval=5", "max_connections=5",
    "retry_on_timeout=true", "client_name=x", "protocol=3", "username=x", "timeout=2", "global_keyprefix=x",
    "visibility_timeout=5", "SSL_CERT_REQS=required", "Ssl_Ca_Certs=/etc/ca.pem",
    # kombu reads these over the URL's own (TypeError: multiple values), or fails on the string
    "password=s3cret", "port=6380", "virtual_host=1", "hostname=h", "userid=x", "transport=redis", "ssl=true",
    "ssl_min_version=2", "credential_provider=x",
    # kombu takes these; redis-py hands them to the connection, a TypeError at its first command
    "heartbeat=10", "connect_timeout=2", "insist=1", "login_method=x",
    "socket_timeout=2&ssl_cert_reqs=required"])
def test_a_redis_url_holding_a_query_parameter_either_client_refuses_is_refused(scheme: str, query: str) -> None:
    """`redis://host:6379/0?socket_timeout=2` passed: the workers then failed at their first connection with a raw
    TypeError (kombu refuses any parameter it does not know), a crash far from the setting. Names are read as both
    clients read them, as written: `?SSL_CERT_REQS=` is a parameter neither knows. The refusal says which parameters
    are taken, naming none of the URL's (any may be a secret pasted in)."""
    with pytest.raises(ValidationError) as refused:
        Settings(broker_url=f"{scheme}://:s3cret@redis:6379/0?{query}")
    assert [(error["loc"], error["msg"]) for error in refused.value.errors()] == [(
        ("broker_url",), f"Value error, holds a query parameter {UNREAD}")]
    assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize("query", ["ssl_cert_reqs=none", "ssl_ca_certs=/etc/ca.pem", "ssl_check_hostname=false",
                                   "ssl_certfile=/etc/c.pem&ssl_keyfile=/etc/c.key"])
def test_a_redis_url_without_tls_takes_no_tls_parameter(query: str) -> None:
    """kombu reads an ssl_ parameter as asking for TLS (a redis:// broker spoken to in TLS), redis-py refuses it on a
    connection without (TypeError at its first command)."""
    with pytest.raises(ValidationError) as refused:
        Settings(broker_url=f"redis://redis:6379/0?{query}")
    name = query.partition("=")[0]
    assert refused.value.errors()[0]["msg"] == f"Value error, holds a query parameter ({name}) {UNREAD}"


@pytest.mark.parametrize("query", ["=s3cret", "\uff53sl_cert_reqs=none", "a-b=1", "x" * 33 + "=1",
                                   "s3cret%20s3cret=1"])
def test_a_query_parameter_not_named_as_a_client_names_one_is_refused_unquoted(query: str) -> None:
    """A name such as no client reads (a blank one, a fullwidth letter, a dash, a long one) may be something pasted in:
    the refusal does not quote it."""
    with pytest.raises(ValidationError) as refused:
        Settings(broker_url=f"rediss://redis:6380/0?{query}")
    assert refused.value.errors()[0]["msg"] == f"Value error, holds a query parameter {UNREAD}"
    assert "s3cret" not in str(refused.value) and "x" * 33 not in str(refused.value)


@pytest.mark.parametrize("url", ["redis://redis:6379/0?hunter2", "redis://redis:6379/0?s3cret_pw=1",
                                 "rediss://redis:6380/0?Tr0ub4dor3", "rediss://redis:6380/0?ssl_cert_reqs=none&hunter2",
                                 "redis://redis:6379/0?password=hunter2", "redis://redis/0?dbhunter2"])
def test_a_query_parameter_govrag_does_not_know_is_refused_unquoted_however_much_it_looks_like_a_name(url: str) -> None:
    """A bare key (`?hunter2`, a password pasted in after the `?`) that looks like a name was quoted back in the
    refusal, and so in the log holding it: a refusal names a parameter only from the TLS ones govrag knows."""
    with pytest.raises(ValidationError) as refused:
        Settings(broker_url=url)
    assert refused.value.errors()[0]["msg"] == f"Value error, holds a query parameter {UNREAD}"
    assert not any(secret in str(refused.value) for secret in ("hunter", "s3cret", "Tr0ub4dor", "password"))


@pytest.mark.parametrize(("query", "name"), [
    ("ssl_cert_reqs=none&ssl_cert_reqs=required", "ssl_cert_reqs"),
    ("ssl_check_hostname=true&ssl_ca_certs=/a.pem&ssl_check_hostname=false", "ssl_check_hostname"),
    ("ssl_ca_certs=/a.pem&ssl%5Fca_certs=/b.pem", "ssl_ca_certs")])
def test_a_tls_parameter_named_twice_is_refused(query: str, name: str) -> None:
    """kombu reads the last of a parameter named twice and redis-py the first: the broker's TLS checked one way, the
    guard's counters another."""
    with pytest.raises(ValidationError) as refused:
        Settings(broker_url=f"rediss://redis:6380/0?{query}")
    assert refused.value.errors()[0]["msg"] == (f"Value error, names the query parameter {name} more than once: "
                                                "name it once")


@pytest.mark.parametrize(("query", "name", "values"), [
    ("ssl_cert_reqs=CERT_REQUIRED", "ssl_cert_reqs", "required, optional or none"),  # kombu takes it, redis-py not
    ("ssl_cert_reqs=Required", "ssl_cert_reqs", "required, optional or none"),
    ("ssl_cert_reqs=", "ssl_cert_reqs", "required, optional or none"),  # both ignore it: the default, which differs
    ("ssl_cert_reqs=s3cret", "ssl_cert_reqs", "required, optional or none"),
    ("ssl_check_hostname=0", "ssl_check_hostname", "true or false"),  # kombu: true, redis-py: false
    ("ssl_check_hostname=no", "ssl_check_hostname", "true or false"),
    ("ssl_check_hostname=yes", "ssl_check_hostname", "true or false"),
    ("ssl_check_hostname", "ssl_check_hostname", "true or false"),
    ("ssl_ca_certs=", "ssl_ca_certs", "a file's path"),  # both ignore it: the system's CAs
    ("ssl_certfile", "ssl_certfile", "a file's path"),
    ("ssl_keyfile=", "ssl_keyfile", "a file's path")])
def test_a_tls_parameter_with_a_value_its_clients_read_apart_is_refused_unquoted(query: str, name: str,
                                                                                  values: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(broker_url=f"rediss://redis:6380/0?{query}")
    assert refused.value.errors()[0]["msg"] == (f"Value error, gives the query parameter {name} a value other "
                                                f"than {values}")
    assert "s3cret" not in str(refused.value) and "CERT_REQUIRED" not in str(refused.value)


@pytest.mark.parametrize("query", [
    "", "ssl_cert_reqs=required", "ssl_cert_reqs=optional", "ssl_cert_reqs=none", "ssl_check_hostname=FALSE",
    "ssl_check_hostname=True", "ssl_ca_certs=/etc/ssl/certs/ca.pem&ssl_certfile=/etc/c.pem&ssl_keyfile=/etc/c.key",
    "ssl_ca_certs=/etc/a%40b%20c.pem", "ssl%5Fcert_reqs=required"])
def test_a_rediss_url_takes_the_tls_parameters_both_clients_read(query: str) -> None:
    url = f"rediss://:s3cret@redis:6380/0?{query}"
    assert Settings(broker_url=url).broker_url == url


def test_a_tls_parameter_taken_does_not_let_another_through() -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(broker_url="rediss://redis:6380/0?ssl_cert_reqs=required&socket_timeout=2")
    assert refused.value.errors()[0]["msg"] == f"Value error, holds a query parameter {UNREAD}"


def test_the_tls_parameters_taken_reach_a_real_redis_through_kombu_and_redis_py(tmp_path: Path) -> None:
    """Each parameter taken is read by both clients alike: a Redis behind TLS whose certificate is from a private CA,
    asking for a client certificate, is reached by kombu (Celery's broker) and by redis-py (the guard's counters, the
    queue-depth metric) with the URL's CA, certificate and key, the host name checked; without the client certificate
    the server refuses it, so the parameters are what reached it."""
    files = make_tls_files(tmp_path)
    redis_at = urlsplit(REDIS_URL)
    with tls_redis(files, (redis_at.hostname or LOOPBACK, redis_at.port or 6379)) as port:
        query = urlencode({"ssl_cert_reqs": "required", "ssl_check_hostname": "true", "ssl_ca_certs": files.ca,
                           "ssl_certfile": files.client_cert, "ssl_keyfile": files.client_key})
        url = Settings(broker_url=f"rediss://{LOOPBACK}:{port}/0?{query}").broker_url
        with Connection(url, transport_options={"socket_timeout": 5, "socket_connect_timeout": 5}) as broker:
            broker.ensure_connection(max_retries=1)
            assert broker.default_channel.client.ping()
        with closing(redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)) as client:
            assert client.ping()
        no_client_cert = url.partition("&ssl_certfile=")[0]
        with closing(redis.Redis.from_url(Settings(broker_url=no_client_cert).broker_url, socket_timeout=5,
                                          socket_connect_timeout=5)) as client, pytest.raises(redis.ConnectionError):
            client.ping()


def test_an_otlp_endpoint_is_an_http_url_of_a_host() -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(otel_exporter_otlp_endpoint="collector:4318/v1/traces")
    assert refused.value.errors()[0]["msg"] == "Value error, is not a URL (http://HOST:4318/v1/traces)"
    assert Settings(otel_exporter_otlp_endpoint="http://collector:4318/v1/traces").otel_exporter_otlp_endpoint


@pytest.mark.parametrize(("setting", "url"), [
    ("qdrant_url", "http://[::1]:6333"), ("qdrant_url", "https://gateway.example/qdrant/"),
    ("qdrant_url", "HTTP://qdrant:6333"),
    ("broker_url", "redis://[::1]:6379/0"), ("broker_url", "redis://h"),
    ("broker_url", "rediss://:p%40ss%3Aw%2Frd@h:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/a%40b.pem"),
    ("otel_exporter_otlp_endpoint", "http://[::1]:4318/v1/traces"), ("otel_exporter_otlp_endpoint", "https://otlp.example"),
    ("database_url", "postgresql+psycopg://govrag@/govrag?host=/var/run/postgresql"),
    ("database_url", "postgresql+psycopg://govrag:p%40ss@[::1]:5432/govrag?sslmode=require"),
])
def test_settings_take_every_form_the_deployments_and_their_clients_use(setting: str, url: str) -> None:
    """IPv6 hosts, a Qdrant behind a proxy's path, TLS query options, a PostgreSQL Unix socket, percent-encoded
    passwords (an '@' in a query value percent-encoded too: redis-py and kombu decode it)."""
    assert getattr(Settings(**{setting: url}), setting).lower() == url.lower()


@pytest.mark.parametrize(("setting", "url", "refusal"), [
    ("broker_url", "x" * 10_000 + "://redis:6379/0", "names a scheme govrag does not support ({}): use " + REDIS_FORMS),
    ("qdrant_url", "q" * 33 + "://qdrant:6333",
     "names a scheme govrag does not support ({}): use http://HOST:6333 or https://HOST:6333"),
    ("database_url", "d" * 10_000 + "://govrag@db/govrag",
     "names a database driver this install does not have ({}): use postgresql+psycopg:// (or sqlite:///)"),
])
def test_a_refusal_quotes_no_more_than_32_characters_of_a_scheme(setting: str, url: str, refusal: str) -> None:
    """A value pasted into the wrong setting (a 10,000-character scheme) was quoted whole in the refusal's one line,
    and in the log holding it."""
    with pytest.raises(ValidationError) as refused:
        Settings(**{setting: url})
    why = refusal.format(url[:32] + "…")
    assert [(error["loc"], error["msg"]) for error in refused.value.errors()] == [((setting,), f"Value error, {why}")]


def _fuzzed_url(rng: random.Random, user: str, password: str, host: str) -> str:
    """A URL near one of the service URLs, with `user` and `password` in its userinfo and characters that end a piece
    of a URL early (unencoded) strewn through them."""
    def strew(text: str) -> str:
        return "".join(char + (rng.choice(URL_BREAKERS) if rng.random() < 0.3 else "") for char in text)
    scheme = rng.choice(["http", "https", "redis", "rediss", "memory", "amqp", "sentinel", "redsi", "grpc", "unix",
                         "postgresql+psycopg", "sqlite", "mysql", "HTTP", "x y", ""])
    userinfo = rng.choice([f"{user}@", f":{password}@", f"{user}:{password}@", f"{user}:{strew(password)}@",
                           f"{strew(user)}:{password}@", f"{user}:{password}"])
    authority = rng.choice([host, f"[{host}]", f"[{host}", "[::1]", "", f"{host}@{host}"])
    port = rng.choice(["", ":", ":6379", ":0", ":65536", ":-1", f":{password}", ":+80", ":99999999999"])
    rest = rng.choice(["", "/0", "/v1/traces", f"/{password}@x", "?a=b", f"#{password}", "//"])
    return scheme + rng.choice(["://"] * 4 + [":/", ":", ""]) + userinfo + authority + port + rest


def test_no_refusal_of_a_fuzzed_url_quotes_its_host_user_or_password() -> None:
    """Seeded: a few hundred URLs with a secret user, password and host, refused or not; a refusal (the message and
    the ValidationError as a whole) quotes none of them, and nothing but a ValidationError is raised."""
    rng, refused = random.Random(20240607), 0
    for _ in range(600):
        user, password, host = (f"{prefix}{rng.randrange(10**6):06d}" for prefix in ("usr", "pwd", "hst"))
        setting = rng.choice(["qdrant_url", "broker_url", "otel_exporter_otlp_endpoint", "database_url", "llm_base_url",
                              "oidc_jwks_url", "oidc_issuer"])
        url = _fuzzed_url(rng, user, password, host)
        try:
            Settings(**{setting: url})
        except ValidationError as refusal:
            refused += 1
            said = str(refusal) + "".join(error["msg"] for error in refusal.errors())
            assert not any(secret in said for secret in (user, password, host)), (setting, url)
    assert refused > 300


@pytest.mark.parametrize("setting", ["qdrant_url", "otel_exporter_otlp_endpoint"])
def test_an_empty_url_of_a_setting_unset_by_default_is_unset(setting: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`GOVRAG_QDRANT_URL=` (a template's empty default) ran the embedded store and `..._OTLP_ENDPOINT=` exported
    nothing, as their readers test the value for truth: neither is refused as "not a URL"."""
    monkeypatch.setenv(f"GOVRAG_{setting.upper()}", "")
    assert getattr(Settings(), setting) is None


def test_an_empty_broker_url_is_refused_rather_than_read_as_celery_s_default_amqp() -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(broker_url="")
    assert refused.value.errors()[0]["msg"] == f"Value error, is not a URL ({REDIS_FORMS})"
