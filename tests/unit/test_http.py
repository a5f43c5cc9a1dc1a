"""core.http: a blocking call (on a running event loop it fails at once instead of blocking it) that reads a body
whole, as received, or refuses it."""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from core.http import NotDecodable, TooSlow, request_within

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
    """A server answering every GET with the raw HTTP response `request.param`: its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server name)
            self.wfile.write(request.param)
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    served = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=served.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{served.server_port}/"
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
