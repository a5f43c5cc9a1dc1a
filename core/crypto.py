"""AES-256-GCM primitives for envelope encryption: wrap keys, seal and open data."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from core.errors import making_files_in

KEY_BYTES = 32
NONCE_BYTES = 12


class DecryptionError(Exception):
    """Ciphertext did not authenticate under the given key and context."""


def new_key() -> bytes:
    """A fresh random 256-bit key."""
    return secrets.token_bytes(KEY_BYTES)


def derive_key(secret: bytes, info: bytes) -> bytes:
    """A 256-bit key derived from `secret` for the use `info` names (HKDF-SHA256, no salt)."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def seal(key: bytes, plaintext: bytes, context: str) -> bytes:
    """Encrypt and authenticate; `context` is bound as associated data."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, context.encode())


def open_sealed(key: bytes, sealed: bytes, context: str) -> bytes:
    """Decrypt what `seal` produced under the same key and context."""
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], context.encode())
    except (InvalidTag, ValueError) as exc:
        raise DecryptionError("ciphertext failed authentication") from exc


def seal_text(key: bytes, text: str, context: str) -> str:
    """`seal` for text, as URL-safe base64 for JSON payloads."""
    return seal_blob(key, text.encode(), context)


def open_text(key: bytes, token: str, context: str) -> str:
    """Inverse of `seal_text`."""
    return open_blob(key, token, context).decode()


def seal_blob(key: bytes, data: bytes, context: str) -> str:
    """`seal` for bytes, as URL-safe base64 for JSON payloads."""
    return base64.urlsafe_b64encode(seal(key, data, context)).decode()


def open_blob(key: bytes, token: str, context: str) -> bytes:
    """Inverse of `seal_blob`. A token that is not base64 (an altered payload) fails like a forged one."""
    try:
        sealed = base64.urlsafe_b64decode(token)
    except (ValueError, TypeError) as exc:  # binascii.Error is a ValueError
        raise DecryptionError("ciphertext is not valid base64") from exc
    return open_sealed(key, sealed, context)


def decode_master_key(encoded: str) -> bytes:
    """A master key from its base64 form; exactly 32 bytes."""
    key = base64.b64decode(encoded.strip(), validate=True)
    if len(key) != KEY_BYTES:
        raise ValueError("master key must be 32 bytes (base64-encoded)")
    return key


def decode_key_list(text: str) -> list[bytes]:
    """Keys from comma-separated base64 entries, each of 32 bytes (blank entries skipped)."""
    return [decode_master_key(entry) for entry in text.split(",") if entry.strip()]


def parse_master_keyring(text: str) -> dict[int, bytes]:
    """Master key versions from `v2:<base64>` entries (newline- or comma-separated); a bare key is version 1."""
    ring: dict[int, bytes] = {}
    for entry in (part.strip() for part in text.replace(",", "\n").splitlines()):
        if not entry:
            continue
        label, _, encoded = entry.rpartition(":")
        try:
            version = int(label.removeprefix("v")) if label else 1
        except ValueError:  # int()'s own message would quote the label: with a wrong separator, key material
            raise ValueError("master key entries must be 'v<N>:<base64>'") from None
        if version < 1 or version in ring:
            raise ValueError("master key versions must be distinct positive numbers")
        ring[version] = decode_master_key(encoded)
    if not ring:
        raise ValueError("no master key given")
    return ring


def format_master_keyring(ring: dict[int, bytes]) -> str:
    """The key file form of a keyring: one `v<N>:<base64>` line per version, newest first."""
    return "".join(f"v{version}:{base64.b64encode(ring[version]).decode()}\n" for version in sorted(ring, reverse=True))


def load_or_create_master_keyring(path: Path, *, create: bool) -> dict[int, bytes]:
    """Read the master key file, creating it 0600 when allowed (embedded mode only): durably, as a rotation writes it,
    under the key file's lock (processes starting together all read the one created first), and never over a file
    that exists."""
    if not path.exists():
        if not create:
            raise FileNotFoundError("master key file does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        with master_keyring_lock(path), contextlib.suppress(FileExistsError):  # put there without the lock: read
            if not path.exists():  # another process may have created it while this one waited for the lock
                _write_key_file(path, {1: new_key()}, replace=False)
    return parse_master_keyring(path.read_text())


def write_master_keyring(path: Path, ring: dict[int, bytes]) -> None:
    """Replace the key file atomically: a crash leaves the old or the new ring. The caller holds
    `master_keyring_lock`, so no other process writes the file meanwhile (nor from a ring read before this write)."""
    _write_key_file(path, ring, replace=True)


@contextlib.contextmanager
def master_keyring_lock(path: Path) -> Iterator[None]:
    """Hold the key file's lock (`flock` on `.<name>.lock` beside it, kept there) until the block ends. Every write
    of the key file holds it: creations and rotations (which read the ring and write it back) run one at a time."""
    with making_files_in(path.parent):  # an unwritable folder is said of the folder, not of the hidden lock
        fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_key_file(path: Path, ring: dict[int, bytes], *, replace: bool) -> None:
    """Write the ring to a 0600 temp file and fsync it; rename it over `path` (replace) or link it as `path` (create:
    FileExistsError when `path` exists); fsync the directory. A crash leaves no file, the old one or the new one,
    never a partial one. The caller holds `master_keyring_lock`: no other writer uses the temp file, so one a crashed
    writer left (key material) is removed here."""
    temp = path.with_name(f".{path.name}.tmp")
    with making_files_in(path.parent):  # an unwritable folder is said of the folder, not of the hidden temp file
        temp.unlink(missing_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(format_master_keyring(ring))
            handle.flush()
            os.fsync(handle.fileno())
        (os.replace if replace else os.link)(temp, path)
    finally:
        temp.unlink(missing_ok=True)  # gone already once renamed
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """fsync `folder`: a file renamed or linked into it is there after a power cut, not only its content."""
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
