"""Bounded calls to other servers (the IdP, the model server, the API `govrag redteam` probes): one wall-clock deadline
and a size cap.

httpx's timeouts apply to each read, so a server that sends one byte, or one header line, at a time could hold a
call for ever; and a body is held in memory whole, decoded a network read at a time (a 64 KiB gzip read can inflate to
64 MiB). `request_within` and `answer_within` bound all three, the wait for the headers included; a `Session` does the
same for calls one after another over connections kept alive between them (`govrag redteam`'s probes), and
`ThreadSessions` gives each thread that calls one of its own (the IdP's key fetches and the model server's generations,
from the API's worker threads: a thread's calls reuse its connections, no two threads share one).

What the other server sends is hostile until read: no refusal quotes it (a log line quoting a header would be the
server's to write), redirects are never followed (the answer comes from the host that was named), and a URL holding a
user name or password is refused before connecting (httpx would send them, Basic, in place of the caller's
Authorization header), as `api_url` refuses one naming a port no server listens on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import threading
import weakref
import zlib
from collections.abc import AsyncIterator, Coroutine, Mapping
from typing import Any

import httpx

from core import forksafe, urls
from core.error_pickling import UnpickledAsRaised


class TooSlow(ValueError):
    """The response, headers and body, did not come within the deadline."""


class URLRefused(ValueError):
    """A URL refused before connecting: what it must be, never quoting it (it may hold a password)."""


class CredentialsInURL(URLRefused):
    """A URL holding a user name or password (`user:pass@host`): refused before connecting, never quoted."""


class UnusablePort(URLRefused):
    """A URL naming a port that is not 1 to 65535 in ASCII digits (`:99999`, `:+80`, `:８０`, an empty `host:`):
    refused before connecting, never quoted."""


def api_url(url: str) -> str:
    """`url` if it may be a running govrag API's (`govrag redteam --url`, `govrag ingest --api-url`, `redteam.run`'s),
    or an IdP's govrag fetches from (authz.tokens): naming no port or one from 1 to 65535 in ASCII digits, as the
    settings read a URL govrag calls, else UnusablePort (httpx fetched `:+80` or `:８０` from port 80, an empty `host:`
    from the scheme's, and crashed on `:99999`); http(s) with a host, else URLRefused; holding no user name or
    password, which httpx would send (Basic, in clear over http) in place of the bearer token, else CredentialsInURL.
    An empty user name (`http://@host`) is refused so too: malformed, and what a caller meant to send there is unknown.
    The port is read as urlsplit reads it: one it cannot read (a stray `]`: httpx read `host]:99999` as port 99999) is
    no URL."""
    if not urls.called_url_port_usable(url):  # first: a port httpx cannot read (`:-1`) is named, not refused as no URL
        raise UnusablePort(urls.NO_USABLE_PORT)
    try:
        parsed: httpx.URL | None = httpx.URL(url)
    except httpx.InvalidURL:
        parsed = None
    if parsed is None or urls.url_parts(url) is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise URLRefused("must be an http(s) URL, such as http://127.0.0.1:8000")
    if _holds_user_info(url):
        raise CredentialsInURL("must not hold a user name or password (user:password@)")
    return url


def _holds_user_info(url: str) -> bool:
    """Whether url holds a user name or password as the settings read one (`urls.url_has_credentials`: an `@` in its
    authority, an empty user name included, which httpx's `userinfo` reads as none), or, where urlsplit cannot read
    it (`u:p@host]:80`), as httpx does."""
    return urls.url_has_credentials(url) or (urls.url_parts(url) is None and bool(httpx.URL(url).userinfo))


class BodyRefused(UnpickledAsRaised, ValueError):
    """A response whose body is not read to its end; `status_code` is its HTTP status."""

    def __init__(self, status_code: int, reason: str) -> None:
        super().__init__(reason)
        self.status_code = status_code


class TooLarge(BodyRefused):
    """A body that passed the size cap, counted as received and decoded (or said so by its Content-Length): read no
    further."""


class NotDecodable(BodyRefused):
    """A body that does not decode as its Content-Encoding says (not gzip, or an encoding that was not asked for: its
    name, the server's to choose, is never quoted)."""


def request_within(method: str, url: str, *, seconds: float, max_bytes: int, json: Any = None,
                   headers: Mapping[str, str] | None = None, trust_env: bool = True) -> bytes:
    """The body of a 2xx answer to `method url`, all of it (the host's name looked up, connecting, the headers, the
    body) within `seconds`, or a ValueError (TooSlow, TooLarge, NotDecodable) once it takes longer, passes `max_bytes`
    (received or decoded, or by its Content-Length) or does not decode; another status is httpx.HTTPStatusError, its
    body unread, and redirects are not followed (raise_for_status refuses them). Only gzip is asked for: a body in
    another encoding is NotDecodable. A URL with a user name or password is CredentialsInURL, nothing sent.

    The exchange runs on an event loop of its own under one timeout, which cancels it wherever it is. It blocks, so
    it is called from a worker thread (FastAPI's thread pool, a Celery task); on a running event loop it raises
    RuntimeError at once."""
    with Session(trust_env=trust_env) as session:
        return session.request_within(method, url, seconds=seconds, max_bytes=max_bytes, json=json, headers=headers)


def answer_within(method: str, url: str, *, seconds: float, max_bytes: int, json: Any = None,
                  headers: Mapping[str, str] | None = None, trust_env: bool = True) -> tuple[int, bytes]:
    """The status and body of the answer to `method url`, whatever its status, bounded as `request_within`'s."""
    with Session(trust_env=trust_env) as session:
        return session.answer_within(method, url, seconds=seconds, max_bytes=max_bytes, json=json, headers=headers)


# What a request sent on a kept-alive connection the server has just closed ends in, no response begun: h11's "Server
# disconnected without sending a response", or the socket reset as it is written to or read
_DROPPED = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)

# Methods whose request may be sent twice, the server's state left as by one (RFC 9110 9.2.2)
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class Session:
    """Calls from the thread that made it, one after another, over connections kept alive between them (`govrag
    redteam`'s probes to one API: one connection for the run, not one per probe), each bounded as `request_within`'s;
    closing it closes them. A call from another thread is RuntimeError, nothing sent.

    A request written on a connection kept from an earlier exchange (none opened for it) that gets no response (the
    server closed the connection as it went out, RFC 9112 9.3.1; or a reset, or a response that does not parse) is
    sent once more on a new one, within the same deadline, when it may be repeated: its method is idempotent, or the
    session is `repeatable` (its requests are reads whatever their method, as redteam's POSTed queries). Any other
    request, an upload or a model's generation, the server may have acted on: its error is raised, never sent twice.
    So is the error of a request written on a connection opened for it (the kept one had expired, or was closed by
    the server, or the request goes to another host): no stale connection explains it."""

    def __init__(self, *, trust_env: bool = True, repeatable: bool = False) -> None:
        self._runner = asyncio.Runner(loop_factory=_Loop)  # its loop made by run(), once it found none running
        self._trust_env, self._repeatable = trust_env, repeatable
        self._thread = threading.get_ident()  # an event loop and its client are not to be shared across threads
        self._client: httpx.AsyncClient | None = None  # made on the session's loop, at its first call

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def request_within(self, method: str, url: str, *, seconds: float, max_bytes: int, json: Any = None,
                       headers: Mapping[str, str] | None = None) -> bytes:
        """As the module's `request_within`, over this session's connections."""
        return self._within(seconds, self._exchange(method, url, seconds=seconds, max_bytes=max_bytes, json=json,
                                                    headers=headers, any_status=False))[1]

    def answer_within(self, method: str, url: str, *, seconds: float, max_bytes: int, json: Any = None,
                      headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        """As the module's `answer_within`, over this session's connections."""
        return self._within(seconds, self._exchange(method, url, seconds=seconds, max_bytes=max_bytes, json=json,
                                                    headers=headers, any_status=True))

    def close(self) -> None:
        """Close the connections kept alive, then the event loop; once closed, nothing more to do."""
        client, self._client = self._client, None
        try:
            if client is not None:  # none when no call started (one refused on a running event loop), or closed
                self._runner.run(client.aclose())
        finally:
            self._runner.close()

    def _within(self, seconds: float, exchange: Coroutine[Any, Any, tuple[int, bytes]]) -> tuple[int, bytes]:
        """Run `exchange` on the session's event loop: TooSlow once it took `seconds`."""
        try:
            if threading.get_ident() != self._thread:
                raise RuntimeError("a Session is used from the thread that made it only")
            return self._runner.run(exchange)
        except TimeoutError:
            raise TooSlow(f"no complete response within {seconds:g} s") from None
        finally:
            exchange.close()  # never started when run() refused: no "never awaited" warning

    async def _exchange(self, method: str, url: str, *, seconds: float, max_bytes: int, json: Any,
                        headers: Mapping[str, str] | None, any_status: bool) -> tuple[int, bytes]:
        """The exchange, cancelled after `seconds` (a second sending included); a status other than 2xx refused unread
        unless `any_status`."""
        if _holds_user_info(url):
            raise CredentialsInURL("a URL with a user name or password is refused; nothing was sent")
        async with asyncio.timeout(seconds), self._response(method, url, json=json, headers=headers,
                                                            timeout=seconds) as response:
            if not any_status:
                response.raise_for_status()
            body = _CappedBody(response, max_bytes)
            async for chunk in response.aiter_raw():  # as received: decoded (and counted) here, not by httpx
                body.add(chunk)
            return response.status_code, body.ended()

    @contextlib.asynccontextmanager
    async def _response(self, method: str, url: str, **request: Any) -> AsyncIterator[httpx.Response]:
        """The response to the request, its headers read and its body not yet; sent once more when it went out on a
        connection kept from an earlier exchange, got no response and may be repeated."""
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False, trust_env=self._trust_env,
                                             verify=_tls_context(self._trust_env), headers={"Accept-Encoding": "gzip"})
        client, sending = self._client, _Sending()
        repeatable = self._repeatable or method.upper() in _IDEMPOTENT
        try:
            response = await client.send(client.build_request(method, url, extensions={"trace": sending}, **request),
                                         stream=True)
        except _DROPPED:
            if not (sending.on_kept_connection and repeatable):
                raise
            response = await client.send(client.build_request(method, url, **request), stream=True)
        try:
            yield response
        finally:
            await response.aclose()  # a body not read to its end closes its connection, never drained


class ThreadSessions:
    """A Session for each thread that calls (its first call makes it), each bounded as `request_within`'s and sending
    a dropped request again as a Session does (never a request whose method is not idempotent, a model's generation):
    calls from many threads (the API's workers) each reuse their own thread's connections, never another's. The
    Session of a thread that has ended (a worker left idle) is closed at the next call; all of them by `close`, or once
    this is garbage. A forked child forgets its parent's (their connections are the parent's), never closing them."""

    def __init__(self, *, trust_env: bool = True) -> None:
        self._trust_env = trust_env
        self._sessions: dict[threading.Thread, Session] = {}
        self._lock = threading.Lock()
        forksafe.renewed(self, ThreadSessions._forget_the_parents)
        weakref.finalize(self, _close_all, self._sessions).atexit = False  # at exit a daemon thread may be calling

    def request_within(self, method: str, url: str, *, seconds: float, max_bytes: int, json: Any = None,
                       headers: Mapping[str, str] | None = None) -> bytes:
        """As the module's `request_within`, over the calling thread's Session."""
        return self._session().request_within(method, url, seconds=seconds, max_bytes=max_bytes, json=json,
                                              headers=headers)

    def close(self) -> None:
        """Close every thread's Session: none may be in use (the threads have ended, or will call no more)."""
        with self._lock:
            _close_all(self._sessions)

    def _session(self) -> Session:
        """The calling thread's Session, made at its first call; those of threads that have ended closed first, unless
        this thread runs an event loop (its call is refused: they wait for the next one)."""
        with self._lock:
            ended = [] if _on_event_loop() else [gone for gone in self._sessions if not gone.is_alive()]
            left = [self._sessions.pop(gone) for gone in ended]
            session = self._sessions.get(threading.current_thread())
            if session is None:
                session = self._sessions[threading.current_thread()] = Session(trust_env=self._trust_env)
        for unused in left:
            unused.close()  # its thread has ended: nothing uses it now
        return session

    def _forget_the_parents(self) -> None:
        """In a forked child: the lock free, the parent's Sessions set aside for as long as the child runs, never used
        nor closed (the dict stays the one `close` and the finaliser empty)."""
        self._lock = threading.Lock()
        forksafe.kept_in_child(self._sessions.values())
        self._sessions.clear()


def _close_all(sessions: dict[threading.Thread, Session]) -> None:
    """Close and forget `sessions`; left to the garbage collector on a running event loop (closing runs one)."""
    if _on_event_loop():
        return
    while sessions:
        sessions.popitem()[1].close()


def _on_event_loop() -> bool:
    """Whether the calling thread runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


# httpcore's trace events (the `trace` request extension) as it opens a connection, directly or to a proxy
_OPENING = (".connect_tcp.started", ".connect_unix_socket.started")


class _Sending:
    """A request as httpcore says it goes out (its `trace` extension): whether it was written on a connection kept
    from an earlier exchange, none opened for it. Not written at all, or written after opening one, it was not."""

    def __init__(self) -> None:
        self.opened = self.written = False

    async def __call__(self, event: str, _info: Mapping[str, Any]) -> None:
        if event.endswith(_OPENING):
            self.opened = True
        elif event.endswith(".send_request_headers.started"):
            self.written = True

    @property
    def on_kept_connection(self) -> bool:
        return self.written and not self.opened


class _Loop(asyncio.SelectorEventLoop):
    """An event loop that, closing, does not wait for its worker threads. A host name is looked up in one
    (getaddrinfo), which no timeout cancels: asyncio.run waited for it, so a DNS server slow to answer held the call
    past its deadline. The lookup ends on its own, after the call has returned TooSlow."""

    async def shutdown_default_executor(self, timeout: float | None = None) -> None:
        """Nothing to wait for: close() shuts the executor down without waiting."""


class _CappedBody:
    """A body as it arrives, decoded as its Content-Encoding says (gzip or none) and counted as received and decoded:
    TooLarge as soon as either passes `max_bytes`, before anything more is decoded, or at once when its Content-Length
    says it would. Received bytes are counted too: a gzip body of empty members inflates to nothing, however long."""

    def __init__(self, response: httpx.Response, max_bytes: int) -> None:
        self._read, self._status, self._max_bytes = bytearray(), response.status_code, max_bytes
        encoding = response.headers.get("Content-Encoding", "").strip().lower() or "identity"
        if encoding not in ("identity", "gzip", "x-gzip"):  # x-gzip: gzip's old name (RFC 9110 8.4.1.3)
            raise NotDecodable(self._status, "a Content-Encoding that was not asked for")
        if _content_length(response) > max_bytes:
            raise TooLarge(self._status, f"the body is over {max_bytes} bytes (its Content-Length)")
        self._gzip = zlib.decompressobj(zlib.MAX_WBITS | 16) if encoding != "identity" else None
        self._received = 0

    def add(self, raw: bytes) -> None:
        """Take the next bytes received."""
        self._received += len(raw)
        self._check(self._received)
        if self._gzip is None:
            self._read += raw
            return
        while raw:
            if self._gzip.eof:  # a gzip body may be several members one after another (RFC 1952 2.2)
                self._gzip = zlib.decompressobj(zlib.MAX_WBITS | 16)
            try:  # at most one byte past the cap: zlib keeps the rest of the input (unconsumed_tail) for later
                self._read += self._gzip.decompress(raw, self._max_bytes + 1 - len(self._read))
            except zlib.error:
                raise NotDecodable(self._status, "the body is not valid gzip") from None
            self._check(len(self._read))
            raw = self._gzip.unconsumed_tail or self._gzip.unused_data

    def ended(self) -> bytes:
        """The body once all of it was received: NotDecodable if it stopped inside a gzip member (zlib alone would
        give what came before, a truncated body taken for whole)."""
        if self._gzip is not None and self._received and not self._gzip.eof:
            raise NotDecodable(self._status, "the gzip body ends early")
        return bytes(self._read)

    def _check(self, counted: int) -> None:
        """TooLarge once `counted` (bytes received, or decoded) passes the cap."""
        if counted > self._max_bytes:
            self._read.clear()  # never used: let it go now, not when the exception's frames do
            raise TooLarge(self._status, f"the body is over {self._max_bytes} bytes")


def _content_length(response: httpx.Response) -> int:
    """The body's length as its Content-Length says (h11 has checked it is digits, one value); 0 when it says none
    (chunked, or read to the connection's end)."""
    try:
        return int(response.headers.get("Content-Length", "0"))
    except ValueError:
        return 0


@functools.cache
def _tls_context(trust_env: bool) -> ssl.SSLContext:
    """httpx's default TLS context, made once: loading the CA bundle takes ~40 ms, and each Session has a new
    client."""
    return httpx.create_ssl_context(trust_env=trust_env)
