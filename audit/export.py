"""Compliance export: filtered, streamed in constant memory, closed by a manifest the recipient can check."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Row
from sqlalchemy.orm import Session

from audit import repository
from audit.integrity import Signer, event_hash, key_id, manifest_signatures, plain, sign_manifest
from audit.schemas import EXPORT_FIELDS, RETRIEVAL_EVENT, AdminEventType, ExportCheck, ExportFilters, ExportFormat
from core.models import utcnow

MEDIA_TYPES = {ExportFormat.jsonl: "application/x-ndjson", ExportFormat.csv: "text/csv",
               ExportFormat.ocsf: "application/x-ndjson"}
_OCSF_ACTIVITY = {RETRIEVAL_EVENT: (2, "Read")}  # admin events are "Update" (3)
_FAILED_DECISIONS = ("refused", "blocked", "withheld", "error")
# Admin events all carry the decision "admin"; these say an action did not happen, so OCSF reads them as failures
_FAILED_ADMIN_EVENTS = (AdminEventType.export_failed.value,)
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet runs a cell starting so as a formula


def select_rows(*, session: Session, departments: set[str] | None, filters: ExportFilters,
                through_id: int) -> Iterator[dict[str, Any]]:
    """Rows up to `through_id` matching `filters`, limited to `departments` (None: every event)."""
    for event in repository.iter_events(session, filters=filters, through_id=through_id):
        if _visible(event, departments) and _matches(event, filters):
            yield {name: plain(getattr(event, name)) for name in EXPORT_FIELDS}


def _visible(event: Row[Any], departments: set[str] | None) -> bool:
    return departments is None or bool(departments & _touched(event))


def _touched(event: Row[Any]) -> set[str]:
    """The departments an event concerns: those searched; when none was, those asked for (an attempt refused). The
    departments asked for are the caller's to choose, so they never make an answered event another department's."""
    return set(event.departments_searched or []) or set(event.departments_requested or [])


def _matches(event: Row[Any], filters: ExportFilters) -> bool:
    if filters.department is not None and filters.department not in _touched(event):
        return False
    if filters.document_id is not None:
        return any(chunk.get("document_id") == filters.document_id for chunk in event.chunks or [])
    return True


def render(rows: Iterable[dict[str, Any]], fmt: ExportFormat, *, filters: ExportFilters, through_id: int,
           departments: set[str] | None, signer: Signer) -> Iterator[str]:
    """Serialise rows, then one closing manifest (row count, first/last hash, sha256 of the body before it, the
    `departments` the rows were limited to: null for every event, the deployment id and the Ed25519 key id), signed with
    the checkpoint key and with the Ed25519 key derived from it."""
    body = hashlib.sha256()
    manifest = _Manifest(fmt=fmt, filters=filters, through_id=through_id, departments=departments)
    for chunk in _serialise(manifest.count(rows), fmt):
        body.update(chunk.encode())
        yield chunk
    summary = manifest.as_dict(body.hexdigest()) | {"deployment_id": signer.deployment_id,
                                                    "key_id": key_id(signer.public_key())}
    summary |= sign_manifest(signer, summary)
    line = json.dumps({"manifest": summary}, sort_keys=True)
    yield f"# manifest {line}\n" if fmt is ExportFormat.csv else line + "\n"


class _Manifest:
    """Counts rows and remembers the first and last hash as they stream past."""

    def __init__(self, *, fmt: ExportFormat, filters: ExportFilters, through_id: int,
                 departments: set[str] | None) -> None:
        self.fmt, self.filters, self.through_id = fmt, filters, through_id
        self.departments = sorted(departments) if departments is not None else None
        self.rows, self.first_hash, self.last_hash = 0, None, None

    def count(self, rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for row in rows:
            self.rows += 1
            self.first_hash = self.first_hash or row["hash"]
            self.last_hash = row["hash"]
            yield row

    def as_dict(self, body_sha256: str) -> dict[str, Any]:
        return {"rows": self.rows, "first_hash": self.first_hash, "last_hash": self.last_hash,
                "through_event_id": self.through_id, "format": self.fmt.value, "body_sha256": body_sha256,
                "generated_at": plain(utcnow()), "filters": filters_as_dict(self.filters),
                "departments": self.departments}


def filters_as_dict(filters: ExportFilters) -> dict[str, Any]:
    """The filters, JSON-ready, without the unset ones."""
    return {k: plain(v) for k, v in asdict(filters).items() if v is not None}


def _serialise(rows: Iterable[dict[str, Any]], fmt: ExportFormat) -> Iterator[str]:
    if fmt is ExportFormat.csv:
        yield from _csv(rows)
        return
    convert = to_ocsf if fmt is ExportFormat.ocsf else (lambda row: row)
    for row in rows:
        yield json.dumps(convert(row), ensure_ascii=False) + "\n"


def _csv(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=EXPORT_FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(json.dumps(v) if isinstance(v, list | dict) else v) for k, v in row.items()})
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    if buffer.getvalue():
        yield buffer.getvalue()


def _cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: a string it would run as a formula (a caller's question, purpose or
    subject starting with = + - @, a tab or a carriage return) gets a leading apostrophe (OWASP's advice)."""
    return f"'{value}" if isinstance(value, str) and value.startswith(_FORMULA_STARTS) else value



