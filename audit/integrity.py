"""Tamper evidence: signed checkpoints, chain verification, and the checkpointed retention purge."""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Row
from sqlalchemy.orm import Session

from audit import repository
from audit.exceptions import MirrorUnreadable
from audit.schemas import EXPORT_FIELDS, LATER_FIELDS, MirrorCheck, VerifyResult
from core import crypto, metrics
from core.db import unit_of_work
from core.errors import ErrorCode, GovragError
from core.files import regular_file_opener
from core.keystore import keystore_for
from core.models import AuditCheckpoint, Deployment, RetrievalEvent, utcnow
from core.settings import Settings

logger = logging.getLogger(__name__)

_EMPTY: tuple[Any, ...] = (None, [], {})


def event_hash(event: RetrievalEvent | Row[Any], encoding: str = "utf-8") -> str:
    """SHA-256 over the previous hash and the event's canonical content, as UTF-8. `encoding`: "latin-1" for an event
    whose strings were read from UTF-8 bytes as Latin-1, a character a byte (an export's row, audit.export), which
    gives those bytes back: the canonical JSON escapes ASCII characters alone and sorts keys as UTF-8 bytes sort."""
    content = {name: plain(getattr(event, name)) for name in EXPORT_FIELDS if name not in ("id", "hash")}
    for name in LATER_FIELDS:
        if content.get(name) in _EMPTY:
            del content[name]
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode(encoding)).hexdigest()


def plain(value: Any) -> Any:
    """A JSON-ready value; datetimes in one canonical UTC form, whatever the database hands back."""
    if isinstance(value, datetime):
        utc = value.astimezone(UTC) if value.tzinfo else value
        return utc.replace(tzinfo=None).isoformat() + "Z"
    if hasattr(value, "value"):
        return value.value
    return value


def checkpoint_key(settings: Settings, session: Session | None = None) -> bytes:
    """The HMAC key: configured, or the key store's (derived from the master key, kept wrapped once it rotates)."""
    if settings.audit_checkpoint_key is not None:
        return crypto.decode_master_key(settings.audit_checkpoint_key.get_secret_value())
    if session is not None:
        return keystore_for(settings).checkpoint_key(session=session)
    with unit_of_work(settings.resolved_database_url) as own:
        return keystore_for(settings).checkpoint_key(session=own)


# The Ed25519 key signing beside the HMAC: derived from the checkpoint key with a label of its own, so it follows that
# key wherever it comes from (configured, or the master key's, kept wrapped across master rotations): nothing to store.
_SIGNING_HKDF_INFO = b"govrag audit signing ed25519 v1"
HMAC_SHA256, ED25519 = "hmac-sha256", "ed25519"  # the signatures an export check names as verified
_V2 = "v2."  # the prefix of a checkpoint signature that binds the deployment id (base64url has no ".")
# The prefix of a checkpoint signature over the v3 statement, which also names the Ed25519 key: a v3 checkpoint carries
# an Ed25519 signature over that statement beside it (migration 0019), so one whose Ed25519 signature was removed fails
# (its HMAC signs v3: it cannot be passed off as a v2 checkpoint, signed before there were any, without the key).
_V3 = "v3."
_MANIFEST_V1 = "v1."
# How long after migration 0016 an unprefixed (v1) checkpoint still verifies: the previous release's API processes go
# on serving, and signing v1, until readiness (SCHEMA_CHECK_SECONDS) has them drained; one they sign then is no forgery.
# Likewise how long after the earliest Ed25519-signed mirror line the public key takes an HMAC-only one (0019).
LEGACY_GRACE = timedelta(hours=1)


