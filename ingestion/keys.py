"""Key rotation in committed batches, then the old versions retired: department keys (every document key
rewrapped) and the master key (every department key rewrapped). Data keys, ciphertexts and vectors stay."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from authz import service as authz_service
from core.db import unit_of_work
from core.keystore import keystore_for
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


def rotate_department_keys(*, settings: Settings, departments: list[str] | None = None,
                           batch_size: int = BATCH_SIZE) -> list[RotationReport]:
    """Rotate the keys of the given departments (all when None); data keys and vectors are untouched.

    Each stage commits on its own: until the last one, documents open through whichever wrapping is
    newest, so old key versions stay readable while the rotation runs (and a crash can simply re-run).
    """
    with unit_of_work(settings.resolved_database_url) as session:
        known = authz_service.list_departments(session=session)
    chosen = known if departments is None else [d for d in departments if d in known]
    return [_rotate_one(settings, department, batch_size) for department in chosen]


def _rotate_one(settings: Settings, department: str, batch_size: int) -> RotationReport:
    keystore = keystore_for(settings)
    url = settings.resolved_database_url
    with unit_of_work(url) as session:
        version = keystore.begin_rotation(session=session, department=department)
        document_ids = repository.document_ids_with_keys(session, department)
    rewrapped = 0
    for start in range(0, len(document_ids), batch_size):
        with unit_of_work(url) as session:
            rewrapped += keystore.rewrap_documents(session=session, department=department,
                                                   document_ids=document_ids[start:start + batch_size],
                                                   version=version)
    with unit_of_work(url) as session:  # uploads that read the old version meanwhile are rewrapped here
        rewrapped += keystore.finish_rotation(session=session, department=department, version=version)
    logger.info("rotated department key of %s to v%d: %d document keys rewrapped", department, version, rewrapped)
    return RotationReport(department=department, new_version=version, documents_rewrapped=rewrapped)


@dataclass(frozen=True)
class MasterRotationReport:
    """What a master-key rotation did; `retired_versions` are no longer needed by any key."""

    new_version: int
    keys_rewrapped: int
    retired_versions: tuple[int, ...]


def rotate_master_key(*, settings: Settings, batch_size: int = BATCH_SIZE) -> MasterRotationReport:
    """A new master version; department keys (and the audit checkpoint key) rewrapped under it; old versions retired.

    The old version stays in the keyring until every row is rewrapped and committed, so a crash midway leaves
    everything readable; running it again finishes the job under a newer version.
    """
    keystore = keystore_for(settings)
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
        retired = keystore.retire_master_versions(session=session, version=version)
    logger.info("rotated the master key to v%d: %d keys rewrapped, versions %s retired", version, rewrapped, retired)
    return MasterRotationReport(new_version=version, keys_rewrapped=rewrapped, retired_versions=tuple(retired))
