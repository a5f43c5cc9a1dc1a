"""The audit checkpoint mirror: one whole line per checkpoint, even with writers sharing the file."""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path

from audit import integrity
from core.models import AuditCheckpoint, utcnow
from core.settings import Settings
from tests.support.lock_waits import waits_for_a_file_lock
from tests.support.polling import wait_until


def _checkpoint(event_id: int) -> AuditCheckpoint:
    return AuditCheckpoint(created_at=utcnow(), kind="periodic", last_event_id=event_id, last_hash="ab" * 32,
                           event_count=0, signature="cd" * 32)


def test_a_mirror_line_waits_for_a_writer_holding_the_file(tmp_path: Path) -> None:
    """Appends are atomic on a local disk only: on a network mount two API processes could mix their lines into one
    no verification reads (a permanent false alarm). Each append now takes the file's flock first."""
    settings = Settings(data_dir=tmp_path)
    mirror = settings.resolved_checkpoint_file
    mirror.parent.mkdir(parents=True, exist_ok=True)
    with mirror.open("a", encoding="utf-8") as other_writer:
        fcntl.flock(other_writer, fcntl.LOCK_EX)
        appending = threading.Thread(target=integrity.mirror_checkpoint, args=(settings, _checkpoint(7)))
        appending.start()
        wait_until(lambda: waits_for_a_file_lock(os.getpid()) or not appending.is_alive(), timeout=60,
                   what="the append to wait for the lock or finish")
        assert appending.is_alive() and mirror.read_text() == ""  # waiting, nothing written under the other's lock
        other_writer.write("{}\n")
    appending.join(timeout=60)
    assert [json.loads(line).get("last_event_id") for line in mirror.read_text().splitlines()] == [None, 7]