@dataclass(frozen=True)
class Signer:
    """What every signature binds: the checkpoint key (never in its repr) and this deployment's id."""

    key: bytes = field(repr=False)
    deployment_id: str

    def signing_key(self) -> Ed25519PrivateKey:
        """The Ed25519 key derived from the checkpoint key (its repr shows no key bytes)."""
        return self._derived_signing_key

    @cached_property
    def _derived_signing_key(self) -> Ed25519PrivateKey:
        """Derived (HKDF) once per Signer, at its first signature or check, then reused."""
        return Ed25519PrivateKey.from_private_bytes(crypto.derive_key(self.key, _SIGNING_HKDF_INFO))

    def public_key(self) -> Ed25519PublicKey:
        """What checks this deployment's Ed25519 signatures: published, never able to sign."""
        return self.signing_key().public_key()


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short name of a public key: the first 16 hex digits of SHA-256 over its 32 raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    """The public key as PEM (SubjectPublicKeyInfo), as `openssl pkey -pubin` reads it."""
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from its PEM; ValueError for anything else."""
    public_key = serialization.load_pem_public_key(pem)
    if not isinstance(public_key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return public_key


def load_public_keys(pem: bytes) -> list[Ed25519PublicKey]:
    """Every Ed25519 public key in a PEM file, in its order (`govrag audit public-key --all` writes several, the
    current one first); ValueError when it holds no PEM block, a BEGIN line its END does not follow (a file cut
    short), or a block that is no Ed25519 public key."""
    markers = list(_PEM_MARKER.finditer(pem))  # one pass: a block is read between its own two markers
    pairs = list(zip(markers[::2], markers[1::2], strict=False))
    if not markers or len(markers) % 2 or any((begin[1], end[1], begin[2]) != (b"BEGIN", b"END", end[2])
                                               for begin, end in pairs):
        raise ValueError("no PEM block, or one not closed by its END line")
    return [load_public_key(pem[begin.start():end.end()]) for begin, end in pairs]


_PEM_MARKER = re.compile(rb"-----(BEGIN|END) ([A-Z0-9 ]+)-----")


def signer_for(settings: Settings, session: Session) -> Signer:
    """The checkpoint key and the deployment id the database records."""
    return Signer(checkpoint_key(settings, session), _deployment(session).deployment_id)


def _deployment(session: Session) -> Deployment:
    deployment = repository.deployment(session)
    if deployment is None:
        raise GovragError(ErrorCode.internal, "the database records no deployment id (migration 0016 mints it; "
                                              "put its row back as docs/audit.md says): nothing can be signed or "
                                              "checked")
    return deployment


def _utc(moment: datetime) -> datetime:
    """An aware UTC time, whatever the database or the mirror line handed back (SQLite: naive UTC)."""
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def _statement(checkpoint: AuditCheckpoint, deployment_id: str | None, signing_key_id: str | None = None) -> bytes:
    """v3 (a `signing_key_id`): the chain's position in this deployment, signed by that Ed25519 key too; v2: in this
    deployment; None: v1, as signed before the deployment id (migration 0016)."""
    stamp = _utc(checkpoint.created_at).replace(tzinfo=None).isoformat()
    head = ("govrag-checkpoint" if deployment_id is None else f"govrag-checkpoint|v2|{deployment_id}"
            if signing_key_id is None else f"govrag-checkpoint|v3|{deployment_id}|{signing_key_id}")
    fields = (checkpoint.kind, checkpoint.last_event_id, checkpoint.last_hash, checkpoint.event_count, stamp)
    return "|".join([head, *map(str, fields)]).encode()


def _mac(key: bytes, statement: bytes) -> str:
    return base64.urlsafe_b64encode(hmac.new(key, statement, hashlib.sha256).digest()).decode()


def sign(signer: Signer, checkpoint: AuditCheckpoint) -> tuple[str, str]:
    """The checkpoint's two signatures over its v3 statement, which names the deployment and the Ed25519 key id:
    HMAC-SHA256 with the checkpoint key (prefixed `v3.`), and Ed25519 (base64), which the public key checks alone."""
    signing_key = signer.signing_key()
    statement = _statement(checkpoint, signer.deployment_id, key_id(signing_key.public_key()))
    return _V3 + _mac(signer.key, statement), base64.b64encode(signing_key.sign(statement)).decode()


def _ed25519_holds(public_key: Ed25519PublicKey, deployment_id: str, checkpoint: AuditCheckpoint) -> bool:
    """Whether the checkpoint's Ed25519 signature is `public_key`'s over its v3 statement in `deployment_id`."""
    statement = _statement(checkpoint, deployment_id, key_id(public_key))
    return _ed25519_signed(public_key, statement, checkpoint.signature_ed25519)


def _same(expected: str, given: object) -> bool:
    """Constant-time equality of a signature computed and one read back (a mirror line or an export file may hold
    anything there: hmac.compare_digest raises on a non-ASCII str)."""
    return isinstance(given, str) and given.isascii() and hmac.compare_digest(expected, given)


def _signed_here(signer: Signer, public_key: Ed25519PublicKey, checkpoint: AuditCheckpoint,
                 minted_at: datetime) -> bool:
    """The signatures are this deployment's: a v3 one with its Ed25519 signature beside it (`public_key`: the
    signer's), which only a v3 one carries; a v2 one alone (signed before 0019); an unprefixed (v1) one only if signed
    before the deployment id was minted (or within LEGACY_GRACE after): a deployment sharing the key that still signs
    v1 cannot pass a checkpoint of its own off as this one's."""
    if checkpoint.signature.startswith(_V3) or checkpoint.signature_ed25519 is not None:
        statement = _statement(checkpoint, signer.deployment_id, key_id(public_key))
        return (_same(_V3 + _mac(signer.key, statement), checkpoint.signature)
                and _ed25519_holds(public_key, signer.deployment_id, checkpoint))
    if checkpoint.signature.startswith(_V2):
        return _same(_V2 + _mac(signer.key, _statement(checkpoint, signer.deployment_id)), checkpoint.signature)
    return _utc(checkpoint.created_at) <= _utc(minted_at) + LEGACY_GRACE and _same(
        _mac(signer.key, _statement(checkpoint, None)), checkpoint.signature)


