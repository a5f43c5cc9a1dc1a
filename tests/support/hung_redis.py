"""A Redis endpoint that takes connections and never answers (a hung Redis) until told to pass them to the test
Redis, counting the connections it takes: each is a try of Redis by a client."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import redis

from tests.conftest import REDIS_URL


class RedisThatHangs:
    """A Redis endpoint on 127.0.0.1 that, while `hung`, takes each connection and never answers (a hung Redis:
    TCP accepted, no reply), and drops what arrives on the connections it passed on before (they stop answering
    too); otherwise it passes each new connection's bytes to the test Redis. `connections` counts the connections
    it took: each is a try of Redis by a client that lost its previous one; `taken` is released once for each;
    `dropped` is set once a request on a connection passed on before was dropped (its client waits for the answer)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.target, self.hung, self.connections = target, True, 0
        self.sockets: list[socket.socket] = []
        self.taken = threading.Semaphore(0)
        self.dropped = threading.Event()  # set once bytes arrived on a connection passed on before, while hung
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client = self.server.accept()[0]
                self.connections += 1
                self.sockets.append(client)
                if not self.hung:
                    self._relay(client)
                self.taken.release()

    def drop(self) -> None:
        """Close every connection taken so far: a client waiting on one fails at once."""
        for connection in self.sockets:
            connection.close()

    def _relay(self, client: socket.socket) -> None:
        redis_side = socket.create_connection(self.target)
        self.sockets.append(redis_side)
        for source, sink in ((client, redis_side), (redis_side, client)):
            threading.Thread(target=self._pass_bytes, args=(source, sink), daemon=True).start()

    def _pass_bytes(self, source: socket.socket, sink: socket.socket) -> None:
        """Copy `source`'s bytes to `sink` until either closes, dropping those that arrive while `hung`."""
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if self.hung:
                    self.dropped.set()
                else:
                    sink.sendall(data)


def breaker_said(cool_down: float) -> tuple[str, str]:
    """The lines the broker's breaker logs (core/broker.py) as a hung Redis opens it, with this cool-down, and as an
    answer closes it."""
    return ("broker's Redis failed: govrag skips it (guard hit counts, queue depth, lost jobs, readiness) and sends"
            f" no ingestion task, each left unsent for the sweep, trying it again after {cool_down} s",
            "broker's Redis answers again: govrag tries it again, ingestion tasks too")


@contextlib.contextmanager
def redis_that_hangs() -> Iterator[tuple[RedisThatHangs, redis.Redis, str]]:
    """The endpoint in front of the test Redis, a client of the test Redis itself, and the broker URL through it."""
    real = redis.Redis.from_url(REDIS_URL)
    kwargs = real.connection_pool.connection_kwargs
    endpoint = RedisThatHangs((kwargs["host"], kwargs["port"]))
    try:
        yield endpoint, real, f"redis://127.0.0.1:{endpoint.server.getsockname()[1]}/{kwargs['db']}"
    finally:
        endpoint.server.close()
        endpoint.drop()
        real.close()
