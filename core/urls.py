"""How govrag reads a URL's port and user information, one rule for the URLs it is configured with (core.settings) and
those it is given to call (core.http.api_url): standard library only, so that the http client does not load the
settings' dependencies."""

from __future__ import annotations

import re
from urllib.parse import SplitResult, urlsplit

NO_USABLE_PORT = "names a port that is not a number from 1 to 65535"
# A port as written: one to five ASCII digits.
_PORT_DIGITS = re.compile(r"[0-9]{1,5}")


def url_parts(url: str) -> SplitResult | None:
    """url split as the http clients read it, or None when it does not parse (an unclosed IPv6 bracket): urlsplit's
    own ValueError, raised in a settings check, would name neither the setting nor what to fix."""
    try:
        return urlsplit(url)
    except ValueError:
        return None


def url_has_credentials(url: str) -> bool:
    """True when url holds a user name or password (`user:password@host`, an `@` in its authority), an empty one
    (`http://@host`) included: httpx reads that as no user information, yet it is malformed where a URL govrag calls
    must hold none. False when it does not parse (the check that names the URL refuses it)."""
    parts = url_parts(url)
    return parts is not None and "@" in parts.netloc


def called_url_port_usable(url: str) -> bool:
    """True when url, one govrag calls (the IdP's, the model server's, a govrag API's), names no port or one from 1 to
    65535 in ASCII digits; an empty one (`host:`) is not usable. True when it does not parse: the check naming the URL
    refuses it."""
    parts = url_parts(url)
    return parts is None or port_usable(parts.netloc, empty_is_default=False)


def port_usable(authority: str, *, empty_is_default: bool) -> bool:
    """True when a URL's authority (`user:password@host:port`) names no port, or as written one a server can listen on:
    ASCII digits naming 1 to 65535 (0 is "any" to a listener, no address to call). urlsplit in early 3.11 releases and
    SQLAlchemy read a port with int(), `:８０`, `:+80` or `: 80` as 80. An empty one (`host:`, which urlsplit reads as
    none) is taken only where `empty_is_default`, as the scheme's default port. An IPv6 host's colons are in its
    brackets, up to the first `]` (urlsplit's reading), and text after it is a port only after a `:`: urlsplit reads
    `[::1]8080` as no port, httpx as port 8080 (and `[::1]99999` as 99999), SQLAlchemy as no port, the rest dropped;
    `[::1]]:5432` is host `::1]` to SQLAlchemy: refused, as is a `[` never closed."""
    host_and_port = authority.rpartition("@")[2]
    if host_and_port.startswith("["):
        _, bracket, host_and_port = host_and_port.partition("]")
        if not bracket or host_and_port[:1] not in ("", ":"):
            return False
    _, colon, port = host_and_port.partition(":")
    if not port:
        return not colon or empty_is_default
    return _PORT_DIGITS.fullmatch(port) is not None and 1 <= int(port) <= 65535
