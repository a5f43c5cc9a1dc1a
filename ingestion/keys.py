"""Key rotation in committed batches, then the old versions retired: department keys (every document key
rewrapped) and the master key (every department key rewrapped). Data keys, ciphertexts and vectors stay.

Each rotation's `key_rotation` audit event commits in the transaction that completes it: a rotation is done if and
only if the ledger says so, whatever stops the run (a crash, a Ctrl-C, the database going away)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from audit import service as audit_service
from audit.schemas import AdminEventType
from authz import service as authz_service
from authz.identity import Identity
from core.db import unit_of_work
from core.error_pickling import InterruptUnpickledAsRaised, UnpickledAsRaised
from core.keystore import KeyStore, keystore_for
from core.settings import Settings
from ingestion import repository

logger = logging.getLogger(__name__)

BATCH_SIZE = 200


@dataclass(frozen=True)
class RotationReport:
    """What one department's rotation did."""

    department: str
    new_version: int
    documents_rewrapped: int
    # Documents whose key row no longer opened (altered in the database): not rewrapped, their old wrapping dropped
    # with the old version; each is to be deleted or uploaded again.
    documents_unreadable: tuple[str, ...] = ()


def rotate_department_keys(*, settings: Settings, identity: Identity, departments: list[str] | None = None,
                           batch_size: int = BATCH_SIZE) -> list[RotationReport]:
    """Rotate the keys of the given departments (all when None), one after the other, each audited as done by
    `identity`; data keys and vectors are untouched.

    Each stage commits on its own: until the last one, documents open through whichever wrapping is
    newest, so old key versions stay readable while the rotation runs (and a crash can simply re-run).
    """
    with unit_of_work(settings.resolved_database_url) as session:
        known = authz_service.list_departments(session=session)
    chosen = known if departments is None else [d for d in departments if d in known]
    return [_rotate_one(settings, identity, department, batch_size) for department in chosen]


def _rotate_one(settings: Settings, identity: Identity, department: str, batch_size: int) -> RotationReport:
    """One department's rotation. A document whose key row no longer opens (altered in the database) is skipped, not
    a rotation failing at each run until it is deleted: reported, audited and logged by id (`documents_unreadable`)."""
    keystore = keystore_for(settings)
    url = settings.resolved_database_url
    with unit_of_work(url) as session:
        version = keystore.begin_rotation(session=session, department=department)
        document_ids = repository.document_ids_with_keys(session, department)
    rewrapped = 0
    unreadable: set[str] = set()  # the documents whose key row did not open
    for start in range(0, len(document_ids), batch_size):
        with unit_of_work(url) as session:
            rewrapped += keystore.rewrap_documents(session=session, department=department,
                                                   document_ids=document_ids[start:start + batch_size],
                                                   version=version, unreadable=unreadable)
    with unit_of_work(url) as session:  # uploads that read the old version meanwhile are rewrapped here
        rewrapped += keystore.finish_rotation(session=session, department=department, version=version,
                                              unreadable=unreadable)
        report = RotationReport(department=department, new_version=version, documents_rewrapped=rewrapped,
                                documents_unreadable=tuple(sorted(unreadable)))
        _audit(session, settings, identity, department,
               {"new_version": report.new_version, "documents_rewrapped": report.documents_rewrapped,
                "documents_unreadable": list(report.documents_unreadable)})
    for document_id in report.documents_unreadable:
        logger.warning("the data key of document %s does not open under its department key: not rewrapped by the "
                       "rotation of %s, its key is gone with the old version; delete it or upload it again",
                       document_id, department)
    logger.info("rotated department key of %s to v%d: %d document keys rewrapped", department, version, rewrapped)
    return report


@dataclass(frozen=True)
class MasterRotationReport:
    """What a master-key rotation did; `retired_versions` are no longer needed by any key."""

    new_version: int
    keys_rewrapped: int
    retired_versions: tuple[int, ...]


