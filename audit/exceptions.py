"""The audit domain's errors."""

from __future__ import annotations


class MirrorUnreadable(OSError):
    """Something is at the checkpoint mirror's path but cannot be read as the mirror (a named pipe or a device:
    core.files.NotARegularFile; a folder; no permission): `verify` cannot take its checkpoints until the operator fixes
    it. An OSError of the failure's errno, reason and path (`filename`), so a command says it as any path it cannot
    read; the API answers it as a 503 `audit_mirror_unreadable` naming no path (api.errors)."""