def _manifest_statement(manifest: dict[str, Any]) -> bytes:
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"govrag-export-manifest|v1|{canonical}".encode()


def sign_manifest(signer: Signer, manifest: dict[str, Any]) -> dict[str, str]:
    """The manifest's signature fields: `signature`, HMAC-SHA256 with the checkpoint key over its canonical JSON (which
    holds the deployment and key ids); `signature_ed25519` over the same statement with `signature` in it, so that the
    public key alone covers every field."""
    signed = {"signature": _MANIFEST_V1 + _mac(signer.key, _manifest_statement(manifest))}
    ed25519 = signer.signing_key().sign(_manifest_statement(manifest | signed))
    return signed | {"signature_ed25519": base64.b64encode(ed25519).decode()}


def manifest_signatures(by: Signer | Ed25519PublicKey, manifest: dict[str, Any]) -> list[str] | None:
    """The signatures of `manifest` (its `signature` a string) that `by` verified: with the checkpoint key (a Signer)
    each it carries, with the public key the Ed25519 one only ([]: an export from before Ed25519, the HMAC alone);
    None when one fails."""
    ed25519_signed = {name: value for name, value in manifest.items() if name != "signature_ed25519"}
    verified: list[str] = []
    try:
        if isinstance(by, Signer):
            hmac_signed = {name: value for name, value in ed25519_signed.items() if name != "signature"}
            if not _same(_MANIFEST_V1 + _mac(by.key, _manifest_statement(hmac_signed)), manifest["signature"]):
                return None
            verified.append(HMAC_SHA256)
        if "signature_ed25519" in manifest:
            public_key = by.public_key() if isinstance(by, Signer) else by
            if not _ed25519_signed(public_key, _manifest_statement(ed25519_signed), manifest["signature_ed25519"]):
                return None
            verified.append(ED25519)
    except (UnicodeEncodeError, RecursionError):  # a lone surrogate (JSON spells one: \ud800), or nesting no
        return None  # export writes: no signed manifest holds either
    return verified


def _ed25519_signed(public_key: Ed25519PublicKey, statement: bytes, signature: object) -> bool:
    """Whether `signature` (base64, as written: no other spelling of the same bytes) is `public_key`'s over
    `statement`."""
    if not isinstance(signature, str) or not signature.isascii():
        return False
    try:
        raw = base64.b64decode(signature, validate=True)
        public_key.verify(raw, statement)
    except (ValueError, InvalidSignature):  # binascii.Error is a ValueError
        return False
    return base64.b64encode(raw).decode() == signature


def make_checkpoint(*, session: Session, settings: Settings, event: RetrievalEvent, kind: str = "periodic",
                    event_count: int = 0) -> AuditCheckpoint:
    """Sign "this deployment's chain reached `event`" and store it (the caller holds the chain lock and commits)."""
    checkpoint = AuditCheckpoint(created_at=utcnow().replace(microsecond=0), kind=kind, last_event_id=event.id,
                                 last_hash=event.hash, event_count=event_count)
    checkpoint.signature, checkpoint.signature_ed25519 = sign(signer_for(settings, session), checkpoint)
    repository.add_checkpoint(session, checkpoint)
    return checkpoint


