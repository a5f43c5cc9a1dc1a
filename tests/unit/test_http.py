"""core.http: a blocking call (on a running event loop it fails at once instead of blocking it) that reads a body
whole, as received, or refuses it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import itertools
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from core.http import (
    CredentialsInURL,
    NotDecodable,
    Session,
    ThreadSessions,
    TooLarge,
    TooSlow,
    UnusablePort,
    URLRefused,
    answer_within,
    api_url,
    request_within,
)
from tests.support.forking import exit_code_of_child

BODY = b'{"keys": []}'


def test_a_call_on_a_running_event_loop_is_refused_before_connecting() -> None:
    """Its exchange runs on an event loop of its own; called from an `async def` (a route, a dependency) it would
    stall every request on that loop, so it raises instead (the port is one nothing listens on)."""

    async def on_the_loop() -> bytes:
        return request_within("GET", "http://127.0.0.1:9/", seconds=60.0, max_bytes=1)

    with pytest.raises(RuntimeError, match="running event loop"):
        asyncio.run(on_the_loop())


def test_a_slow_name_lookup_is_inside_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio.run, closing its loop, waited for the thread looking the host up (getaddrinfo, which no timeout
    cancels): a DNS server slow to answer held the call past its deadline for as long as the lookup took. The
    resolver is outside the boundary: a stub holds the lookup until the call has returned."""
    released, looked_up, real = threading.Event(), threading.Event(), socket.getaddrinfo

    def slow(host: bytes | str | None, *args: object, **kwargs: object) -> object:
        if host not in (b"slow-dns.test", "slow-dns.test"):
            return real(host, *args, **kwargs)  # type: ignore[arg-type]
        released.wait(10)  # the old code waited out these 10 s
        looked_up.set()
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    try:
        with pytest.raises(TooSlow):
            request_within("GET", "http://slow-dns.test/", seconds=0.2, max_bytes=1, trust_env=False)
        assert not looked_up.is_set(), "the call returned only once the lookup had ended"
    finally:
        released.set()


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    """A server answering every GET with the raw HTTP response `request.param`, then holding the connection open
    until the test ends (a body is read only as far as its framing says): its URL."""
    released = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server name)
            self.wfile.write(request.param)
            self.wfile.flush()
            released.wait(60)
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    served = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=served.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{served.server_port}/"
    released.set()
    served.shutdown()
    served.server_close()


def _chunked(encoding: str, *chunks: bytes) -> bytes:
    """A 200 whose body, in `encoding`, is sent chunked, these chunks."""
    return (f"HTTP/1.1 200 OK\r\nContent-Encoding: {encoding}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n")


_FIRST, _SECOND = gzip.compress(BODY[:5]), gzip.compress(BODY[5:])


@pytest.mark.parametrize("server", [_chunked("gzip", _FIRST[:9], _FIRST[9:] + _SECOND[:4], _SECOND[4:]),
                                    _chunked("x-gzip", gzip.compress(BODY))],
                         indirect=True, ids=["two gzip members, chunked across them", "x-gzip"])
def test_a_gzip_body_is_read_whole(server: str) -> None:
    """A gzip body of two members (RFC 1952 lets one follow another) was read to the end of the first, the rest
    dropped unsaid; one said to be x-gzip (gzip's old name, RFC 9110 8.4.1.3) was refused as not asked for."""
    assert request_within("GET", server, seconds=10.0, max_bytes=1000, trust_env=False) == BODY


@pytest.mark.parametrize("server", [_chunked("gzip", gzip.compress(BODY * 50)[:-20])], indirect=True)
def test_a_gzip_body_cut_short_is_refused(server: str) -> None:
    """What zlib inflated before the cut was returned as the whole body."""
    with pytest.raises(NotDecodable, match="ends early"):
        request_within("GET", server, seconds=10.0, max_bytes=10_000, trust_env=False)


@pytest.mark.parametrize("server", [b"HTTP/1.1 200 OK\r\nContent-Length: 1001\r\n\r\n" + b"x" * 10], indirect=True)
@pytest.mark.parametrize("answer", [request_within, answer_within])
def test_a_body_whose_content_length_is_over_the_cap_is_refused_unread(server: str, answer: Callable[..., object],
                                                                      ) -> None:
    """A Content-Length over the cap was taken on trust and the body read up to one byte past the cap (here the
    server sends 10 bytes of the 1001 it announces and waits: the call waited with it, until its deadline). The
    header says enough: refused at once, nothing of the body read."""
    with pytest.raises(TooLarge, match="Content-Length") as refused:
        answer("GET", server, seconds=20.0, max_bytes=1000, trust_env=False)
    assert refused.value.status_code == 200


_EMPTY_MEMBER = gzip.compress(b"")


