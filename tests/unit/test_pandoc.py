"""ODT, RTF and EPUB go through pandoc: a conversion past the parse time limit is killed with its session, and its
heap is capped, so a hostile file cannot leave pandoc running on after its document has failed. Every refusal names
the format uploaded, a missing pandoc included."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from core.errors import ErrorCode, GovragError
from ingestion import pandoc, sniff
from ingestion.parse import ParseLimits, parse_document
from tests.support.conversion_inputs import FOLDER, ODT, long_odt


def _pandocs_started_here() -> list[psutil.Process]:
    return [child for child in psutil.Process().children(recursive=True)
            if child.name() == "pandoc" and child.status() != psutil.STATUS_ZOMBIE]


def test_a_conversion_past_the_time_limit_is_killed_not_left_running() -> None:
    """On a Celery prefork child (a test's main thread too), the time limit interrupted unstructured's wait for
    pandoc and left pandoc converting the document for minutes after it had failed."""
    data = long_odt()
    assert sniff.sniff_content_type(data, "minutes.odt") == sniff.APPLICATION_ODT
    with pytest.raises(GovragError) as slow:
        parse_document(data, sniff.APPLICATION_ODT, ParseLimits(timeout_seconds=1))
    assert "took longer than the 1 s limit" in slow.value.message
    time.sleep(0.5)
    left = _pandocs_started_here()
    for process in left:
        process.kill()
    assert not left, "pandoc still converts the document that failed"


def test_a_conversion_past_the_heap_limit_fails_with_that_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pandoc, "HEAP_LIMIT_MB", 64)
    with pytest.raises(GovragError) as large:
        parse_document(long_odt(), sniff.APPLICATION_ODT, ParseLimits(timeout_seconds=300))
    assert large.value.code is ErrorCode.payload_too_large
    assert large.value.message == "converting the ODT file needs more than 64 MB of memory"


def test_a_file_pandoc_cannot_read_is_refused_as_corrupt() -> None:
    with pytest.raises(GovragError) as broken:
        parse_document(b"{\\rtf1 " + bytes(range(256)) * 4, sniff.APPLICATION_RTF)
    assert broken.value.code is ErrorCode.invalid_request
    assert broken.value.message == "could not parse the RTF: the file is corrupt or malformed"


@contextlib.contextmanager
def _pandoc_looked_up_anew(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The pandoc looked up again in the environment the test set, and again after it is undone (pypandoc and
    `pandoc._pandoc` keep the path found for the process)."""
    import pypandoc

    pypandoc.clean_pandocpath_cache()
    pandoc._pandoc.cache_clear()  # noqa: SLF001
    yield
    monkeypatch.undo()
    pypandoc.clean_pandocpath_cache()
    pandoc._pandoc.cache_clear()  # noqa: SLF001


@pytest.fixture
def no_pandoc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """pypandoc finding no pandoc it can run (pypandoc-binary missing): PYPANDOC_PANDOC naming none."""
    monkeypatch.setenv("PYPANDOC_PANDOC", "/nonexistent/pandoc")
    with _pandoc_looked_up_anew(monkeypatch):
        yield


@pytest.mark.usefixtures("no_pandoc")
def test_without_pandoc_the_refusal_names_the_format_and_what_is_missing() -> None:
    """It raised pypandoc's OSError, which the ingestion worker retried as a transient fault, then failed the
    document with "internal error during ingestion; retries exhausted"."""
    with pytest.raises(GovragError) as refused:
        parse_document(ODT.read_bytes(), sniff.APPLICATION_ODT)
    assert refused.value.code is ErrorCode.unsupported_type
    assert refused.value.message == ("converting the ODT file needs pandoc (the pypandoc-binary package), which this "
                                     "deployment does not have")


def test_a_pandoc_gone_since_it_was_found_is_refused_as_missing(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The pandoc found at a worker's first file, gone at a later one (pypandoc-binary upgraded under the running
    worker): the shell starting it ended with 127, and the file was refused as "corrupt or malformed"."""
    import pypandoc

    bundled = Path(pypandoc.__file__).parent / "files" / "pandoc"
    found = tmp_path / "pandoc"
    found.write_text(f'#!/bin/sh\nexec "{bundled}" "$@"\n')
    found.chmod(0o755)
    monkeypatch.setenv("PYPANDOC_PANDOC", str(found))
    with _pandoc_looked_up_anew(monkeypatch):
        assert parse_document(ODT.read_bytes(), sniff.APPLICATION_ODT)[0].text == "Lorem ipsum dolor sit amet."
        found.unlink()
        with pytest.raises(GovragError) as refused:
            parse_document(ODT.read_bytes(), sniff.APPLICATION_ODT)
    assert refused.value.code is ErrorCode.unsupported_type
    assert refused.value.message == ("converting the ODT file needs pandoc (the pypandoc-binary package), which this "
                                     "deployment does not have")


@pytest.fixture
def other_pandoc_first_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A pandoc on PATH that reports a newer version (so pypandoc would choose it) and fails every conversion, as
    one built without -rtsopts fails on +RTS -M."""
    fake = tmp_path / "pandoc"
    fake.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "pandoc 99.0" && exit 0\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.delenv("PYPANDOC_PANDOC", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with _pandoc_looked_up_anew(monkeypatch):
        yield


@pytest.mark.usefixtures("other_pandoc_first_on_path")
def test_a_pandoc_on_path_is_not_run_in_place_of_the_bundled_one() -> None:
    """pypandoc chose the pandoc on PATH (of a higher version), and every ODT, RTF and EPUB failed as corrupt."""
    sections = parse_document(ODT.read_bytes(), sniff.APPLICATION_ODT)
    assert sections[0].text == "Lorem ipsum dolor sit amet."


@pytest.mark.parametrize(("name", "content_type", "partitioner"),
                         [("fake.odt", sniff.APPLICATION_ODT, "unstructured.partition.docx.partition_docx"),
                          ("fake-doc.rtf", sniff.APPLICATION_RTF, "unstructured.partition.html.partition_html")])
def test_a_converted_file_its_parser_rejects_is_named_as_uploaded(monkeypatch: pytest.MonkeyPatch, name: str,
                                                                 content_type: str, partitioner: str) -> None:
    """The DOCX/HTML pandoc made is the uploader's ODT/RTF: "could not parse the DOCX" named a file never sent."""

    def reject(*_args: object, **_kwargs: object) -> None:
        raise ValueError("malformed")

    monkeypatch.setattr(partitioner, reject)
    with pytest.raises(GovragError) as rejected:
        parse_document((FOLDER / "unstructured_example_docs" / name).read_bytes(), content_type)
    assert rejected.value.message == f"could not parse the {name[-3:].upper()}: the file is corrupt or malformed"
