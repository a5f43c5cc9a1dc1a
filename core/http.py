"""Bounded reads from other servers (the IdP, the model server): a wall-clock deadline and a size cap.

httpx's timeouts apply to each read, so a server that sends one byte at a time could hold a call for ever;
and a body is held in memory whole. `read_within` bounds both while a body is read; `get_within` bounds a whole
GET, the wait for the status line and headers included.
"""

from __future__ import annotations

import asyncio
import time

import httpx


def read_within(response: httpx.Response, *, deadline: float, max_bytes: int) -> bytes:
    """The streamed response body, or ValueError once it passes `deadline` (time.monotonic) or `max_bytes`."""
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise ValueError("the response is too large")
        if time.monotonic() > deadline:
            raise ValueError("the response took too long")
    return bytes(body)


def get_within(url: str, *, seconds: float, max_bytes: int) -> bytes:
    """The body of a 2xx answer to GET url, all of it (connecting, the headers, the body) within `seconds`, or
    ValueError once it takes longer or passes `max_bytes`; redirects are not followed (raise_for_status refuses them).

    A server can drip header lines for ever inside any per-read timeout, so the exchange runs on an event loop of its
    own under one timeout, which cancels it wherever it is. Call it off an event loop, as any blocking call."""
    try:
        return asyncio.run(_get(url, seconds=seconds, max_bytes=max_bytes))
    except TimeoutError:
        raise ValueError("the response took too long") from None


async def _get(url: str, *, seconds: float, max_bytes: int) -> bytes:
    """get_within's exchange, cancelled after `seconds`."""
    body = bytearray()
    async with asyncio.timeout(seconds), httpx.AsyncClient(timeout=seconds, follow_redirects=False) as client:
        async with client.stream("GET", url) as response:
            response.raise_for_status()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise ValueError("the response is too large")
    return bytes(body)
