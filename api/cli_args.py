"""argparse types the `govrag` commands share."""

from __future__ import annotations

import argparse


def api_url(value: str) -> str:
    """An argparse type for the URL of a running govrag API (`redteam --url`, `ingest --api-url`): `http.api_url`'s
    check, the one `redteam.run` makes, its refusal a usage error saying where the token goes instead. Never quoted
    back: it may hold a password."""
    from core import http

    try:
        return http.api_url(value)
    except http.CredentialsInURL as refused:
        raise argparse.ArgumentTypeError(f"{refused}: give the bearer token with --token or its environment variable "
                                         "(see --help)") from None
    except http.URLRefused as refused:
        raise argparse.ArgumentTypeError(str(refused)) from None