def mirror_checkpoint(settings: Settings, checkpoint: AuditCheckpoint) -> None:
    """Append the committed checkpoint to the mirror file, so deleting DB checkpoints is not enough to hide a cut.
    Each line is written under an exclusive flock: API processes sharing a mirror on a network mount (where appends
    are not atomic) would otherwise mix their lines into one no verification can read."""
    path = settings.resolved_checkpoint_file
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # opened once; a named pipe there is refused (NotARegularFile), not waited on for a reader
        with open(path, "a", encoding="utf-8", opener=regular_file_opener) as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
            handle.write(json.dumps(_as_json(checkpoint)) + "\n")
    except Exception as exc:  # committed already: whatever fails here must not fail what was recorded
        metrics.AUDIT_MIRROR_WRITE_FAILURES.inc()
        logger.warning("could not append to the audit checkpoint mirror file (%s): the checkpoint at event %d is in "
                       "the database only", type(exc).__name__, checkpoint.last_event_id)  # never the path


def checkpoint_now(*, session: Session, settings: Settings) -> tuple[int | None, bool]:
    """A manual checkpoint at the current end of the chain: (the end's event id, None when the ledger is empty;
    whether one was signed). None is signed when the newest checkpoint covers the end already: run from cron, a
    quiet ledger would otherwise grow a checkpoint row and a mirror line, each held by every verification, each run."""
    with repository.local_chain_lock():
        repository.lock_chain(session)
        last = repository.last_event(session)
        if last is None or (last.id == repository.checkpointed_through(session)
                            and _anchored_with_current_key(session, settings, last.id)):
            end = last.id if last else None
            session.rollback()
            return end, False
        checkpoint = make_checkpoint(session=session, settings=settings, event=last, kind="manual")
        session.commit()
    mirror_checkpoint(settings, checkpoint)
    return checkpoint.last_event_id, True


def _anchored_with_current_key(session: Session, settings: Settings, event_id: int) -> bool:
    """Whether a stored checkpoint at `event_id` is signed with the current checkpoint key: after a rotation the end
    is checkpointed again, with the new key, though a checkpoint the previous key signed covers it."""
    signer = signer_for(settings, session)
    minted_at = _deployment(session).minted_at
    return any(_signed_here(signer, signer.public_key(), checkpoint, minted_at)
               for checkpoint in repository.checkpoints_at(session, event_id))


def _as_json(checkpoint: AuditCheckpoint) -> dict[str, object]:
    line: dict[str, object] = {
        "created_at": _utc(checkpoint.created_at).isoformat(), "kind": checkpoint.kind,
        "last_event_id": checkpoint.last_event_id, "last_hash": checkpoint.last_hash,
        "event_count": checkpoint.event_count, "signature": checkpoint.signature}
    if checkpoint.signature_ed25519 is not None:
        line["signature_ed25519"] = checkpoint.signature_ed25519
    return line


LONGEST_MIRROR_LINE = 4096  # bytes, its newline included: about ten times the longest line `mirror_checkpoint` writes
# The type of each field a mirror line must hold (exactly: JSON's `true` is no integer, `5.0` or "5" no event id).
_LINE_FIELDS: dict[str, type] = {"kind": str, "last_event_id": int, "last_hash": str, "event_count": int,
                                 "signature": str}


def mirror_lines(mirror: BinaryIO) -> Iterator[bytes]:
    """The lines of a mirror file, each read with a bound: a line longer than LONGEST_MIRROR_LINE (cut, or no writer
    of govrag's wrote it: a huge or newline-free file) is given as its first LONGEST_MIRROR_LINE + 1 bytes, which read
    as no checkpoint, and is the last: neither the rest of it nor of the file is read."""
    while line := mirror.readline(LONGEST_MIRROR_LINE + 1):
        yield line
        if len(line) > LONGEST_MIRROR_LINE:
            return