def to_ocsf(row: dict[str, Any]) -> dict[str, Any]:
    """An OCSF 1.3 API Activity (class 6003) event; ledger-specific fields under `unmapped`."""
    activity_id, activity = _OCSF_ACTIVITY.get(row["event_type"], (3, "Update"))
    created = datetime.fromisoformat(row["created_at"].rstrip("Z")).replace(tzinfo=UTC)
    denied = row["decision"] in _FAILED_DECISIONS or row["event_type"] in _FAILED_ADMIN_EVENTS
    return {
        "class_uid": 6003, "class_name": "API Activity", "category_uid": 6, "category_name": "Application Activity",
        "activity_id": activity_id, "activity_name": activity, "type_uid": 6003 * 100 + activity_id,
        "severity_id": 1, "time": int(created.timestamp() * 1000),
        "status_id": 2 if denied else 1, "status": "Failure" if denied else "Success",
        "status_detail": row["reason"] or row["decision"],
        "metadata": {"product": {"name": "govrag", "vendor_name": "govrag"}, "version": "1.3.0",
                     "uid": str(row["id"]), "correlation_uid": row["request_id"]},
        "actor": {"user": {"uid": row["subject"], "groups": [{"name": g} for g in row["groups"]]}},
        "api": {"operation": row["event_type"], "request": {"uid": row["request_id"]}},
        "resources": [{"uid": c.get("document_id"), "type": "document", "data": c} for c in row["chunks"]],
        "unmapped": {k: row[k] for k in EXPORT_FIELDS if k not in ("subject", "groups", "chunks")},
    }


_MANIFEST_PREFIX = "# manifest "  # a CSV export's manifest line starts so
_TAIL_READ = 64 * 1024  # bytes read at a time, backwards from the end, to find the manifest line
# No manifest govrag writes is longer: its filters are bounded (audit.schemas' types, for the API and the command
# alike: a few KiB at most, escaped), the rest is of fixed size but for the departments of its scope, which
# `scope_fits_a_manifest` bounds before an export is recorded. A longer last line is read no further: no manifest.
LONGEST_MANIFEST_LINE = 8 * 1024 * 1024
_MANIFEST_BUT_ITS_SCOPE = 64 * 1024  # room kept for the rest of a manifest line: its filters, hashes and signatures
# No row govrag writes is longer, in any format: a row's columns are bounded (strings by their column's length, the
# question by the query's 2,000 characters, masked; groups by a token's 16 KiB; chunks by top_k, 50) but for its lists
# of departments. The largest is an export's own `export` event, which lists its scope three times (departments
# requested and searched, `details.scope`), each bounded to a manifest line by `scope_fits_a_manifest`; CSV doubles
# each quote of those JSON cells, 40% more at most (a one-letter name: `"a", ` 5 bytes, `""a"", ` 7): 4.2 manifest
# lines at most, the rest a few KiB. A retrieval lists the departments searched and the roles relied on, as many as
# the reader holds, which nothing bounds: a role as short as `reader` in each of as many departments as a manifest may
# list fits, and so does one in each of some 280,000 departments of 63-character names (a million of 10-character
# ones). A longer line (or CSV record) is read no further: no row of a govrag export.
LONGEST_EXPORT_ROW = 5 * LONGEST_MANIFEST_LINE  # 40 MiB


