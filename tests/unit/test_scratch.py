"""A process's private temporary directory (ingestion.scratch): removed by another process only once its owner
has ended, never while it runs."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from ingestion import scratch


def _owned_by(base: Path, owner: str) -> Path:
    directory = Path(tempfile.mkdtemp(prefix=f"{scratch.PREFIX}{owner}-", dir=base))
    (directory / "page-1.ppm").write_bytes(b"the scan's plaintext")
    return directory


def _start_of_zombie(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def test_the_directories_of_ended_processes_are_removed_and_no_other(tmp_path: Path) -> None:
    running = subprocess.Popen(["sleep", "60"])  # noqa: S607
    zombie = subprocess.Popen(["true"])  # noqa: S607  # ended, not reaped: a killed worker its pool has not seen yet
    ended = subprocess.Popen(["true"])  # noqa: S607
    ended.wait()
    try:
        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # once it has ended, leaving it unreaped
        namespace, pid, started = str(scratch._owner(running.pid)).split("-")
        live = _owned_by(tmp_path, f"{namespace}-{pid}-{started}")
        other_namespace = _owned_by(tmp_path, f"{int(namespace) + 1}-{ended.pid}-{started}")
        reused_pid = _owned_by(tmp_path, f"{namespace}-{pid}-{int(started) - 1}")  # its pid now another process's
        of_zombie = _owned_by(tmp_path, f"{namespace}-{zombie.pid}-{_start_of_zombie(zombie.pid)}")
        of_ended = _owned_by(tmp_path, f"{namespace}-{ended.pid}-{started}")
        unowned = tmp_path / "govrag-pandoc-abc"
        unowned.mkdir()
        assert sorted(scratch.remove_ended(tmp_path)) == sorted([reused_pid, of_zombie, of_ended])
        assert sorted(tmp_path.iterdir()) == sorted([live, other_namespace, unowned])
    finally:
        running.kill()
        running.wait()
        zombie.wait()


def test_a_process_parses_in_a_directory_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tempfile's default is the process's own directory, named after it; a forked child makes its own."""
    monkeypatch.setattr(scratch, "_base", str(tmp_path))
    monkeypatch.setattr(scratch, "_current", None)
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    directory = Path(scratch.private_dir())
    assert directory.parent == tmp_path
    assert directory.name.startswith(f"{scratch.PREFIX}{scratch._owner(os.getpid())}-")
    assert tempfile.gettempdir() == str(directory)
    assert scratch.private_dir() == str(directory)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.write(write, scratch.private_dir().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    with os.fdopen(read, "rb") as answer:
        childs = Path(answer.read().decode())
    assert childs.parent == tmp_path
    assert childs != directory
