"""No key in a repr: a dataclass or NamedTuple repr is what a log line's `%r`, an assertion's message or a traceback's
locals show. `Signer` (audit) showed the checkpoint key, `DocumentKey` (core) a document's data key."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Iterator

import pytest

from audit.integrity import Signer
from core.keystore import DocumentKey, KeyState
from tests.support.project_modules import project_modules

# The packages that hold key material (the key store, the audit checkpoint key, ingestion's document keys) and take
# tokens (authz).
PACKAGES = ("core", "audit", "ingestion", "authz")


def _record_classes() -> Iterator[type]:
    """Every dataclass and NamedTuple defined in PACKAGES."""
    for module in project_modules(PACKAGES):
        for cls in vars(module).values():
            if inspect.isclass(cls) and cls.__module__ == module.__name__ and (
                    dataclasses.is_dataclass(cls) or (issubclass(cls, tuple) and hasattr(cls, "_fields"))):
                yield cls


def _shown_bytes_fields(cls: type) -> list[str]:
    """The fields of `cls` typed to hold bytes or a private key (Ed25519's, the audit signing key) that its repr shows
    (a NamedTuple's repr shows every field)."""
    hints = typing.get_type_hints(cls)
    shown = ([f.name for f in dataclasses.fields(cls) if f.repr] if dataclasses.is_dataclass(cls)
             else list(cls._fields))  # type: ignore[attr-defined]
    return [name for name in shown if any(kind in str(hints.get(name)) for kind in ("bytes", "PrivateKey"))]


def test_no_record_class_shows_bytes_in_its_repr() -> None:
    classes = list(_record_classes())
    assert DocumentKey in classes and Signer in classes  # the scan sees them
    assert {cls.__qualname__: fields for cls in classes if (fields := _shown_bytes_fields(cls))} == {}


@pytest.mark.parametrize("record", [Signer(b"\x01checkpoint-key", "deployment-1"),
                                    DocumentKey(KeyState.opened, b"\x01checkpoint-key")],
                         ids=["signer", "document-key"])
def test_a_record_holding_a_key_leaves_it_out_of_its_repr(record: object) -> None:
    assert "checkpoint-key" not in repr(record)
