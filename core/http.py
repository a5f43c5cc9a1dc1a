"""Bounded calls to other servers (the IdP, the model server): one wall-clock deadline and a size cap.

httpx's timeouts apply to each read, so a server that sends one byte, or one header line, at a time could hold a
call for ever; and a body is held in memory whole. `request_within` bounds both, the wait for the headers included.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Mapping
from typing import Any

import httpx


def request_within(method: str, url: str, *, seconds: float, max_bytes: int, json: Any = None,
                   headers: Mapping[str, str] | None = None, trust_env: bool = True) -> bytes:
    """The body of a 2xx answer to `method url`, all of it (connecting, the headers, the body) within `seconds`, or
    ValueError once it takes longer or passes `max_bytes`; redirects are not followed (raise_for_status refuses them).

    The exchange runs on an event loop of its own under one timeout, which cancels it wherever it is. It blocks, so
    it is called from a worker thread (FastAPI's thread pool, a Celery task); on a running event loop asyncio.run
    raises RuntimeError at once."""
    exchange = _request(method, url, seconds=seconds, max_bytes=max_bytes, json=json, headers=headers,
                        trust_env=trust_env)
    try:
        return asyncio.run(exchange)
    except TimeoutError:
        raise ValueError("the response took too long") from None
    finally:
        exchange.close()  # never started when asyncio.run refused: no "never awaited" warning


async def _request(method: str, url: str, *, seconds: float, max_bytes: int, json: Any,
                   headers: Mapping[str, str] | None, trust_env: bool) -> bytes:
    """request_within's exchange, cancelled after `seconds`."""
    body = bytearray()
    async with (asyncio.timeout(seconds),
                httpx.AsyncClient(timeout=seconds, follow_redirects=False, trust_env=trust_env,
                                  verify=_tls_context(trust_env)) as client,
                client.stream(method, url, json=json, headers=headers) as response):
        response.raise_for_status()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > max_bytes:
                raise ValueError("the response is too large")
    return bytes(body)


@functools.cache
def _tls_context(trust_env: bool) -> ssl.SSLContext:
    """httpx's default TLS context, made once: loading the CA bundle takes ~40 ms, and each call has a new client."""
    return httpx.create_ssl_context(trust_env=trust_env)
