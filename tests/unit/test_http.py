"""core.http.request_within is a blocking call: on a running event loop it fails at once instead of blocking it."""

from __future__ import annotations

import asyncio

import pytest

from core.http import request_within


def test_a_call_on_a_running_event_loop_is_refused_before_connecting() -> None:
    """Its exchange runs on an event loop of its own; called from an `async def` (a route, a dependency) it would
    stall every request on that loop, so it raises instead (the port is one nothing listens on)."""

    async def on_the_loop() -> bytes:
        return request_within("GET", "http://127.0.0.1:9/", seconds=60.0, max_bytes=1)

    with pytest.raises(RuntimeError, match="running event loop"):
        asyncio.run(on_the_loop())