@pytest.mark.parametrize("server", [_chunked("gzip", *[_EMPTY_MEMBER] * 100)], indirect=True)
def test_a_gzip_body_is_capped_as_received_too(server: str) -> None:
    """The cap counted only decoded bytes: a gzip body of empty members (20 bytes each, inflating to nothing) could
    be sent for as long as the deadline lasted, read whole. What is received counts too."""
    with pytest.raises(TooLarge):
        request_within("GET", server, seconds=10.0, max_bytes=1000, trust_env=False)


@pytest.mark.parametrize("server", [b"HTTP/1.1 200 OK\r\nContent-Encoding: br-forged-log-line-from-the-server\r\n"
                                    b"Content-Length: 2\r\n\r\n{}"], indirect=True)
def test_an_encoding_not_asked_for_is_refused_without_quoting_it(server: str) -> None:
    """The refusal quoted the server's Content-Encoding (40 characters of it), and the IdP client logs it: a hostile
    server wrote part of a log line. It is named by a fixed category."""
    with pytest.raises(NotDecodable) as refused:
        request_within("GET", server, seconds=10.0, max_bytes=1000, trust_env=False)
    assert str(refused.value) == "a Content-Encoding that was not asked for"


@pytest.mark.parametrize("answer", [request_within, answer_within])
@pytest.mark.parametrize("authority", ["127.0.0.1:9", "127.0.0.1]:9"])
def test_a_url_with_credentials_is_refused_before_connecting(answer: Callable[..., object], authority: str) -> None:
    """httpx sends a URL's user name and password as an Authorization: Basic header, in place of the caller's bearer
    token (in clear over http); the call was made (here to a port nothing listens on: ConnectError). It is refused
    before connecting, the password never quoted; so too where urlsplit cannot read the URL (a stray `]`) and httpx
    still reads, and would send, its user information."""
    with pytest.raises(CredentialsInURL) as refused:
        answer("GET", f"http://scanner:s3cret@{authority}/", seconds=10.0, max_bytes=1000, trust_env=False)
    assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize("authority", ["@127.0.0.1:9", "@[::1]:9"])
def test_an_empty_user_name_is_refused_before_connecting(authority: str) -> None:
    """httpx reads `http://@host` (user information, empty) as none: `api_url` (`govrag redteam --url`, `govrag ingest
    --api-url`, the IdP's URLs) took it and a call was made (here to a port nothing listens on: ConnectError). It is
    malformed where a URL govrag calls holds no user information, and refused as one holding a user name or password
    is, by `api_url` and before connecting, as the settings refuse an `@` in a URL govrag calls."""
    url = f"http://{authority}/"
    with pytest.raises(CredentialsInURL):
        api_url(url)
    for answer in (request_within, answer_within):
        with pytest.raises(CredentialsInURL):
            answer("GET", url, seconds=10.0, max_bytes=1000, trust_env=False)


@pytest.mark.parametrize("authority", [
    "127.0.0.1:99999", "127.0.0.1:65536", "127.0.0.1:0", "127.0.0.1:+80", "127.0.0.1:８０", "127.0.0.1: 80",
    "127.0.0.1:-1", "127.0.0.1:8o80", "127.0.0.1:", "[::1]8000", "[::1]99999", "scanner:s3cret@127.0.0.1:99999"])
def test_api_url_refuses_a_port_no_server_listens_on(authority: str) -> None:
    """`api_url` (`govrag redteam --url`, `govrag ingest --api-url`, `redteam.run`, the IdP's URLs) checked a URL's
    scheme, host and credentials but not its port: httpx called `:+80`, `:８０` and an empty `host:` on port 80,
    `[::1]8000` on 8000, and crashed on `:99999`. Each is refused before connecting, as the settings refuse such a
    port in a URL govrag calls, in their words, the URL (and a password in it) never quoted."""
    with pytest.raises(UnusablePort) as refused:
        api_url(f"http://{authority}/")
    assert str(refused.value) == "names a port that is not a number from 1 to 65535"


@pytest.mark.parametrize("url", ["http://127.0.0.1]:99999/", "http://127.0.0.1]:+80/", "https://govrag.example]/"])
def test_api_url_refuses_a_url_whose_port_urlsplit_cannot_read(url: str) -> None:
    """The port is checked as urlsplit reads it, and a URL it cannot read (a stray `]` after the host) passed the
    check unread: httpx read `127.0.0.1]:99999` as host `127.0.0.1%5D` on port 99999, and `govrag redteam --url` took
    it, then said it could not reach that API (exit 3) rather than refuse a bad --url (exit 2). Refused as no URL."""
    with pytest.raises(URLRefused) as refused:
        api_url(url)
    assert str(refused.value) == "must be an http(s) URL, such as http://127.0.0.1:8000"


