"""The file a `govrag audit export -o FILE` writes, and its FILE.manifest.json: whole or not at all, 0600, whatever
another export of the same path or the disk does meanwhile; against a PostgreSQL database of the test's own."""

from __future__ import annotations

import errno
import json
import os
import resource
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from api import cli_audit
from api.cli import main
from tests.support.govrag_process import run_govrag

INTERRUPTED = "interrupted; run the same command again to go on\n"
DISK_FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a write to a full disk raises (no file named)


def _manifest(export: Path) -> dict[str, object]:
    """The manifest an export file ends with."""
    return json.loads(export.read_text(encoding="utf-8").splitlines()[-1].removeprefix("# manifest "))


def _export_beside_another(out: Path, monkeypatch: pytest.MonkeyPatch,
                           other_stops: BaseException | None) -> dict[str, int]:
    """Two `govrag audit export -o out` at once, in threads: the other writes its first line and, while this one has
    written all of its own, both files open, ends (`other_stops` raised by its writer, or its export finished);
    then this one ends. Their exit codes by name ("this", "other")."""
    copy = cli_audit._copy
    both_writing = threading.Barrier(2, timeout=120)
    other_ended = threading.Event()

    def copy_beside_the_other(lines: Iterator[str], handle: TextIO) -> str:
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
    return codes


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
    file replaced allowed: an export names who asked what."""
    (exports := tmp_path / "exports").mkdir()
    out = exports / "out.jsonl"
    out.write_text("last week's export\n")
    out.chmod(0o644)

    codes = _export_beside_another(out, monkeypatch, other_stops)

    assert codes == {"other": other_code, "this": 0}
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
    no traceback; the earlier export and its manifest are left as they were and no hidden file is left beside them."""
    (exports := tmp_path / "exports").mkdir()
    out = exports / "out.jsonl"
    assert main(["audit", "export", "-o", str(out)]) == 0
    capsys.readouterr()
    earlier = {path.name: path.read_bytes() for path in exports.iterdir()}
    assert sorted(earlier) == ["out.jsonl", "out.jsonl.manifest.json"]

    # Its export is longer (the earlier one's row more); the limit binds every file it writes: the checkpoint mirror
    # it appends to (longer than the export) is a new one, which its checkpoint's line alone does not fill.
    limit = f"--fsize={len(earlier['out.jsonl'])}"
    refused = run_govrag(["audit", "export", "-o", str(out)], prefix=["prlimit", limit],
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1",
                              "GOVRAG_AUDIT_CHECKPOINT_FILE": str(tmp_path / "mirror.jsonl")})

    assert (refused.returncode, refused.stdout, refused.stderr) == (2, "", f"failed: File too large: {out}\n")
    assert {path.name: path.read_bytes() for path in exports.iterdir()} == earlier


def test_a_manifest_the_disk_refuses_midway_leaves_the_earlier_one_and_no_hidden_file(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """FILE.manifest.json was written in place, after FILE was renamed into place: a disk that refused it midway (a
    full disk; here this process's file size limit, below the manifest's length while it is written, the kernel
    refusing the write past it with EFBIG) left half a manifest. Now the earlier manifest is left as it was and no
    hidden file beside it; the export says so in one line naming FILE, exit 2, and FILE ends with its own manifest."""
    (exports := tmp_path / "exports").mkdir()
    out = exports / "out.jsonl"
    assert main(["audit", "export", "-o", str(out)]) == 0
    capsys.readouterr()
    earlier = (exports / "out.jsonl.manifest.json").read_bytes()
    write_manifest = cli_audit._write_manifest

    def on_a_full_disk(last_line: str, output: str) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(last_line) // 2, hard))  # Python ignores SIGXFSZ: EFBIG
        try:
            write_manifest(last_line, output)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    monkeypatch.setattr(cli_audit, "_write_manifest", on_a_full_disk)
    assert (main(["audit", "export", "-o", str(out)]), capsys.readouterr().err) == (
        2, f"failed: File too large: {out}\n")
    assert sorted(path.name for path in exports.iterdir()) == ["out.jsonl", "out.jsonl.manifest.json"]
    assert (exports / "out.jsonl.manifest.json").read_bytes() == earlier
    assert _manifest(out) != json.loads(earlier)  # FILE is the new export, whole, ending with its own manifest


@pytest.mark.parametrize("made_a_folder", ["out.jsonl", "out.jsonl.manifest.json"])
def test_a_file_made_a_folder_while_the_export_is_written_is_named_not_the_hidden_file(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        made_a_folder: str) -> None:
    """FILE (or FILE.manifest.json) made a folder after the export checked it, while it was written: the rename into
    place was refused with the system's error naming the hidden file written first (`.out.jsonl.partial`), which the
    user never named nor sees. Now it names the path, as an export to a folder says, exit 2, and no hidden file is
    left."""
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