def _numbered(lines: Iterable[str | bytes]) -> list[tuple[int, AuditCheckpoint | None]]:
    """Each line of a mirror file that is not blank, with its number (blank lines counted), read as a checkpoint (None:
    no checkpoint a writer wrote; a line longer than any it writes is one, however blank)."""
    return [(number, _from_json(line)) for number, line in enumerate(lines, 1)
            if len(line) > LONGEST_MIRROR_LINE or line.strip()]


def _from_json(line: str | bytes) -> AuditCheckpoint | None:
    if len(line) > LONGEST_MIRROR_LINE:
        return None
    try:
        data = json.loads(line, parse_int=_canonical_int)
        if not all(type(data[name]) is kind for name, kind in _LINE_FIELDS.items()) or not isinstance(
                data.get("signature_ed25519", ""), str):
            return None  # read as unsigned, as an unparsable line is
        return AuditCheckpoint(created_at=_utc(datetime.fromisoformat(data["created_at"])), kind=data["kind"],
                               last_event_id=data["last_event_id"], last_hash=data["last_hash"],
                               event_count=data["event_count"], signature=data["signature"],
                               signature_ed25519=data.get("signature_ed25519"))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError):  # a line no writer
        return None  # wrote (OverflowError: a date no UTC time is, "9999-12-31T23:59:59-01:00")


def _canonical_int(spelt: str) -> int:
    """A JSON integer as json.dumps writes it, the only spelling the line was signed in: JSON refuses "+5", "05" and
    "1_000" already, this "-0" too."""
    number = int(spelt)
    if str(number) != spelt:
        raise ValueError("an integer not in its canonical form")
    return number


def _mirrored(path: Path) -> tuple[list[AuditCheckpoint], int | None]:
    """The mirror file's checkpoints, and the number of its first line that reads as none (None: each reads as one),
    numbered as verify-mirror numbers them: read as bytes, blank lines counted. None is a file that is not there;
    anything there but a regular file it may read (a named pipe, never waited on; a folder; no permission) is
    MirrorUnreadable."""
    try:
        handle = open(path, "rb", opener=regular_file_opener)  # closed below: opened once, no exists() first
    except (FileNotFoundError, NotADirectoryError):  # a folder on the way that is a file: no mirror there either
        return [], None
    except OSError as error:
        raise MirrorUnreadable(error.errno, error.strerror or type(error).__name__, str(path)) from error
    with handle:
        read = _numbered(mirror_lines(handle))
    unreadable = next((number for number, checkpoint in read if checkpoint is None), None)
    return [checkpoint for _, checkpoint in read if checkpoint is not None], unreadable


def check_mirror(lines: Iterable[str | bytes], *, public_keys: Sequence[Ed25519PublicKey],
                 deployment_id: str) -> MirrorCheck:
    """Whether the lines of a checkpoint mirror file are checkpoints of deployment `deployment_id` as signed, with
    Ed25519 public keys alone (the current one first, then any used before a rotation; the report names the first):
    each line carrying an Ed25519 signature must hold under one of them (its HMAC `v3.`), and no two
    of them may give one event two hashes. A line without one is taken, unchecked (`hmac_only`), only as a checkpoint
    signed before the deployment signed with Ed25519 too: HMAC v1 or v2, written no later than LEGACY_GRACE after the
    earliest line signed with Ed25519 (the previous release's processes sign HMAC only until they are drained), by its
    own date and by the dates of the lines signed with Ed25519 above it in the file (see `_downgrade`).
    `first_broken` is the earliest line found broken, whichever check found it."""
    read = _numbered(lines)
    found = MirrorCheck(ok=True, lines=len(read), deployment_id=deployment_id, key_id=key_id(public_keys[0]))
    if not read:
        return _mirror_broken(found, None, "mirror_empty", "the file holds no checkpoint")
    broken: list[tuple[int, str, str]] = []  # (line number, reason, message)
    signed_now = [checkpoint is not None and checkpoint.signature_ed25519 is not None
                  and _ed25519_holds(public_keys[0], deployment_id, checkpoint) for _, checkpoint in read]
    # a previous key's lines are taken through the newest event a line of the current key anchors, as `verify` takes
    # its checkpoints: the leaked key cannot vouch for an event past it
    rotated_through = _rotated_through([checkpoint for _, checkpoint in read], signed_now)
    at: dict[int, str] = {}
    earliest_signed: datetime | None = None  # the dates of the lines whose Ed25519 signature holds, so far
    newest_signed: datetime | None = None
    hmac_only: list[tuple[int, datetime, datetime | None]] = []  # (line, its date, the newest signed date above it)
    for (number, checkpoint), now in zip(read, signed_now, strict=True):
        in_time = checkpoint is not None and checkpoint.last_event_id <= rotated_through
        previous_keys = public_keys[1:] if in_time else []
        if (problem := _mirror_line_problem(checkpoint, now, previous_keys, deployment_id, at)) is not None:
            broken.append((number, *problem))
        elif checkpoint is not None and checkpoint.signature_ed25519 is not None:
            found.checked += 1
            dated = _utc(checkpoint.created_at)
            earliest_signed, newest_signed = min(earliest_signed or dated, dated), max(newest_signed or dated, dated)
        elif checkpoint is not None:
            hmac_only.append((number, _utc(checkpoint.created_at), newest_signed))
    drained_by = None if earliest_signed is None else earliest_signed + LEGACY_GRACE
    for number, dated, signed_above in hmac_only:
        if drained_by is not None and (message := _downgrade(dated, signed_above, drained_by)) is not None:
            broken.append((number, "ed25519_signature_missing", message))
        else:
            found.hmac_only += 1
    if broken:
        return _mirror_broken(found, *min(broken))
    if drained_by is None:
        return _mirror_broken(found, None, "ed25519_signature_missing", "no line carries an Ed25519 signature "
                              "(checkpoints signed before they were added): only the checkpoint key checks them")
    found.through_event_id = max(at)
    return found


