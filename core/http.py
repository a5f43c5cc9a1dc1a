"""Bounded reads from other servers (the IdP, the model server): a wall-clock deadline and a size cap.

httpx's timeouts apply to each read, so a server that sends one byte at a time could hold a call for ever;
and a body is held in memory whole. `read_within` bounds both.
"""

from __future__ import annotations

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
