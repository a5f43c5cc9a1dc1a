"""Checkpoints as earlier releases signed them, for tests of ledgers they left: v1 (before migration 0016: no
deployment id) and v2 (0016 to 0018: the deployment id, HMAC only, no Ed25519 signature)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime

from sqlalchemy import insert

from audit import integrity
from core import crypto
from core.db import unit_of_work
from core.models import AuditCheckpoint, Deployment, RetrievalEvent
from core.settings import Settings


def v1_signature(key: bytes, checkpoint: AuditCheckpoint) -> str:
    """docs/audit.md's v1 statement, HMAC-SHA256, base64url: no prefix."""
    stamp = checkpoint.created_at.replace(tzinfo=None).isoformat()
    statement = (f"govrag-checkpoint|{checkpoint.kind}|{checkpoint.last_event_id}|{checkpoint.last_hash}|"
                 f"{checkpoint.event_count}|{stamp}")
    return base64.urlsafe_b64encode(hmac.new(key, statement.encode(), hashlib.sha256).digest()).decode()


def v2_signature(key: bytes, deployment_id: str, checkpoint: AuditCheckpoint) -> str:
    """docs/audit.md's v2 statement, HMAC-SHA256, base64url, prefixed `v2.`."""
    stamp = checkpoint.created_at.replace(tzinfo=None).isoformat()
    statement = (f"govrag-checkpoint|v2|{deployment_id}|{checkpoint.kind}|{checkpoint.last_event_id}|"
                 f"{checkpoint.last_hash}|{checkpoint.event_count}|{stamp}")
    return "v2." + base64.urlsafe_b64encode(hmac.new(key, statement.encode(), hashlib.sha256).digest()).decode()


def add_v1_checkpoint(settings: Settings, *, at: int, created_at: datetime) -> None:
    """Store a v1-signed manual checkpoint at event `at` (a UTC `created_at`, whole seconds). The key file is made
    first, as that release made it: this one asks the database whether it may (its master key verifiers, which a
    database at revision 0015 has no table for)."""
    if settings.master_key is None:
        crypto.load_or_create_master_keyring(settings.resolved_master_key_file, create=True)
    _store(settings, at=at, created_at=created_at, version=1)


def add_v2_checkpoint(settings: Settings, *, at: int, created_at: datetime) -> None:
    """Store a v2-signed manual checkpoint at event `at` (a UTC `created_at`, whole seconds) in a database at revision
    0016 to 0018 and append it to the mirror file, as those releases did."""
    checkpoint = _store(settings, at=at, created_at=created_at, version=2)
    line = {"created_at": created_at.replace(tzinfo=UTC).isoformat(), "kind": checkpoint.kind, "last_event_id": at,
            "last_hash": checkpoint.last_hash, "event_count": 0, "signature": checkpoint.signature}
    with settings.resolved_checkpoint_file.open("a", encoding="utf-8") as mirror:
        mirror.write(json.dumps(line) + "\n")


def _store(settings: Settings, *, at: int, created_at: datetime, version: int) -> AuditCheckpoint:
    with unit_of_work(settings.resolved_database_url) as session:
        event = session.get(RetrievalEvent, at)
        assert event is not None
        checkpoint = AuditCheckpoint(created_at=created_at, kind="manual", last_event_id=at, last_hash=event.hash,
                                     event_count=0)
        key = integrity.checkpoint_key(settings, session)
        if version == 1:  # a database at revision 0015 has no deployment table
            checkpoint.signature = v1_signature(key, checkpoint)
        else:
            deployment = session.get(Deployment, 1)
            assert deployment is not None
            checkpoint.signature = v2_signature(key, deployment.deployment_id, checkpoint)
        # the columns those releases knew: a database before revision 0019 has no signature_ed25519
        known = ("created_at", "kind", "last_event_id", "last_hash", "event_count", "signature")
        session.execute(insert(AuditCheckpoint).values({name: getattr(checkpoint, name) for name in known}))
        session.commit()
    return checkpoint