def test_the_http_client_loads_none_of_the_settings_dependencies() -> None:
    """`api_url`'s port rule came from core.settings, whose import loads pydantic, SQLAlchemy and cryptography (some
    200 modules) into every user of the http client, and would make a cycle of any check the settings take from it.
    The rule is core.urls', standard library only, which the settings read too."""
    heavy = ("core.settings", "pydantic", "sqlalchemy", "cryptography")
    probe = f"import sys, core.http; print(sorted(set({heavy!r}) & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[2],  # noqa: S603
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


_ELSEWHERE = "http://127.0.0.1:9/keys"  # nothing listens there: a redirect followed would be a ConnectError


@pytest.mark.parametrize("server", [f"HTTP/1.1 {status}\r\nLocation: {_ELSEWHERE}\r\nContent-Length: 0\r\n\r\n"
                                    .encode() for status in ("302 Found", "307 Temporary Redirect")], indirect=True)
def test_a_redirect_is_never_followed(server: str) -> None:
    """The IdP and model server clients (request_within) refuse a redirect as any status other than 2xx; redteam's
    (answer_within) has its status: the answer comes from the host named, and the caller's headers go nowhere else."""
    with pytest.raises(httpx.HTTPStatusError):
        request_within("GET", server, seconds=10.0, max_bytes=1000, trust_env=False)
    status, body = answer_within("GET", server, seconds=10.0, max_bytes=1000, trust_env=False)
    assert status in (302, 307) and body == b""


@contextlib.contextmanager
def _answering_the_first(answered: int) -> Iterator[tuple[str, list[str]]]:
    """A server keeping its HTTP/1.1 connections alive that answers its first `answered` requests and drops every later
    one unanswered (it closes the connection as the request came in): its URL, and the method of each request
    received."""
    received: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (the http.server name)
            self._answer_the_first()

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._answer_the_first()

        def _answer_the_first(self) -> None:
            received.append(self.command)
            if len(received) > answered:
                self.close_connection = True  # dropped, unanswered
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)

        def log_message(self, *args: object) -> None:
            pass

    served = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=served.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{served.server_port}/", received
    finally:
        served.shutdown()
        served.server_close()


@pytest.fixture
def dropping() -> Iterator[tuple[str, list[str]]]:
    """A server keeping its HTTP/1.1 connections alive that answers the first request and drops every later one
    unanswered: its URL, and the method of each request received."""
    with _answering_the_first(1) as served:
        yield served


@pytest.mark.parametrize(("method", "repeatable", "sent"), [
    ("GET", False, 2), ("POST", True, 2), ("POST", False, 1)],
    ids=["an idempotent method", "a repeatable session's POST", "a POST, not repeated"])
def test_a_session_sends_a_request_dropped_on_its_kept_alive_connection_once_more_only_when_repeatable(
        dropping: tuple[str, list[str]], method: str, repeatable: bool, sent: int) -> None:
    """A Session keeps the connection an answer left open; a request the server drops on it unanswered (it closed the
    connection as the request went out) is sent once more, on a new connection, and no more, when it may be repeated:
    a server dropping every request after the first is httpx.RemoteProtocolError, having received the second request
    twice, not again and again. A POST the server may have acted on (an upload, a generation) is never sent twice
    unless the session says its requests are repeatable."""
    url, received = dropping
    with Session(trust_env=False, repeatable=repeatable) as session:
        assert session.request_within("GET", url, seconds=10.0, max_bytes=1000) == BODY
        with pytest.raises(httpx.RemoteProtocolError):
            session.request_within(method, url, seconds=10.0, max_bytes=1000, json={"q": 1})
    assert received == ["GET"] + [method] * sent


def test_a_session_is_used_from_the_thread_that_made_it_only(dropping: tuple[str, list[str]]) -> None:
    """Its event loop and client are not to be shared: a call from another thread is refused, nothing sent (it could
    run on the loop while the owner's call does); closing it twice is closing it once."""
    url, received = dropping
    refused: list[BaseException] = []
    session = Session(trust_env=False)

    def elsewhere() -> None:
        try:
            session.request_within("GET", url, seconds=10.0, max_bytes=1000)
        except RuntimeError as error:
            refused.append(error)

    try:
        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        assert [str(error) for error in refused] == ["a Session is used from the thread that made it only"]
        assert received == []
        assert session.request_within("GET", url, seconds=10.0, max_bytes=1000) == BODY
    finally:
        session.close()
    session.close()


def test_a_request_dropped_on_a_connection_opened_for_it_is_not_sent_again(dropping: tuple[str, list[str]]) -> None:
    """A request the server dropped was sent once more whenever the last answer had left its connection open, whatever
    connection the request then went out on: here the next one goes to another server, on a connection opened for it,
    and that server, dropping everything, got it twice. Only a request written on a kept connection may have met one
    the server was closing (a connection the pool found closed or expired and replaced is new too)."""
    url, _received = dropping
    with _answering_the_first(0) as (elsewhere, dropped), Session(trust_env=False) as session:
        assert session.request_within("GET", url, seconds=10.0, max_bytes=1000) == BODY  # its connection kept
        with pytest.raises(httpx.RemoteProtocolError):
            session.request_within("GET", elsewhere, seconds=10.0, max_bytes=1000)
    assert dropped == ["GET"]


