"""`unavailable_dependency`: the one way to ask whether a failure is an outage, and of which dependency."""

from __future__ import annotations

import zipfile

import pytest
from safetensors import SafetensorError
from sqlalchemy.exc import OperationalError

from core.errors import (
    BrokenInstall,
    ErrorCode,
    GovragError,
    Unavailable,
    loading,
    reading_tokenizer,
    unavailable_dependency,
)


def _raised(failure: BaseException, cause: BaseException | None) -> BaseException:
    """`failure` as `raise failure from cause` leaves it."""
    try:
        raise failure from cause
    except BaseException as caught:  # noqa: BLE001 - handed back to the test
        return caught


def _database_down() -> OperationalError:
    return OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))


def _audit_unavailable(cause: BaseException) -> BaseException:
    """What the audit log raises when an event cannot be written (audit.service: `raise ... from exc`)."""
    return _raised(GovragError(ErrorCode.unavailable, "the audit log is unavailable"), cause)


def test_a_failure_raised_from_an_outage_names_the_dependency() -> None:
    """The audit log's `unavailable`, raised from the database going as the event was written, was no outage to
    anyone asking `unavailable_dependency` (only the key rotation CLI looked behind it, with a helper of its own);
    it now names the database, as deep as the explicit causes go."""
    assert unavailable_dependency(_audit_unavailable(_database_down())) == "database"
    kept = _raised(RuntimeError("old versions kept"), _audit_unavailable(Unavailable("vector store")))
    assert unavailable_dependency(kept) == "vector store"


def test_a_failure_raised_from_anything_else_or_while_handling_an_outage_is_none() -> None:
    assert unavailable_dependency(_audit_unavailable(ValueError("cannot hash the event"))) is None
    assert unavailable_dependency(_raised(RuntimeError("no cause"), None)) is None
    with pytest.raises(RuntimeError) as during:
        try:
            raise _database_down()
        except OperationalError:
            raise RuntimeError("a bug in the cleanup")  # noqa: B904 - its context, not its cause
    assert during.value.__context__ is not None and unavailable_dependency(during.value) is None


def test_a_cause_chain_made_into_a_loop_ends() -> None:
    first, second = RuntimeError("first"), RuntimeError("second")
    first.__cause__, second.__cause__ = second, first
    assert unavailable_dependency(first) is None


def _loaded(what: str, failure: Exception) -> BaseException:
    """What `loading(what)` lets out when the load inside it raises `failure`."""
    try:
        with loading(what):
            raise failure
    except BaseException as raised:  # noqa: BLE001 - handed back to the test
        return raised
    raise AssertionError("loading swallowed the failure")


@pytest.mark.parametrize("bug", [TypeError("takes 2 arguments"), AttributeError("no attribute 'coef'"),
                                 NameError("np"), AssertionError()], ids=lambda bug: type(bug).__name__)
def test_a_bug_in_a_load_is_no_broken_install(bug: Exception) -> None:
    """`loading` took any Exception for a broken install: a programming error said "reinstall govrag", which cannot
    fix it. Only what a file or library that does not load raises is one now."""
    assert _loaded("the PII model", bug) is bug


@pytest.mark.parametrize(("failure", "reason"), [
    (FileNotFoundError(2, "No such file or directory", "/x/scanner_weights.npz"),
     "No such file or directory on /x/scanner_weights.npz"),
    (ValueError("Cannot load file containing pickled data"), "ValueError"),
    (zipfile.BadZipFile("File is not a zip file"), "BadZipFile"),
    (KeyError("coef"), "KeyError"),
    (ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime"), "ModuleNotFoundError (onnxruntime)"),
    (SafetensorError("Error while deserializing header"), "SafetensorError"),
], ids=lambda value: type(value).__name__ if isinstance(value, Exception) else "")
def test_what_a_file_or_library_that_does_not_load_raises_is_a_broken_install(failure: Exception,
                                                                                reason: str) -> None:
    raised = _loaded("the embedding model", failure)
    assert isinstance(raised, BrokenInstall) and raised.__cause__ is failure
    assert str(raised).startswith(f"cannot load the embedding model: {reason}; the install is broken")


def test_a_bare_exception_is_a_broken_install_only_from_a_tokenizer_load() -> None:
    """tokenizers refuses a garbled tokenizer.json with a bare Exception: `loading` took one from any load for a
    broken install, the PII model's or the scanner's too, where it is no refusal of a file. Only inside
    `reading_tokenizer` is it one."""
    bare = Exception("raised by a library for no file of ours")
    assert _loaded("the PII model", bare) is bare
    with pytest.raises(BrokenInstall, match=r"^cannot load the embedding model: ValueError; the install is broken"):
        with loading("the embedding model"), reading_tokenizer():
            raise Exception("expected value at line 1 column 1")  # what tokenizers raises
    with pytest.raises(TypeError), reading_tokenizer():
        raise TypeError("a bug stays one")
