"""The openai backend against a local stub server: every unusable reply is a ModelError (the extractive fallback)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from core.settings import Settings
from retrieval.models import MAX_REPLY_BYTES, ModelError, OpenAIGenerator

Reply = Callable[[BaseHTTPRequestHandler], None]


@pytest.fixture
def serve() -> Iterator[Callable[[Reply], OpenAIGenerator]]:
    """Start a stub model server answering with `reply`; a generator pointed at it (timeout 1 s)."""
    servers: list[ThreadingHTTPServer] = []

    def start(reply: Reply) -> OpenAIGenerator:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                reply(self)

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return OpenAIGenerator(Settings(answer_backend="openai", llm_timeout_seconds=1.0,
                                        llm_base_url=f"http://127.0.0.1:{server.server_port}"))

    yield start
    for server in servers:
        server.shutdown()


def _send(body: bytes, length: int | None = None) -> Reply:
    def reply(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body) if length is None else length))
        handler.end_headers()
        try:
            handler.wfile.write(body)
        except OSError:
            pass  # the client stopped reading
    return reply


def _trickle(ended: list[str], done: threading.Event) -> Reply:
    """One byte every 0.3 s, 12 s in all: never idle long enough for a per-read timeout. `ended` says how it ended:
    "hung up" when the client closed the connection first, "finished" when it read to the end."""
    def reply(handler: BaseHTTPRequestHandler) -> None:
        _send(b"", length=100_000)(handler)
        try:
            for _ in range(40):
                handler.wfile.write(b" ")
                handler.wfile.flush()
                time.sleep(0.3)
            ended.append("finished")
        except OSError:
            ended.append("hung up")
        done.set()
    return reply


def _complete(generator: OpenAIGenerator) -> str:
    return generator.complete([{"role": "user", "content": "q"}], max_tokens=8)


def test_a_well_formed_reply_is_the_answer(serve) -> None:
    generator = serve(_send(b'{"choices": [{"message": {"content": "Economy [1]."}}]}'))
    assert _complete(generator) == "Economy [1]."


@pytest.mark.parametrize("body", [
    b'{"choices": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # a RecursionError in the JSON parser
    b'{"choices": "not a list"}',
    b"not json",
])
def test_an_unreadable_reply_is_a_model_error(serve, body: bytes) -> None:
    with pytest.raises(ModelError):
        _complete(serve(_send(body)))


def test_a_reply_over_the_size_cap_is_a_model_error(serve) -> None:
    with pytest.raises(ModelError):
        _complete(serve(_send(b'{"choices": [{"message": {"content": "' + b"a" * MAX_REPLY_BYTES + b'"}}]}')))


def test_a_redirect_is_not_followed(serve) -> None:
    """A model server redirecting the call (here to another server on the allowlist; it could be any host) is a
    ModelError: the prompt, customer data, goes to the configured URL only."""
    reached: list[str] = []
    elsewhere = serve(lambda handler: (reached.append(handler.path), _send(b"{}")(handler)))

    def redirect(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(307)
        handler.send_header("Location", elsewhere._url)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    with pytest.raises(ModelError):
        _complete(serve(redirect))
    assert reached == []


def test_a_trickling_server_cannot_hold_the_call_past_the_timeout(serve) -> None:
    """llm_timeout_seconds is 1; the server would go on for 12 s. The call gives up and hangs up before the end."""
    ended, done = [], threading.Event()
    with pytest.raises(ModelError):
        _complete(serve(_trickle(ended, done)))
    assert done.wait(timeout=60)
    assert ended == ["hung up"]
