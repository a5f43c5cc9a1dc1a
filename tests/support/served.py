"""An ASGI app served over HTTP on a loopback port by uvicorn, in a thread of the test process."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from fastapi import FastAPI


@contextmanager
def served(app: FastAPI, *, lifespan: Literal["auto", "off"] = "auto") -> Iterator[str]:
    """The app served as `govrag serve` serves it: its URL. `lifespan="off"` serves an app already started (a
    TestClient's) without starting it again."""
    import uvicorn

    start_ended = threading.Event()

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            try:
                await super().startup(sockets)
            finally:
                start_ended.set()

    def serve() -> None:
        try:
            server.run(sockets=[listening])
        finally:
            start_ended.set()  # it gave up before its start

    listening = socket.create_server(("127.0.0.1", 0))
    server = Server(uvicorn.Config(app, log_config=None, lifespan=lifespan))
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert start_ended.wait(60), "the API's start never ended"
        assert server.started, "the API did not start"
        yield f"http://127.0.0.1:{listening.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)
        listening.close()
    assert not thread.is_alive(), "the API did not stop"