def scope_fits_a_manifest(scope: set[str]) -> bool:
    """Whether the manifest of an export within `scope` (a compliance officer's departments, which it lists) stays
    within LONGEST_MANIFEST_LINE, so that verify-export reads it: some hundred thousand departments would not."""
    return len(json.dumps(sorted(scope))) <= LONGEST_MANIFEST_LINE - _MANIFEST_BUT_ITS_SCOPE


def check_export(export_file: BinaryIO, *, by: Signer | Ed25519PublicKey, deployment_id: str | None,
                 manifest_copy: BinaryIO | None = None) -> ExportCheck:
    """Whether `export_file` (seekable, opened for bytes) is an export signed by the checkpoint key (a Signer: both its
    signatures) or the Ed25519 public key given, whole and unchanged: its manifest's signatures and deployment id (when
    `deployment_id` is given), then its rows against the manifest (count, order, each JSONL row's hash, the body's
    sha256), then, given `manifest_copy` (the FILE.manifest.json beside it), that the copy is that manifest. The
    manifest, its last line, is read from the end once, and that reading is what each check uses; the rows then stream
    past once (_check_rows): memory holds a line at a time, however long the export."""
    body_length, line_length, manifest = _manifest(export_file)
    if manifest is None:
        return _failed("manifest_missing", "no readable manifest closes the file: it was cut, or is no govrag export")
    if not isinstance(manifest.get("signature"), str):
        return _failed("manifest_unsigned", "the manifest carries no signature (removed, or an export made before "
                                            "manifests were signed)")
    signatures = manifest_signatures(by, manifest)
    if signatures is None:
        return _failed("manifest_signature_invalid", "the manifest was edited, or signed with another key")
    if not signatures:
        return _failed("ed25519_signature_missing", "the manifest carries no Ed25519 signature (an export made before "
                                                    "they were added): only the checkpoint key checks it")
    found = ExportCheck(ok=True, rows=manifest["rows"], deployment_id=manifest["deployment_id"],
                        through_event_id=manifest["through_event_id"], signatures=signatures,
                        key_id=manifest.get("key_id"))
    if deployment_id is not None and manifest["deployment_id"] != deployment_id:
        return _broken(found, "other_deployment", f"signed by deployment {manifest['deployment_id']}, not by "
                                                  f"{deployment_id}")
    checked = _check_rows(found, export_file, body_length, manifest)
    if not checked.ok or manifest_copy is None:
        return checked
    return _check_manifest_copy(checked, manifest, line_length, manifest_copy)


def _check_manifest_copy(found: ExportCheck, manifest: dict[str, Any], line_length: int,
                         copy: BinaryIO) -> ExportCheck:
    """`found` (the export's check, passed) unless `copy`, the FILE.manifest.json beside the export file, is not
    `manifest`, the one the check read from the file's last line (`line_length` bytes): another export's left beside
    it, or one edited, is never taken for this one's. Read up to twice the line's length (and _TAIL_READ): a longer
    file is no copy of it, and is never held whole."""
    longest = 2 * line_length + _TAIL_READ
    text = copy.read(longest + 1)
    try:
        same = len(text) <= longest and json.loads(text, object_pairs_hook=_unique) == {"manifest": manifest}
    except (UnicodeDecodeError, ValueError, RecursionError):
        same = False
    return found if same else _broken(found, "manifest_file_mismatch", "the .manifest.json file beside it is not the "
                                      "manifest the file ends with: another export's, or edited")


def _manifest(export_file: BinaryIO) -> tuple[int, int, dict[str, Any] | None]:
    """The length of the body (every line before the last), the last line's length and the manifest it holds (None:
    none there, a last line longer than LONGEST_MANIFEST_LINE too)."""
    body_length, last = _last_line(export_file)
    if last is None:
        return body_length, 0, None
    try:
        manifest = json.loads(last.decode().removeprefix(_MANIFEST_PREFIX), object_pairs_hook=_unique)["manifest"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError):
        return body_length, len(last), None
    return body_length, len(last), manifest if isinstance(manifest, dict) else None


