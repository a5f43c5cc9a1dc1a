"""This process's TCP connections to a local port, counted from /proc: what a test of a close counts."""

from __future__ import annotations

import os


def connections_to(port: int) -> int:
    """This process's TCP connections to 127.0.0.1:port: its sockets whose inode /proc/net/tcp lists with that remote
    port (the server's own ends, in its threads, have it as their local port); no other thread's socket counted."""
    inodes = _socket_inodes()
    with open("/proc/self/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(row[2] == f"0100007F:{port:04X}" and row[9] in inodes for row in rows)


def _socket_inodes() -> set[str]:
    """The inodes of this process's open sockets."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue  # closed since listed, by another thread
        if target.startswith("socket:["):
            inodes.add(target.removeprefix("socket:[").removesuffix("]"))
    return inodes
