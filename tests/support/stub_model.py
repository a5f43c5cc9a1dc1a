"""An OpenAI-compatible model server for tests (outside govrag's boundary), and a way to answer through it."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fastapi.testclient import TestClient

from retrieval.models import hold_generator


class StubModel:
    """An OpenAI-compatible chat endpoint whose reply the test chooses; records what it was sent."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.reply: Callable[[list[dict[str, str]]], str] = lambda _messages: "I don't know."
        self.header_drip_seconds = 0.0  # send the status line, then a header line every 0.2 s this long, then the reply
        self.client_hung_up = False  # the client closed the connection while the headers dripped
        self.drip_ended = threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                content = stub.reply(body["messages"])
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                if stub.header_drip_seconds and not self._drip_headers():
                    return
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _drip_headers(self) -> bool:
                """The status line, then one header line every 0.2 s (never idle long enough for a per-read
                timeout); False if the client hangs up first."""
                self.flush_headers()
                try:
                    for _ in range(round(stub.header_drip_seconds / 0.2)):
                        time.sleep(0.2)
                        self.wfile.write(b"X-Thinking: 1\r\n")
                        self.wfile.flush()
                except OSError:
                    stub.client_hung_up = True
                    return False
                finally:
                    stub.drip_ended.set()
                return True

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@contextlib.contextmanager
def answering_through(client: TestClient, stub: StubModel, **settings: Any) -> Iterator[StubModel]:
    """The running app answers through `stub` (its recorded requests cleared), with `settings` changed, while the
    block runs. The block holds the model backend, as the API holds its own from start to stop: the last holder's
    release closes it (its connections and their event loops), so each block's are closed as it ends."""
    original = client.app.state.settings  # type: ignore[attr-defined]
    answering = original.model_copy(update={
        "answer_backend": "openai", "llm_base_url": stub.url, "llm_model": "stub", **settings})
    model = hold_generator(answering)
    client.app.state.settings = answering  # type: ignore[attr-defined]
    stub.requests.clear()
    try:
        yield stub
    finally:
        client.app.state.settings = original  # type: ignore[attr-defined]
        model.release()