def _last_line(export_file: BinaryIO) -> tuple[int, bytes | None]:
    """Where the file's last line starts and the line, without the newline ending the file: read backwards from the
    end, _TAIL_READ bytes at a time, until the newline before it. None for a line longer than LONGEST_MANIFEST_LINE
    (a huge or newline-free file), found so once that much of it is read: no more is."""
    end = export_file.seek(0, io.SEEK_END)
    if end:
        export_file.seek(end - 1)
        if export_file.read(1) == b"\n":
            end -= 1
    start, blocks = end, list[bytes]()  # the blocks read, the last one first
    while start > 0 and end - start <= LONGEST_MANIFEST_LINE:
        step = min(_TAIL_READ, start)
        start -= step
        export_file.seek(start)
        blocks.append(export_file.read(step))
        if (newline := blocks[-1].rfind(b"\n")) >= 0:
            start += newline + 1
            blocks[-1] = blocks[-1][newline + 1:]
            break
    if end - start > LONGEST_MANIFEST_LINE:
        return start, None
    return start, b"".join(reversed(blocks))


class _RowTooLong(Exception):
    """A line of an export's body (or a CSV record) longer than LONGEST_EXPORT_ROW: `line` is the file's line number
    where it was found so, its content never read further nor said."""

    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


class _Body:
    """The lines before the manifest, each with its newline, read from the start and hashed as they pass; each read
    with a bound (_RowTooLong past LONGEST_EXPORT_ROW bytes, the rest of the line and of the file unread)."""

    def __init__(self, export_file: BinaryIO, length: int) -> None:
        self.export_file, self.length, self.sha256 = export_file, length, hashlib.sha256()
        self.line = 0  # the number of the line last read

    def __iter__(self) -> Iterator[bytes]:
        self.export_file.seek(0)
        left = self.length
        while left > 0:
            # never past the body: its last line ends where the manifest starts
            line = self.export_file.readline(min(left, LONGEST_EXPORT_ROW + 1))
            if not line:
                return
            self.line += 1
            if len(line) > LONGEST_EXPORT_ROW:
                raise _RowTooLong(self.line)
            left -= len(line)
            self.sha256.update(line)
            yield line


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys differ: a manifest saying `rows` twice reads one way here, maybe another elsewhere."""
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError("a key given twice")
    return found


@dataclass
class _Tally:
    """What the rows showed as they streamed past: their count, the first pair out of order, the first row changed."""

    count: int = 0
    previous: int | None = None
    reordered: tuple[int, int] | None = None  # (row id, the id of the row before it)
    changed: int | None = None

    def add(self, row: _Row) -> None:
        self.count += 1
        if self.reordered is None and self.previous is not None and row.id <= self.previous:
            self.reordered = (row.id, self.previous)
        if self.changed is None and row.rehashed not in (None, row.hash):
            self.changed = row.id
        self.previous = row.id


def _check_rows(found: ExportCheck, export_file: BinaryIO, body_length: int,
                manifest: dict[str, Any]) -> ExportCheck:
    """The rows against the manifest, the body read once: each line hashed as it passes (that hash of the bytes
    parsed, nothing read before or after, says whether they are the body signed) and refused unparsed when its shape
    is none an export writes (_NoExportRow), so that a hand-edited line within the bound cannot have the parser build
    many times its size before the check says it was changed. Every line is shape-checked, the body signed too (no
    row an export writes is refused: its bounds are those of the rows written), as nothing says which body it is
    until its last line is read; the check costs a few scans of the line's bytes, little beside its parse. Only the
    tally is kept of the rows parsed, so reading the body once holds no more than reading it twice did."""
    body, tally = _Body(export_file, body_length), _Tally()
    try:
        for row in _rows(body, ExportFormat(manifest["format"])):
            tally.add(row)
    except _RowTooLong as too_long:
        return _broken(found, "row_too_long", f"line {too_long.line} is longer than {LONGEST_EXPORT_ROW} bytes, "
                                              "longer than any row an export writes: the file was edited, or is no "
                                              "govrag export", line=too_long.line)
    except _NoExportRow:
        return _broken(found, "rows_unreadable", f"line {body.line} is shaped as no export row is (not one JSON "
                                                 "object, or more values than its length holds): the file was "
                                                 "edited, or is no govrag export", line=body.line)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, RecursionError, csv.Error):
        return _broken(found, "rows_unreadable", f"line {body.line} does not parse as a row: the file was cut or "
                                                 "edited mid-row", line=body.line)
    if tally.count != manifest["rows"]:
        what = "removed" if tally.count < manifest["rows"] else "added"
        return _broken(found, f"rows_{what}", f"the manifest counts {manifest['rows']} rows, the file holds "
                                              f"{tally.count}: rows were {what}")
    broken: list[tuple[int, str, str]] = []  # (row id, reason, message): the lowest row is named
    if tally.reordered is not None:
        row_id, before = tally.reordered
        broken.append((row_id, "rows_reordered", f"row {row_id} comes after row {before}: the rows were reordered"))
    if tally.changed is not None:
        broken.append((tally.changed, "row_changed", f"row {tally.changed} does not match its hash: it was changed"))
    if broken:
        row_id, reason, message = min(broken, key=lambda found_at: found_at[0])
        return _broken(found, reason, message, row_id)
    if body.sha256.hexdigest() != manifest["body_sha256"]:
        return _broken(found, "body_changed", "the rows are not those exported: one was changed or replaced")
    return found


# What a row holds beside its lists of names, counted as each row's line is checked for rows no export writes
# (_no_export_row): each row's JSON objects and arrays (chunks, by top_k at most 50, and their fields; OCSF lists a
# group as an object, a token's 16 KiB of them at most: some thousands) and its values (its fields, a question's 2,000
# characters, a token's groups), generously: brackets and commas inside its strings count too.
_ROW_FIXED_PART = 64 * 1024
# The fewest bytes a row's line spends on each value beyond that: its long lists are of distinct department names
# (and roles naming them), `"abcd", ` at least once there are more than some 40,000 (as many as have 3 letters or
# fewer). A line of values denser than that (`{},{},...`, `"ab","ab",...`, a CSV line of short cells) is no row, and
# parsed would hold up to some 30 times its length, a GiB for a line within LONGEST_EXPORT_ROW; one as dense, some 11
# (13 in CSV), as a row of as many 4-letter departments would.
_BYTES_PER_VALUE = 8


_JSON_OBJECT = re.compile(rb"\s*\{.*\}\s*", re.DOTALL)  # a line that may hold one JSON object, its whitespace about


class _NoExportRow(Exception):
    """A row's line shaped as no export row is: refused before it is parsed."""


