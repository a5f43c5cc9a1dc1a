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


def actor(value: str) -> str:
    """An argparse type for --actor (`govrag audit`, `export training-data`, `keys rotate`, `reindex`): a name the
    ledger's subject column holds as cli:<actor>, in characters a token's subject may carry (`token_can_carry`);
    anything else a usage error. A line break or a control character would break the audit row it is written in (or
    show it as a name it is not), and a name too long for the column would fail the command as it writes its event."""
    from authz.identity import CLI_PREFIX, MAX_SUBJECT_CHARS, token_can_carry

    longest = MAX_SUBJECT_CHARS - len(CLI_PREFIX)
    if not 0 < len(value) <= longest or not token_can_carry(value):
        raise argparse.ArgumentTypeError(f"1 to {longest} printable characters, no line break nor control character")
    return value
