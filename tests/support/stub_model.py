"""An OpenAI-compatible model server for tests (outside govrag's boundary), and a way to answer through it."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fastapi.testclient import TestClient


class StubModel:
    """An OpenAI-compatible chat endpoint whose reply the test chooses; records what it was sent."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.reply: Callable[[list[dict[str, str]]], str] = lambda _messages: "I don't know."
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                content = stub.reply(body["messages"])
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@contextlib.contextmanager
def answering_through(client: TestClient, stub: StubModel) -> Iterator[StubModel]:
    """The running app answers through `stub` (its recorded requests cleared) while the block runs."""
    original = client.app.state.settings  # type: ignore[attr-defined]
    client.app.state.settings = original.model_copy(update={  # type: ignore[attr-defined]
        "answer_backend": "openai", "llm_base_url": stub.url, "llm_model": "stub"})
    stub.requests.clear()
    try:
        yield stub
    finally:
        client.app.state.settings = original  # type: ignore[attr-defined]