def _no_export_row(line: bytes, *, json_object: bool) -> bool:
    """Whether `line` is shaped as no export row is, found by counting bytes (never parsing it): more values than its
    length holds (commas) or, for a JSON row (`json_object`), not one object, or more objects and arrays than a row
    has. A nesting deeper than the parser goes is left to it: RecursionError, a row that does not parse."""
    if line.count(b",") > _ROW_FIXED_PART + len(line) // _BYTES_PER_VALUE:
        return True
    if not json_object:
        return False
    return _JSON_OBJECT.fullmatch(line) is None or line.count(b"{") + line.count(b"[") > _ROW_FIXED_PART


@dataclass(frozen=True)
class _Row:
    id: int
    hash: str
    # a JSONL row's hash computed again from its content; None for CSV and OCSF (not whole), and for a JSONL row
    # holding an escape no export writes (_ESCAPE_BEYOND_ASCII)
    rehashed: str | None


# A row's line is decoded as Latin-1, a character a byte: a str as long as the line, one byte a character, where
# decoding UTF-8 widens the whole line to 2 or 4 bytes a character for one character past U+00FF in it (4 times a line
# of 39 MiB for one emoji, and its parsed value as much again). Each byte JSON and CSV give a meaning to is ASCII, and
# no byte of a UTF-8 character beyond ASCII is: a row parses as from UTF-8, each such character read as its bytes.
# What is read of it, an id and a hash, is ASCII; a JSONL row's hash is computed again over its content encoded back
# to those bytes (event_hash's encoding). Bytes that are no UTF-8 are no export's: the body's hash says so.
_BYTE_A_CHARACTER = "latin-1"
# A JSON escape of a character beyond ASCII (`\u00e9`, `\u20ac`, `\ud83d\ude00`), not itself an escaped backslash's
# text (`\\u00e9`, an even run of backslashes before it). No export writes one (ensure_ascii=False writes the
# character's UTF-8 bytes), a tool re-serialising the file may (Python's json.dumps by default, jq -a). Read a byte a
# character, the escaped character and those written as bytes are no longer told apart, so such a row's hash cannot be
# computed again from what was parsed: it is left to the body's hash (body_changed), as for CSV and OCSF rows, rather
# than called changed, or unparsed, when its content may be the very one signed.
_ESCAPE_BEYOND_ASCII = re.compile(rb"(?:^|[^\\])(?:\\\\)*\\u(?!00[0-7])")


