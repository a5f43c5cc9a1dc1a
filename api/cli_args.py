"""argparse types the `govrag` commands share."""

from __future__ import annotations

import argparse


def api_url(value: str) -> str:
    """An argparse type for the URL of a running govrag API (`redteam --url`, `ingest --api-url`): http(s), with a
    host, and no user name or password, which httpx would send (Basic, in clear over http) in place of the bearer
    token. Never quoted back: it may hold a password."""
    import httpx

    try:
        url = httpx.URL(value)
    except httpx.InvalidURL:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise argparse.ArgumentTypeError("must be an http(s) URL, such as http://127.0.0.1:8000")
    if url.userinfo:
        raise argparse.ArgumentTypeError("must not hold a user name or password (user:password@): give the bearer "
                                         "token with --token or its environment variable (see --help)")
    return value