def _downgrade(dated: datetime, signed_above: datetime | None, drained_by: datetime) -> str | None:
    """Why an HMAC-only mirror line (dated `dated`; `signed_above`: the newest date of the lines signed with Ed25519
    above it in the file) cannot be one the previous release signed before it was drained (`drained_by`), None when it
    can. Lines are appended as they are signed: one below a line signed after the drain was appended after it too,
    whatever date it gives itself (unsigned, to the public key). A v2 line above every signed line, or below those
    signed while the previous release still ran, is the deployment's own."""
    if dated > drained_by:
        return "the checkpoint's Ed25519 signature was removed: it is dated after the deployment signed them"
    if signed_above is not None and signed_above > drained_by:
        return ("the checkpoint's Ed25519 signature was removed: it follows a line signed with Ed25519 after the "
                "previous release was drained, and no release signs HMAC only since")
    return None


def _mirror_line_problem(checkpoint: AuditCheckpoint | None, signed_now: bool,
                         previous_keys: Sequence[Ed25519PublicKey], deployment_id: str,
                         at: dict[int, str]) -> tuple[str, str] | None:
    """What is wrong with one mirror line, as the public keys tell it (reason, message); None for a line whose Ed25519
    signature holds, under the current key (`signed_now`) or one of `previous_keys` (those the line may be signed
    with: none past the current key's lines), its event's hash then kept in `at`, or one signed with HMAC alone (its
    date checked once all are read)."""
    if checkpoint is None:
        return "line_unreadable", "the line is no checkpoint a writer wrote"
    if checkpoint.signature_ed25519 is None:
        return ("ed25519_signature_missing", "the checkpoint's Ed25519 signature was removed") if (
            checkpoint.signature.startswith(_V3)) else None
    if not checkpoint.signature.startswith(_V3) or not (signed_now or any(
            _ed25519_holds(public_key, deployment_id, checkpoint) for public_key in previous_keys)):
        return "checkpoint_signature_invalid", ("the checkpoint was edited, or signed by another deployment or key (a "
                                                "previous key only up to the current key's lines)")
    if at.setdefault(checkpoint.last_event_id, checkpoint.last_hash) != checkpoint.last_hash:
        return "checkpoint_conflict", f"an earlier line gives event {checkpoint.last_event_id} another hash"
    return None


def _mirror_broken(found: MirrorCheck, line: int | None, reason: str, message: str) -> MirrorCheck:
    return found.model_copy(update={"ok": False, "first_broken": line, "reason": reason, "message": message})