def _rows(body: _Body, fmt: ExportFormat) -> Iterator[_Row]:
    """The rows of the body, each line refused unparsed (_NoExportRow) if shaped as no export row is."""
    if fmt is ExportFormat.csv:
        yield from _csv_rows(body)
        return
    for text in body:
        if _no_export_row(text, json_object=True):
            raise _NoExportRow
        line = json.loads(text.decode(_BYTE_A_CHARACTER))  # JSON escapes a newline inside a value
        if fmt is ExportFormat.ocsf:
            yield _Row(int(line["metadata"]["uid"]), line["unmapped"]["hash"], None)
        else:
            yield _Row(int(line["id"]), line["hash"], _rehashed(line, text))


def _rehashed(row: dict[str, Any], line: bytes) -> str | None:
    """The JSONL row's hash computed again from `row`, parsed from `line` a byte a character; None where the line
    holds an escape of a character beyond ASCII (_ESCAPE_BEYOND_ASCII), which no export writes."""
    if b"\\u" in line and _ESCAPE_BEYOND_ASCII.search(line):
        return None
    return event_hash(SimpleNamespace(**row), _BYTE_A_CHARACTER)


def _csv_rows(body: _Body) -> Iterator[_Row]:
    """A CSV export's rows. A record spans lines where a cell holds a line break (a question's): it is bounded as a
    line is (_RowTooLong, naming the line where it went past LONGEST_EXPORT_ROW), or a quote never closed would gather
    every line after it."""
    csv.field_size_limit(max(csv.field_size_limit(), LONGEST_EXPORT_ROW))  # a cell of a user in thousands of groups
    record = 0  # bytes of the record being read (the header's too, for the first)

    def pieces() -> Iterator[str]:
        nonlocal record
        for line in body:
            record += len(line)
            if record > LONGEST_EXPORT_ROW:
                raise _RowTooLong(body.line)
            if _no_export_row(line, json_object=False):
                raise _NoExportRow
            yield from _pieces_of(line)

    for row in csv.DictReader(pieces()):
        record = 0
        yield _Row(int(row["id"]), row["hash"], None)


# A piece of a CSV body line as the csv module expects them: cut after each \r, \n and \r\n, as a file opened with
# newline="" is read (a cell's \r cuts no line of the body's, which are cut at \n alone)
_PIECE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")


def _pieces_of(line: bytes) -> Iterator[str]:
    """`line`'s pieces (_PIECE), decoded a byte a character, one at a time (a line without \\r is one piece, its text
    itself): io.StringIO held the text 4 bytes a character, and bytes.splitlines would list every piece at once, an
    object each (a 39 MiB line of `a\\r`, 13 million pieces, held in 890 MiB before the csv module read one)."""
    return map(re.Match.group, _PIECE.finditer(line.decode(_BYTE_A_CHARACTER)))


def _failed(reason: str, message: str) -> ExportCheck:
    return ExportCheck(ok=False, reason=reason, message=message)


def _broken(found: ExportCheck, reason: str, message: str, row_id: int | None = None, *,
            line: int | None = None) -> ExportCheck:
    return found.model_copy(update={"ok": False, "reason": reason, "message": message, "first_broken": row_id,
                                    "line": line})
