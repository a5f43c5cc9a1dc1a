"""A checkpoint as releases before migration 0016 signed it (v1: no deployment id), for tests of ledgers they left."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime

from audit import integrity
from core import crypto
from core.db import unit_of_work
from core.models import AuditCheckpoint, RetrievalEvent
from core.settings import Settings


def v1_signature(key: bytes, checkpoint: AuditCheckpoint) -> str:
    """docs/audit.md's v1 statement, HMAC-SHA256, base64url: no prefix."""
    stamp = checkpoint.created_at.replace(tzinfo=None).isoformat()
    statement = (f"govrag-checkpoint|{checkpoint.kind}|{checkpoint.last_event_id}|{checkpoint.last_hash}|"
                 f"{checkpoint.event_count}|{stamp}")
    return base64.urlsafe_b64encode(hmac.new(key, statement.encode(), hashlib.sha256).digest()).decode()


def add_v1_checkpoint(settings: Settings, *, at: int, created_at: datetime) -> None:
    """Store a v1-signed manual checkpoint at event `at` (a UTC `created_at`, whole seconds). The key file is made
    first, as that release made it: this one asks the database whether it may (its master key verifiers, which a
    database at revision 0015 has no table for)."""
    if settings.master_key is None:
        crypto.load_or_create_master_keyring(settings.resolved_master_key_file, create=True)
    with unit_of_work(settings.resolved_database_url) as session:
        event = session.get(RetrievalEvent, at)
        assert event is not None
        checkpoint = AuditCheckpoint(created_at=created_at, kind="manual", last_event_id=at, last_hash=event.hash,
                                     event_count=0)
        checkpoint.signature = v1_signature(integrity.checkpoint_key(settings, session), checkpoint)
        session.add(checkpoint)
        session.commit()