@dataclass
class _Expectations:
    """What the signed checkpoints say the chain must contain."""

    purged_through: int = 0
    anchor: str = repository.GENESIS_HASH
    at: dict[int, str] = field(default_factory=dict)  # event id -> hash it must have
    checked: int = 0
    bad_signature: int | None = None  # the lowest event a checkpoint whose signature fails names
    unreadable_line: int | None = None  # the first mirror line that reads as no checkpoint: it names no event
    conflict: int | None = None  # the first event accepted checkpoints give two hashes
    unrecorded_purge: int | None = None  # the newest purge, signed by a previous key alone, when no event records it
    deployment_id: str | None = None

    def failure(self) -> tuple[int, str] | None:
        """What the checkpoints alone show wrong: (the lowest event, its reason), None when nothing."""
        found = [(event_id, reason) for event_id, reason in ((self.bad_signature, "checkpoint_signature_invalid"),
                                                             (self.conflict, "checkpoint_conflict"),
                                                             (self.unrecorded_purge, "purge_unrecorded"))
                 if event_id is not None]
        return min(found, key=lambda failed: failed[0], default=None)


def _expectations(session: Session, settings: Settings) -> _Expectations:
    deployment = _deployment(session)
    signer = Signer(checkpoint_key(settings, session), deployment.deployment_id)
    public_key = signer.public_key()
    found = _Expectations(deployment_id=deployment.deployment_id)
    mirrored, found.unreadable_line = _mirrored(settings.resolved_checkpoint_file)
    candidates = [*repository.checkpoints(session), *mirrored]
    signed_now = [_signed_here(signer, public_key, checkpoint, deployment.minted_at) for checkpoint in candidates]
    # a previous key's checkpoints are taken through the newest event the current key anchors (a leaked previous
    # key cannot sign a purge, or anything, past it)
    rotated_through = _rotated_through(candidates, signed_now)
    previous = previous_signers(settings, deployment.deployment_id)
    purged_now: set[int] = set()  # the events the current key signed a purge at
    given: dict[int, set[str]] = {}  # event id -> the hashes the checkpoints taken give it
    unsigned: list[int] = []  # the events the checkpoints whose signatures fail name
    for checkpoint, now in zip(candidates, signed_now, strict=True):
        if not (now or (checkpoint.last_event_id <= rotated_through and any(
                _signed_here(old, old.public_key(), checkpoint, deployment.minted_at) for old in previous))):
            unsigned.append(checkpoint.last_event_id)
            continue
        found.checked += 1
        if checkpoint.kind == "purge" and now:
            purged_now.add(checkpoint.last_event_id)
        if checkpoint.kind == "purge" and checkpoint.last_event_id > found.purged_through:
            found.purged_through, found.anchor = checkpoint.last_event_id, checkpoint.last_hash
        found.at[checkpoint.last_event_id] = checkpoint.last_hash
        given.setdefault(checkpoint.last_event_id, set()).add(checkpoint.last_hash)
    found.bad_signature = min(unsigned, default=None)
    found.conflict = _first_conflict(given)
    if found.purged_through and not _purge_recorded(session, found.purged_through,
                                                    found.purged_through in purged_now, rotated_through):
        found.unrecorded_purge = found.purged_through
    found.at = {event_id: h for event_id, h in found.at.items() if event_id > found.purged_through}
    return found


def _rotated_through(checkpoints: Sequence[AuditCheckpoint | None], signed_now: Sequence[bool]) -> int:
    """The newest event a checkpoint signed with the current key anchors (`signed_now`, one flag per checkpoint): a
    previous key is taken only up to it. 0 when the current key signed none."""
    return max((checkpoint.last_event_id for checkpoint, now in zip(checkpoints, signed_now, strict=True)
                if now and checkpoint is not None), default=0)


def _first_conflict(given: dict[int, set[str]]) -> int | None:
    """The first event the accepted checkpoints (database rows and mirror lines) give more than one hash, None when
    they agree: the walk holds one hash per event, so one that disagreed with the row went unseen when another matched
    it, and an event at or before the newest purge has no row left to tell either."""
    return min((event_id for event_id, hashes in given.items() if len(hashes) > 1), default=None)