class OldMasterVersionsKept(UnpickledAsRaised):
    """The master rotation is done and audited, but dropping the old versions from the key file failed (its cause
    says why): they stay there, unused, until a rotation retires them."""

    def __init__(self, report: MasterRotationReport) -> None:
        super().__init__(f"master key rotated to v{report.new_version}; old versions not removed from the key file")
        self.report = report


class OldMasterVersionsKeptInterrupted(InterruptUnpickledAsRaised):
    """What `OldMasterVersionsKept` says (the rotation done and audited, `report`), the dropping cut by a Ctrl-C.
    Still a KeyboardInterrupt: a caller that does not look for it stops as on any Ctrl-C (`except Exception` does
    not swallow it)."""

    def __init__(self, report: MasterRotationReport) -> None:
        super().__init__(f"master key rotated to v{report.new_version}; interrupted as the old versions were being "
                         "removed from the key file")
        self.report = report


def rotate_master_key(*, settings: Settings, identity: Identity,
                      batch_size: int = BATCH_SIZE) -> MasterRotationReport:
    """A new master version (its verifier stored with the first batch); department keys (and the audit checkpoint key)
    rewrapped under it; old versions (and their verifiers) retired; audited as done by `identity`.

    The old version stays in the keyring until every row is rewrapped and committed, so a crash midway leaves
    everything readable; running it again finishes the job under a newer version. The audit event commits with the
    check that no key needs an old version any more; only then are they dropped from the key file (a file cannot
    commit with the database: this way round a crash leaves a rotation audited and old versions unused in the
    file, as keys from settings stay until the operator removes them, never one rotated and unaudited). With a key
    file, rotations run one after the other (its lock): each reads the ring the one before wrote.
    """
    keystore = keystore_for(settings)
    with keystore.master_rotation():  # a second rotation started meanwhile waits for this one, then rotates again
        return _rotate_master(keystore, settings, identity, batch_size)


def _rotate_master(keystore: KeyStore, settings: Settings, identity: Identity,
                   batch_size: int) -> MasterRotationReport:
    """`rotate_master_key`'s steps, with the key file's lock held."""
    url = settings.resolved_database_url
    with unit_of_work(url) as session:
        keystore.keep_checkpoint_key(session=session)  # before any new version: signatures outlive the old one
    version = keystore.add_master_version()
    rewrapped = 0
    while True:
        with unit_of_work(url) as session:
            done = keystore.rewrap_under_master(session=session, version=version, limit=batch_size)
        rewrapped += done
        if done < batch_size:
            break
    with unit_of_work(url) as session:
        retired = keystore.retirable_master_versions(session=session, version=version)
        keystore.forget_master_verifiers(session=session, version=version)
        report = MasterRotationReport(new_version=version, keys_rewrapped=rewrapped, retired_versions=tuple(retired))
        _audit(session, settings, identity, None,
               {"scope": "master", "new_version": report.new_version, "keys_rewrapped": report.keys_rewrapped,
                "retired_versions": list(report.retired_versions)})
    if settings.master_key is None:  # a key file: drop the old versions from it (from settings the operator does)
        try:
            with unit_of_work(url) as session:
                keystore.retire_master_versions(session=session, version=version)
        except KeyboardInterrupt as interrupt:  # still an interrupt, which says the rotation is done
            raise OldMasterVersionsKeptInterrupted(report) from interrupt
        except Exception as exc:
            raise OldMasterVersionsKept(report) from exc
    logger.info("rotated the master key to v%d: %d keys rewrapped, versions %s retired", version, rewrapped, retired)
    return report


def _audit(session: Session, settings: Settings, identity: Identity, department: str | None,
           details: dict[str, Any]) -> None:
    """Record the rotation in the ledger; this commits the session: the rotation's last step and its event at once."""
    audit_service.record_admin_event(session=session, identity=identity, event_type=AdminEventType.key_rotation,
                                     department=department, settings=settings, details=details)