class _Connections:
    """What a server keeping its HTTP/1.1 connections alive saw: for each request, the connection it came on (numbered
    as accepted) and its X-Caller header; the number of each connection as its client closes it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.requests: list[tuple[int, str]] = []
        self.closed: queue.Queue[int] = queue.Queue()

    def of(self, caller: str) -> set[int]:
        """The connections `caller`'s requests came on."""
        return {connection for connection, sender in self.requests if sender == caller}


@pytest.fixture
def connections() -> Iterator[_Connections]:
    """A server keeping its HTTP/1.1 connections alive, answering every GET, and what it saw of them."""
    accepted = itertools.count()
    seen = _Connections("")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            self.number = next(accepted)

        def do_GET(self) -> None:  # noqa: N802 (the http.server name)
            seen.requests.append((self.number, self.headers.get("X-Caller", "")))
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)

        def finish(self) -> None:
            super().finish()
            seen.closed.put(self.number)

        def log_message(self, *args: object) -> None:
            pass

    served = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=served.serve_forever, daemon=True).start()
    seen.url = f"http://127.0.0.1:{served.server_port}/"
    yield seen
    served.shutdown()
    served.server_close()


@pytest.fixture
def sessions() -> Iterator[ThreadSessions]:
    made = ThreadSessions(trust_env=False)
    yield made
    made.close()


def _get_as(sessions: ThreadSessions, caller: str, url: str) -> bytes:
    return sessions.request_within("GET", url, seconds=10.0, max_bytes=1000, headers={"X-Caller": caller})


def test_each_thread_keeps_a_connection_of_its_own(sessions: ThreadSessions, connections: _Connections) -> None:
    """The IdP's key fetches and the model server's generations, from the API's worker threads, opened a connection
    for every call. A thread's calls go over its own kept connection: three threads calling at once, twice each, open
    three connections, each its thread's alone (all three are open as each thread calls again)."""
    all_called = threading.Barrier(3)

    def call_twice(caller: str) -> None:
        for _ in range(2):
            assert _get_as(sessions, caller, connections.url) == BODY
            all_called.wait(10)

    callers = ["first", "second", "third"]
    with ThreadPoolExecutor(max_workers=3) as pool:  # each call blocks at the barrier: three threads
        for called in [pool.submit(call_twice, caller) for caller in callers]:
            called.result()
    assert [len(connections.of(caller)) for caller in callers] == [1, 1, 1]
    assert len(set.union(*(connections.of(caller) for caller in callers))) == 3


def test_the_connection_of_a_thread_that_has_ended_is_closed_at_the_next_call(sessions: ThreadSessions,
                                                                              connections: _Connections) -> None:
    """A thread's Session outlives its calls; once the thread has ended (an API worker left idle), the next call, from
    any thread, closes it: the thread's one connection is closed, not left open for as long as the process runs."""
    ended = threading.Thread(target=lambda: [_get_as(sessions, "ended", connections.url) for _ in range(2)])
    ended.start()
    ended.join()
    [connection] = connections.of("ended")
    assert _get_as(sessions, "main", connections.url) == BODY
    assert connections.closed.get(timeout=10) == connection


def test_thread_sessions_are_closed_once_garbage(connections: _Connections) -> None:
    """Their owner (a model backend, a key set) made again: the connections it kept are closed, not left open."""
    assert _get_as(ThreadSessions(trust_env=False), "gone", connections.url) == BODY
    assert connections.closed.get(timeout=10) == 0


def test_a_forked_child_leaves_its_parents_connections_and_event_loops_alone(connections: _Connections) -> None:
    """A forked child sets its parent's Sessions aside, and keeps them: once its ThreadSessions was garbage, their
    event loops were closed in the child, which took each loop's wake-up socket out of the epoll set it shares with the
    parent's; the parent's next call that looked a host name up (in a thread, which wakes the loop) slept to TooSlow."""
    sessions = ThreadSessions(trust_env=False)
    assert _get_as(sessions, "parent", connections.url) == BODY  # an address: no lookup, no thread

    def calls_then_lets_them_go() -> bool:
        nonlocal sessions
        called = _get_as(sessions, "child", connections.url) == BODY
        del sessions
        gc.collect()
        return called

    assert exit_code_of_child(calls_then_lets_them_go) == 0
    assert connections.of("child").isdisjoint(connections.of("parent"))  # a connection of its own
    assert _get_as(sessions, "parent", connections.url.replace("127.0.0.1", "localhost")) == BODY
    sessions.close()
