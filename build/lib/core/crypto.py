"""AES-256-GCM primitives for envelope encryption: wrap keys, seal and open data."""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12


class DecryptionError(Exception):
    """Ciphertext did not authenticate under the given key and context."""


def new_key() -> bytes:
    """A fresh random 256-bit key."""
    return secrets.token_bytes(KEY_BYTES)


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
    return base64.urlsafe_b64encode(seal(key, text.encode(), context)).decode()


def open_text(key: bytes, token: str, context: str) -> str:
    """Inverse of `seal_text`."""
    return open_sealed(key, base64.urlsafe_b64decode(token), context).decode()


def decode_master_key(encoded: str) -> bytes:
    """A master key from its base64 form; exactly 32 bytes."""
    key = base64.b64decode(encoded.strip(), validate=True)
    if len(key) != KEY_BYTES:
        raise ValueError("master key must be 32 bytes (base64-encoded)")
    return key


def load_or_create_master_key_file(path: Path, *, create: bool) -> bytes:
    """Read the master key file, creating it 0600 when allowed (embedded mode only)."""
    if not path.exists():
        if not create:
            raise FileNotFoundError("master key file does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(base64.b64encode(new_key()).decode())
    return decode_master_key(path.read_text())