def _purge_recorded(session: Session, purged_through: int, signed_now: bool, rotated_through: int) -> bool:
    """Whether the newest purge is one the ledger made: signed with the current key, or, when a previous key alone
    signed it, its `retention_purge` event lies between it and the newest event the current key anchors (which pins
    that event through the chain). Whoever holds the leaked key could otherwise sign a purge at an earlier event, or at
    a purged one for a row given its id, and delete the rows up to it; a purge an outage cut short before its event
    (before purges were made in one transaction) is told the same way: its signature holds, no event records it."""
    return signed_now or repository.purge_recorded(session, purged_through, up_to=rotated_through)


def previous_signers(settings: Settings, deployment_id: str) -> list[Signer]:
    """The checkpoint keys used before the current one (GOVRAG_AUDIT_CHECKPOINT_PREVIOUS_KEYS), to check only."""
    keys = settings.audit_checkpoint_previous_keys
    return [] if keys is None else [Signer(key, deployment_id)
                                    for key in crypto.decode_key_list(keys.get_secret_value())]


def verify(*, session: Session, settings: Settings, deployment_id: str | None = None) -> VerifyResult:
    """Walk the chain from genesis (or the last signed purge) and check every row and checkpoint; `deployment_id`: the
    deployment the database must be (the id recorded: a database writer can set the row to another's). A failure
    names the lowest event found broken, by the checkpoints or by the walk (the checkpoints' reason on a tie); a
    mirror line that reads as no checkpoint names no event: it is said first, by its line number."""
    expect = _expectations(session, settings)
    result = VerifyResult(ok=True, checked=0, checkpoints_checked=expect.checked,
                          purged_through=expect.purged_through or None, deployment_id=expect.deployment_id)
    if deployment_id is not None and deployment_id != expect.deployment_id:
        return result.model_copy(update={"ok": False, "reason": "other_deployment"})
    if expect.unreadable_line is not None:  # names no event: said first
        return result.model_copy(update={"ok": False, "reason": "mirror_line_unreadable",
                                         "mirror_line": expect.unreadable_line})
    failures = [failure for failure in (expect.failure(), _walk(session, expect, result)) if failure is not None]
    return _broken(result, *min(failures, key=lambda failed: failed[0])) if failures else result


def _walk(session: Session, expect: _Expectations, result: VerifyResult) -> tuple[int, str] | None:
    """The first row that fails, as (its event id, the reason), None when none does: each link, each hash and each
    checkpointed hash, in id order past the newest signed purge; the rows that pass are counted in `result`."""
    lowest = repository.min_event_id(session)
    # rows where no row may be (the walk starts past the newest purge); below a purge no event records they are what
    # that purge does not account for: the purge failed (`purge_unrecorded`), not they
    if lowest is not None and lowest <= expect.purged_through and expect.unrecorded_purge is None:
        return lowest, "chain_link_broken"
    previous, anchored_through = expect.anchor, max(expect.at, default=expect.purged_through)
    for event in repository.iter_chain(session, after_id=expect.purged_through):
        if event.prev_hash != previous:
            return event.id, "chain_link_broken"
        if event_hash(event) != event.hash:
            return event.id, "content_changed"
        if expect.at.pop(event.id, event.hash) != event.hash:
            return event.id, "checkpoint_mismatch"
        previous = event.hash
        result.checked += 1
        if event.id > anchored_through:
            result.unanchored += 1
    return (min(expect.at), "checkpointed_rows_missing") if expect.at else None


def _broken(result: VerifyResult, event_id: int, reason: str) -> VerifyResult:
    return result.model_copy(update={"ok": False, "first_broken": event_id, "reason": reason})


def purge_checkpoint(*, session: Session, settings: Settings, now: datetime | None = None) -> AuditCheckpoint | None:
    """Retention: lock the chain and sign a purge checkpoint at the last expired row (its `event_count` the rows
    through it); None when nothing has expired. Uncommitted: the caller (audit.service.purge_expired) holds
    `local_chain_lock`, records the purge, deletes through the row, commits, and only then mirrors the checkpoint."""
    if settings.audit_retention_days is None:
        return None
    cutoff = (now or utcnow()) - timedelta(days=settings.audit_retention_days)
    repository.lock_chain(session)
    last_expired = repository.last_event_before(session, cutoff)
    if last_expired is None:
        session.rollback()
        return None
    return make_checkpoint(session=session, settings=settings, event=last_expired, kind="purge",
                           event_count=repository.count_through(session, last_expired.id))
