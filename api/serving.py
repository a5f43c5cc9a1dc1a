"""How `govrag serve` runs uvicorn: on sockets it listens on before its start, so an address it cannot use is refused
in one line before anything starts (uvicorn binds only after the start, and says it with its own error, exit 3)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI

from core.errors import AddressUnusable
from ingestion import scratch

logger = logging.getLogger(__name__)

# The logging is ours (core.logs, at start-up), without uvicorn's access line, the raw request line with its query
# string; the API's request middleware logs each request without it.
UVICORN_OPTIONS: dict[str, Any] = {"log_config": None, "access_log": False}


@contextmanager
def listening(host: str, port: int) -> Iterator[list[socket.socket]]:
    """Sockets listening on `port` at every address `host` resolves to, made as uvicorn's (asyncio's create_server)
    are: SO_REUSEADDR (a restart binds beside its predecessor's closing connections), IPv6 sockets IPv6 only;
    AddressUnusable if one cannot be. A family this kernel has no sockets for (IPv6 disabled at boot) is skipped, as
    asyncio skips it, unless it is the only one. Connections made before `serve` wait in the backlog. Closed on
    leaving."""
    with ExitStack() as opened:
        sockets: list[socket.socket] = []
        try:
            resolved = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            for family, kind, proto, _, address in dict.fromkeys(resolved):  # the resolver's order, each address once
                try:
                    sock = opened.enter_context(socket.socket(family, kind, proto))
                except OSError as no_family:
                    unmade = no_family
                    continue
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen()  # uvicorn listens again, with its backlog
                sockets.append(sock)
            if not sockets:
                raise unmade
        except (OSError, UnicodeError) as error:  # in use, not this machine's, a privileged port, a host name that
            raise AddressUnusable(_address(host, port), error) from None  # does not resolve (or is no name at all)
        yield sockets


def serve(app: FastAPI, sockets: list[socket.socket]) -> None:
    """Run `app` under uvicorn on `sockets` until it is stopped: uvicorn.run's options, signals, lifespan and graceful
    shutdown (uvicorn.run takes no sockets)."""
    logger.info("listening on %s", ", ".join(f"http://{_address(*sock.getsockname()[:2])}" for sock in sockets))
    try:
        _Server(uvicorn.Config(app, **UVICORN_OPTIONS)).run(sockets=sockets)
    except KeyboardInterrupt:  # the Ctrl-C uvicorn stopped on, raised again once it has (uvicorn.run ignores it too)
        pass


class _Server(uvicorn.Server):
    """uvicorn's server, removing this process's private temporary directory (`ingestion.scratch`: the documents the
    in-process worker parsed) once its shutdown is done. Stopped by a signal, uvicorn then raises it again: SIGINT is
    the KeyboardInterrupt `serve` ignores, but SIGTERM (systemd, docker, Kubernetes) ends the process as the signal
    does, exit status and all, with no atexit to remove the directory. The lifespan's shutdown has stopped the worker
    by then, or abandoned a run past its wait with the job handed back: that run, failing in the removed directory,
    writes no outcome, and the next start runs the job again."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().shutdown(sockets)
        finally:
            scratch.remove_own()


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
