"""The file a `govrag audit export -o FILE` writes, and its FILE.manifest.json: whole or not at all, 0600, whatever
another export of the same path or the disk does meanwhile; against a PostgreSQL database of the test's own."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import resource
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, TextIO

import pytest
from sqlalchemy import select

from api import cli_audit
from api.cli import main
from core.db import unit_of_work
from core.logs import request_id_var
from core.models import RetrievalEvent
from core.settings import get_settings
from tests.support.govrag_process import run_govrag

INTERRUPTED = "interrupted; run the same command again to go on\n"
DISK_FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a write to a full disk raises (no file named)
A_RUNS_OWN = re.compile(r"cli-[0-9a-f]{32}")  # the request id of one command's run


def _manifest(export: Path) -> dict[str, object]:
    """The manifest an export file ends with."""
    return json.loads(export.read_text(encoding="utf-8").splitlines()[-1].removeprefix("# manifest "))


def _ledger_events(url: str, count: int) -> list[tuple[str, str, dict[str, object]]]:
    """The ledger's last `count` events, oldest first: their type, request id and details."""
    with unit_of_work(url) as session:
        events = session.scalars(select(RetrievalEvent).order_by(RetrievalEvent.id.desc()).limit(count)).all()
        return [(event.event_type, event.request_id, event.details) for event in reversed(events)]


def _ledger_tail(url: str) -> list[tuple[str, dict[str, object]]]:
    """The ledger's last two events: their type and details."""
    return [(event_type, details) for event_type, _, details in _ledger_events(url, 2)]


def _one_run(url: str) -> bool:
    """Whether the ledger's last two events (an export and its `export_failed`) carry one request id, their run's."""
    first, second = (request_id for _, request_id, _ in _ledger_events(url, 2))
    return first == second and A_RUNS_OWN.fullmatch(first) is not None


def _recorded_failed(url: str, error: str) -> bool:
    """Whether the ledger ends with an export and its `export_failed` event naming `error`, of one run."""
    tail = _ledger_tail(url)
    return [event_type for event_type, _ in tail] == ["export", "export_failed"] and tail[-1][1] == {
        "export": "export", "error": error} and _one_run(url)


def _runs_recorded(url: str, events: int) -> tuple[list[str], list[str]]:
    """Of the ledger's last `events` events, the request ids of the `export` events (sorted) and of the
    `export_failed` ones."""
    recorded = _ledger_events(url, events)
    return (sorted(request_id for event_type, request_id, _ in recorded if event_type == "export"),
            [request_id for event_type, request_id, _ in recorded if event_type == "export_failed"])


