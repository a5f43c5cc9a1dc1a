"""`govrag serve`'s sockets (api.serving.listening), made before its start: every address its --host resolves to, as
uvicorn's own (asyncio's create_server) would be, or one line saying why not. The resolver and the kernel's address
families are outside govrag: a test stands in for them where this machine cannot show the case."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from typing import Any

import pytest

from api import cli, serving
from core.errors import AddressUnusable

TCP = (socket.SOCK_STREAM, socket.IPPROTO_TCP, "")


def _resolving_to(*addresses: tuple[socket.AddressFamily, tuple[Any, ...]]) -> Callable[..., list[tuple[Any, ...]]]:
    """A resolver answering every name with `addresses`, in this order."""
    return lambda *_a, **_k: [(family, *TCP, address) for family, address in addresses]


def test_a_host_refused_at_one_of_its_addresses_leaves_none_of_them_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name resolving to two addresses, the second in use: refused, and the first one's socket is closed again (no
    descriptor kept, the port free for the next start)."""
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        monkeypatch.setattr(socket, "getaddrinfo", _resolving_to((socket.AF_INET, ("127.0.0.2", port)),
                                                                 (socket.AF_INET, ("127.0.0.1", port))))
        with pytest.raises(AddressUnusable) as refused, serving.listening("both", port):
            pass
    assert str(refused.value) == (f"cannot listen on both:{port}: Address already in use (give another --port, or a "
                                  "--host of this machine)")
    with socket.create_server(("127.0.0.2", port)):  # free again
        pass


def _without_ipv6(monkeypatch: pytest.MonkeyPatch) -> None:
    """This kernel as one booted with IPv6 disabled: no AF_INET6 socket can be made."""
    made = socket.socket

    def socket_of(family: int = socket.AF_INET, *args: Any, **kwargs: Any) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
        return made(family, *args, **kwargs)

    monkeypatch.setattr(socket, "socket", socket_of)


def test_a_host_resolving_to_a_family_this_kernel_lacks_listens_on_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """`localhost` resolves to ::1 and 127.0.0.1 on a kernel without IPv6 too: uvicorn (asyncio) skips the family it
    cannot make a socket of and serves 127.0.0.1; govrag refused the whole start."""
    monkeypatch.setattr(socket, "getaddrinfo", _resolving_to((socket.AF_INET6, ("::1", 0, 0, 0)),
                                                             (socket.AF_INET, ("127.0.0.1", 0))))
    _without_ipv6(monkeypatch)
    with serving.listening("localhost", 0) as sockets:
        assert [sock.getsockname()[0] for sock in sockets] == ["127.0.0.1"]


def test_a_host_of_that_family_alone_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", _resolving_to((socket.AF_INET6, ("::1", 8000, 0, 0))))
    _without_ipv6(monkeypatch)
    with pytest.raises(AddressUnusable) as refused, serving.listening("::1", 8000):
        pass
    assert str(refused.value) == ("cannot listen on [::1]:8000: Address family not supported by protocol (give another "
                                  "--port, or a --host of this machine)")


def test_a_host_that_is_no_name_at_all_is_refused_in_one_line() -> None:
    """An empty label: the resolver's IDNA encoding raised UnicodeError, a traceback."""
    with pytest.raises(AddressUnusable) as refused, serving.listening("a..b", 8000):
        pass
    assert str(refused.value) == ("cannot listen on a..b:8000: UnicodeError (give another --port, or a --host of this "
                                  "machine)")


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_a_port_outside_the_tcp_range_is_a_usage_error(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The resolver takes a port modulo 65536: `--port 70000` listened on 4464."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--port", port])
    assert exited.value.code == 2
    assert capsys.readouterr().err.endswith("argument --port: must be a port, 0 to 65535\n")