def _export_beside_another(out: Path, monkeypatch: pytest.MonkeyPatch,
                           other_stops: BaseException | None) -> tuple[dict[str, int], dict[str, str]]:
    """Two `govrag audit export -o out` at once, in threads: the other writes its first line and, while this one has
    written all of its own, both files open, ends (`other_stops` raised by its writer, or its export finished);
    then this one ends. Their exit codes and the request ids they ran under, by name ("this", "other")."""
    copy = cli_audit._copy
    both_writing = threading.Barrier(2, timeout=120)
    other_ended = threading.Event()

    def copy_beside_the_other(lines: Iterator[str], handle: TextIO) -> str:
        run_ids[threading.current_thread().name] = request_id_var.get()
        if threading.current_thread().name == "this":
            last = copy(lines, handle)
            both_writing.wait()
            assert other_ended.wait(timeout=120)
            return last
        handle.write(first := next(lines))
        both_writing.wait()
        if other_stops is not None:
            raise other_stops
        return copy(lines, handle) or first

    monkeypatch.setattr(cli_audit, "_copy", copy_beside_the_other)
    codes: dict[str, int] = {}
    run_ids: dict[str, str] = {}

    def export(name: str) -> None:
        try:
            codes[name] = main(["audit", "export", "-o", str(out)])
        finally:
            if name == "other":
                other_ended.set()

    threads = [threading.Thread(target=export, args=(name,), name=name, daemon=True)  # none keeps pytest from ending
               for name in ("other", "this")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return codes, run_ids


@pytest.mark.parametrize(("other_stops", "other_code", "other_says"), [
    (None, 0, ""),
    (DISK_FULL, 2, "failed: No space left on device: {out}\n"),
    (KeyboardInterrupt(), 130, INTERRUPTED),
], ids=["finished", "disk full", "ctrl-c"])
def test_two_exports_to_one_file_at_once_leave_it_whole(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        other_stops: BaseException | None, other_code: int, other_says: str) -> None:
    """Every export of a path wrote the same hidden `.FILE.partial`: of two at once, the second to open it emptied the
    first's, both wrote into one file, the first renamed it into place and the second failed ("No such file or
    directory" of that hidden file), or one failing removed the other's file before its rename. Now each writes a
    hidden file of its own: the one that ends last leaves FILE whole (its manifest checks) with its own manifest beside
    it, the other says its own failure in one line, and no hidden file is left. Both files are 0600, whatever the
    file replaced allowed: an export names who asked what. The one that failed is recorded as failed with its own
    request id, not the other's (they said "-" alike: by the same user, which export failed was not said)."""
    (exports := tmp_path / "exports").mkdir()
    out = exports / "out.jsonl"
    out.write_text("last week's export\n")
    out.chmod(0o644)

    codes, run_ids = _export_beside_another(out, monkeypatch, other_stops)

    assert codes == {"other": other_code, "this": 0}
    assert run_ids["this"] != run_ids["other"] and all(map(A_RUNS_OWN.fullmatch, run_ids.values()))
    assert _runs_recorded(cli_env, 2 if other_stops is None else 3) == (
        sorted(run_ids.values()), [] if other_stops is None else [run_ids["other"]])
    assert capsys.readouterr().err == other_says.format(out=out)
    assert sorted(path.name for path in exports.iterdir()) == ["out.jsonl", "out.jsonl.manifest.json"]
    assert json.loads((exports / "out.jsonl.manifest.json").read_text()) == _manifest(out)
    assert [(exports / name).stat().st_mode & 0o777 for name in ("out.jsonl", "out.jsonl.manifest.json")] == [
        0o600, 0o600]
    assert main(["audit", "verify-export", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_an_export_the_disk_refuses_midway_leaves_the_earlier_one_and_no_hidden_file(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An export the file system stops writing midway (a full disk; here a file size limit, `prlimit --fsize`, the
    kernel refusing the write past it with EFBIG as it would with ENOSPC) says so in one line naming FILE, exit 2,
    no traceback; the earlier export and its manifest are left as they were and no hidden file is left beside them.
    The ledger, which recorded the export before its first row was read, said no more: an export no file holds read
    as made. Now an `export_failed` event follows it, naming the failure (EFBIG)."""
    (exports := tmp_path / "exports").mkdir()
    out = exports / "out.jsonl"
    assert main(["audit", "export", "-o", str(out)]) == 0
    capsys.readouterr()
    earlier = {path.name: path.read_bytes() for path in exports.iterdir()}
    assert sorted(earlier) == ["out.jsonl", "out.jsonl.manifest.json"]

    # Its export is longer (the earlier one's row more); the limit binds every file it writes: no checkpoint is signed
    # at its events, so none is appended to the mirror file (longer than the export).
    limit = f"--fsize={len(earlier['out.jsonl'])}"
    refused = run_govrag(["audit", "export", "-o", str(out)], prefix=["prlimit", limit],
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "GOVRAG_AUDIT_CHECKPOINT_EVERY": "0"})

    assert (refused.returncode, refused.stdout, refused.stderr) == (2, "", f"failed: File too large: {out}\n")
    assert {path.name: path.read_bytes() for path in exports.iterdir()} == earlier
    assert _recorded_failed(cli_env, "EFBIG")


def test_a_manifest_the_disk_refuses_midway_leaves_the_earlier_export_and_manifest(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """FILE.manifest.json was written after FILE was renamed into place: a disk that refused it midway (a full disk;
    here this process's file size limit, set once FILE's rows are on disk, below the manifest's length, the kernel
    refusing the write past it with EFBIG) left the new FILE beside the earlier export's manifest. Now FILE and its
    manifest are renamed into place together once both are whole: both are left as they were, no hidden file beside
    them; the export says so in one line naming FILE, exit 2, and is recorded as failed."""
    monkeypatch.setenv("GOVRAG_AUDIT_CHECKPOINT_EVERY", "0")  # no checkpoint mirror written under the limit
    get_settings.cache_clear()
    (exports := tmp_path / "exports").mkdir()
    out = exports / "out.jsonl"
    assert main(["audit", "export", "-o", str(out)]) == 0
    capsys.readouterr()
    earlier = {path.name: path.read_bytes() for path in exports.iterdir()}
    copy = cli_audit._copy
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def copy_then_fill_the_disk(lines: Iterator[str], handle: TextIO) -> str:
        last = copy(lines, handle)
        handle.flush()
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(last) // 2, hard))  # Python ignores SIGXFSZ: EFBIG
        return last

    monkeypatch.setattr(cli_audit, "_copy", copy_then_fill_the_disk)
    try:
        code = main(["audit", "export", "-o", str(out)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert (code, capsys.readouterr().err) == (2, f"failed: File too large: {out}\n")
    assert {path.name: path.read_bytes() for path in exports.iterdir()} == earlier
    assert _recorded_failed(cli_env, "EFBIG")


def test_a_manifest_left_beside_a_later_export_fails_its_check(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`govrag audit verify-export FILE` read FILE alone: an earlier export's FILE.manifest.json left beside a later
    FILE (copied back, or by a writer that failed between the two files) passed with it, and whoever read the rows
    counted, the window and the hashes from the manifest file read another export's. Now a manifest file beside FILE
    must be the manifest FILE ends with: another (or one far longer than FILE's manifest line, never read whole) is
    `manifest_file_mismatch`, exit 3; FILE with none beside it checks as before."""
    out = tmp_path / "out.jsonl"
    manifest = tmp_path / "out.jsonl.manifest.json"
    assert main(["audit", "export", "-o", str(out)]) == 0
    earlier = manifest.read_bytes()
    assert main(["audit", "export", "-o", str(out)]) == 0
    own = manifest.read_bytes()
    capsys.readouterr()
    for left_beside in (earlier, b"not a manifest", b" " * 1_000_000 + own):
        manifest.write_bytes(left_beside)
        assert main(["audit", "verify-export", str(out)]) == 3
        checked = json.loads(capsys.readouterr().out)
        assert (checked["ok"], checked["reason"]) == (False, "manifest_file_mismatch")
    manifest.unlink()
    assert main(["audit", "verify-export", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


class _RewrittenAsItsRowsAreRead(io.FileIO):
    """An export file that another writer rewrites in place, its last line (the manifest) replaced by `last_line`, as
    the check begins to read its rows: once the check has read the manifest it verifies."""

    def __init__(self, path: Path, last_line: bytes) -> None:
        super().__init__(path, "rb")
        self.last_line, self.rewritten = last_line, False

    def readline(self, size: int | None = -1) -> bytes:
        if not self.rewritten:
            with open(self.name, "r+b") as writer:  # not Path.open: the test replaces it
                rows = writer.read().splitlines(keepends=True)[:-1]
                writer.seek(0)
                writer.write(b"".join(rows) + self.last_line)
                writer.truncate()
            self.rewritten = True
        return super().readline(size)


def test_the_manifest_file_is_checked_against_the_manifest_the_check_verified(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """verify-export read FILE's manifest line twice: once to verify it and the rows, once more to compare
    FILE.manifest.json with. FILE rewritten in between (its last line another export's manifest, the one left beside
    it) had that manifest file pass as FILE's own. The manifest line is read once now, and the manifest file compared
    with the manifest verified."""
    out = tmp_path / "out.jsonl"
    manifest = tmp_path / "out.jsonl.manifest.json"
    assert main(["audit", "export", "-o", str(out)]) == 0
    earlier = manifest.read_bytes()  # the earlier export's last line, as its manifest file holds it
    assert main(["audit", "export", "-o", str(out)]) == 0
    manifest.write_bytes(earlier)
    capsys.readouterr()
    opened: list[_RewrittenAsItsRowsAreRead] = []
    path_open = Path.open

    def open_rewritten(path: Path, mode: str = "r", *args: Any, **kwargs: Any) -> IO[Any]:
        if path != out or mode != "rb":
            return path_open(path, mode, *args, **kwargs)
        opened.append(_RewrittenAsItsRowsAreRead(out, earlier))  # the command's FILE, as another writer rewrites it
        return opened[-1]

    with monkeypatch.context() as patched:
        patched.setattr(Path, "open", open_rewritten)
        code = main(["audit", "verify-export", str(out)])
    checked = json.loads(capsys.readouterr().out)
    assert [export_file.rewritten for export_file in opened] == [True] and out.read_bytes().endswith(earlier)
    assert (code, checked["ok"], checked["reason"]) == (3, False, "manifest_file_mismatch"), checked


def test_a_ctrl_c_as_the_hidden_file_is_made_leaves_none(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C once the hidden `.FILE.<random>.partial` was made and before its write began (mkstemp returning, out
    of the block that removes it on failure) left it in the folder for good. Now its name is drawn before it is made
    and removed on any failure from then on: exit 130, one line, no file left and nothing recorded."""
    (exports := tmp_path / "exports").mkdir()
    made = os.open

    def open_then_ctrl_c(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        descriptor = made(path, flags, mode, dir_fd=dir_fd)
        if str(path).endswith(".partial"):
            raise KeyboardInterrupt
        return descriptor

    recorded = _ledger_tail(cli_env)
    with monkeypatch.context() as patched:
        patched.setattr(os, "open", open_then_ctrl_c)
        code = main(["audit", "export", "-o", str(exports / "out.jsonl")])
    assert (code, capsys.readouterr().err) == (130, INTERRUPTED)
    assert list(exports.iterdir()) == [] and _ledger_tail(cli_env) == recorded


@pytest.mark.parametrize("made_a_folder", ["out.jsonl", "out.jsonl.manifest.json"])
def test_a_file_made_a_folder_while_the_export_is_written_is_named_not_the_hidden_file(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        made_a_folder: str) -> None:
    """FILE (or FILE.manifest.json) made a folder after the export checked it, while it was written: the rename into
    place was refused with the system's error naming the hidden file written first (`.out.jsonl.partial`), which the
    user never named nor sees. Now it names the path, as an export to a folder says, exit 2, no hidden file is left,
    and the export is recorded as failed after it."""
    (exports := tmp_path / "exports").mkdir()
    copy = cli_audit._copy

    def copy_then_make_a_folder(lines: Iterator[str], handle: TextIO) -> str:
        last = copy(lines, handle)
        (exports / made_a_folder).mkdir()
        return last

    monkeypatch.setattr(cli_audit, "_copy", copy_then_make_a_folder)
    code = main(["audit", "export", "-o", str(exports / "out.jsonl")])

    assert (code, capsys.readouterr().err) == (
        2, f"failed: a folder, not a file (give a file's path): {exports / made_a_folder}\n")
    assert [path.name for path in exports.iterdir() if path.name.startswith(".")] == []
    assert (exports / made_a_folder).is_dir()
    assert _recorded_failed(cli_env, "EISDIR")


def test_a_training_export_the_disk_refuses_midway_is_recorded_as_failed(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`govrag export training-data` recorded its `training_export` before the first row was read and said no more
    when the disk then refused the file: an export no file holds read as made. Now an `export_failed` event naming the
    training export and the failure (ENOSPC) follows it; the command says the failure in one line, exit 2."""
    (exports := tmp_path / "exports").mkdir()
    out = exports / "hr.jsonl"

    def on_a_full_disk(lines: Iterator[str], handle: TextIO) -> str:
        handle.write(next(lines))
        raise DISK_FULL

    monkeypatch.setattr(cli_audit, "_copy", on_a_full_disk)
    code = main(["export", "training-data", "--department", "hr", "-o", str(out)])
    assert (code, capsys.readouterr().err) == (2, f"failed: No space left on device: {out}\n")
    assert list(exports.iterdir()) == []
    assert _ledger_tail(cli_env) == [("training_export", {"department": "hr"}),
                                     ("export_failed", {"export": "training_export", "error": "ENOSPC"})]
    assert _one_run(cli_env)


def test_an_export_filtered_by_request_id_holds_that_run_s_events_alone(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`govrag audit export --request-id` selects the events one command's run (or one API request) recorded: of two
    exports, each recorded under its run's own id, the export of the first's id holds its `export` event alone,
    checks against its signed manifest, which names the filter, and is itself recorded with that filter."""
    for name in ("first", "second"):
        assert main(["audit", "export", "-o", str(tmp_path / f"{name}.jsonl")]) == 0
    first, second = (request_id for _, request_id, _ in _ledger_events(cli_env, 2))
    assert first != second and A_RUNS_OWN.fullmatch(first) and A_RUNS_OWN.fullmatch(second)
    out = tmp_path / "one-run.jsonl"
    assert main(["audit", "export", "--request-id", first, "-o", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()[:-1]]
    assert [(row["event_type"], row["request_id"]) for row in rows] == [("export", first)]
    assert _manifest(out)["manifest"]["filters"] == {"request_id": first}
    assert _ledger_events(cli_env, 1)[0][2]["filters"] == {"request_id": first}
    capsys.readouterr()
    assert main(["audit", "verify-export", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


@pytest.mark.parametrize("value", ["", "-", "cli-0123456789ABCDEF0123456789ABCDEF", "cli-0123456789abcdef",
                                   "0123456789abcdef0123456789abcdef\n", "cli-0123456789abcdef\x1b[2J<injected>"])
def test_a_request_id_that_is_no_request_id_is_a_usage_error_and_records_nothing(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str) -> None:
    """`--request-id` takes a request id as govrag makes one, as `request_id=` of the API does: anything else is a
    usage error, exit 2, that does not quote it; nothing is exported or recorded."""
    before = _ledger_events(cli_env, 1)
    with pytest.raises(SystemExit) as usage_error:
        main(["audit", "export", "--request-id", value, "-o", str(tmp_path / "out.jsonl")])
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert (usage_error.value.code, said) == (2, "govrag audit export: error: argument --request-id: not a request "
                                                 "id; give an API request's X-Request-ID (32 lower-case hex digits) "
                                                 "or a command run's (cli- and 32)")
    assert _ledger_events(cli_env, 1) == before and list(tmp_path.glob("out.jsonl*")) == []


USER_RULE = "1 to 255 printable characters, no line break nor control character"
DOCUMENT_ID_RULE = "1 to 36 printable characters, no line break nor control character"
# Characters --user and --document-id took unrefused, each then written into the export's ledger row and manifest.
CONTROLS = {"NUL": "\x00", "line feed": "\n", "escape": "\x1b[2J", "DEL": "\x7f", "C1 NEL": "\x85",
            "right-to-left override": "\u202e", "zero-width space": "\u200b"}


@pytest.mark.parametrize(("option", "rule"), [("--user", USER_RULE), ("--document-id", DOCUMENT_ID_RULE)],
                         ids=["user", "document-id"])
@pytest.mark.parametrize("control", CONTROLS.values(), ids=CONTROLS.keys())
def test_a_free_text_filter_with_a_control_character_is_a_usage_error_quoting_nothing(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, rule: str,
        control: str) -> None:
    """--user and --document-id were bounded by length alone, as `user=` and `document_id=` of the API were: a
    line break, NUL, an escape, DEL, a C1 control or a direction override was written into the export's ledger row.
    They go through the API's rule (audit.schemas): a usage error, exit 2, quoting none, nothing exported or
    recorded."""
    before = _ledger_events(cli_env, 1)
    with pytest.raises(SystemExit) as usage_error:
        main(["audit", "export", option, f"ab{control}forged", "-o", str(tmp_path / "out.jsonl")])
    said = capsys.readouterr().err
    assert (usage_error.value.code, said.strip().splitlines()[-1]) == (
        2, f"govrag audit export: error: argument {option}: {rule}")
    assert "forged" not in said
    assert _ledger_events(cli_env, 1) == before and list(tmp_path.glob("out.jsonl*")) == []


def test_a_decision_that_is_none_is_a_usage_error_quoting_nothing(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--decision took argparse's `choices`, whose refusal quotes the value back (an escape sequence, say, to the
    operator's terminal). It reads the API's `decision=` rule now: a usage error, exit 2, naming the decisions and not
    the value, nothing recorded; a decision the API takes is exported and recorded as given."""
    before = _ledger_events(cli_env, 1)
    with pytest.raises(SystemExit) as usage_error:
        main(["audit", "export", "--decision", "answered\x1b[2J<forged>", "-o", str(tmp_path / "out.jsonl")])
    said = capsys.readouterr().err
    assert (usage_error.value.code, said.strip().splitlines()[-1]) == (
        2, "govrag audit export: error: argument --decision: not a decision; give one of answered, refused, "
           "blocked, withheld, error, admin")
    assert "forged" not in said
    assert _ledger_events(cli_env, 1) == before and list(tmp_path.glob("out.jsonl*")) == []
    assert main(["audit", "export", "--decision", "refused", "-o", str(tmp_path / "out.jsonl")]) == 0
    assert _ledger_events(cli_env, 1)[0][2]["filters"] == {"decision": "refused"}


@pytest.mark.parametrize(("option", "value", "rule", "taken"), [
    ("--user", "x" * 256, USER_RULE, ("Zoë Łukasz 山田 <zoe@example.org>, service:ingest; " * 6)[:255]),
    ("--department", "hr\n", "not a department name (lower-case letters, digits, '-' or '_')", "hr"),
    ("--document-id", "x" * 37, DOCUMENT_ID_RULE, "0b9a3c1e-5f0d-4a6b-9c2e-7d8f1a2b3c4d"),
    ("--event-type", "retrievals", "not an event type the ledger records (`retrieval`, `export`, an admin action)",
     "retrieval")])
def test_an_export_filter_out_of_shape_is_a_usage_error_and_never_reaches_the_ledger(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str, rule: str,
        taken: str) -> None:
    """Each export writes its filters into the append-only ledger; the API bounds them (a 422), the command wrote any
    text there for good (a megabyte of --user, a department name with a line break). It reads them as the API reads
    its query parameters: a value out of shape is a usage error, exit 2, quoting none, nothing exported or recorded;
    one the API takes is exported and recorded as given."""
    before = _ledger_events(cli_env, 1)
    with pytest.raises(SystemExit) as usage_error:
        main(["audit", "export", option, value, "-o", str(tmp_path / "out.jsonl")])
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert (usage_error.value.code, said) == (2, f"govrag audit export: error: argument {option}: {rule}")
    assert _ledger_events(cli_env, 1) == before and list(tmp_path.glob("out.jsonl*")) == []
    assert main(["audit", "export", option, taken, "-o", str(tmp_path / "out.jsonl")]) == 0
    name = option.removeprefix("--").replace("-", "_").replace("user", "subject")
    assert _ledger_events(cli_env, 1)[0][2]["filters"] == {name: taken}


@pytest.mark.parametrize(("made", "said"), [(os.mkfifo, "not a regular file (a named pipe or a device is there)"),
                                           (Path.mkdir, "Is a directory")], ids=["named pipe", "folder"])
def test_a_manifest_file_that_is_no_regular_file_is_refused(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], made: Any, said: str) -> None:
    """verify-export asked whether FILE.manifest.json was a file, then opened it: one swapped for a named pipe between
    the two made the check wait for a writer for good, and a named pipe or a folder there was passed over as no
    manifest at all. It is opened once now, without waiting, and anything there but a regular file is refused in one
    line naming it (exit 2), not checked as if none were beside FILE."""
    out = tmp_path / "out.jsonl"
    manifest = tmp_path / "out.jsonl.manifest.json"
    assert main(["audit", "export", "-o", str(out)]) == 0
    manifest.unlink()
    made(manifest)
    capsys.readouterr()
    assert main(["audit", "verify-export", str(out)]) == 2
    assert capsys.readouterr() == ("", f"failed: {said}: {manifest}\n")
