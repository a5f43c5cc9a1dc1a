"""`govrag ingest PATH`: bulk upload with progress and a summary (issue 3)."""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from api.cli_args import api_url
from core.errors import EmbeddedStoreHeld, ErrorCode
from core.settings import Settings, get_settings

if TYPE_CHECKING:
    import httpx

    from api.cli_failures import Failure
    from ingestion.schemas import DocumentStatusOut, UploadAccepted
    from workers.dispatch import JobsHeld

FINAL_STATES = ("ready", "failed", "quarantined", "rejected")
INTERNAL_FAILURE = "internal error while ingesting the file"
UNAVAILABLE, NOT_ATTEMPTED, PENDING = "unavailable", "not attempted", "pending"
GATEWAY_ERRORS = (502, 504)  # a reverse proxy's answer for an API behind it that is down or does not answer
# Who runs a job this process could neither finish nor give back (`dispatch.give_back`), or that another one has
LEFT_TO_THE_API = "a worker, or `govrag serve` at its next start, ingests it"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stop:
    """Why a run stopped at a file (every file after it would meet it too), and when running it again goes on."""

    why: str  # "the database is unavailable"
    again: str  # "once it is back"
    # A configuration to fix first (the API's department key that does not open): said, exit code and all, as the
    # in-process command says it before any file (`_refused_at_start`) when the run stopped at its first file
    refusal: Failure | None = None


@dataclass(frozen=True)
class Outcome:
    """What happened to one file (reasons are the service's own, never document text)."""

    path: str
    status: str
    reason: str = ""
    stop: Stop | None = None  # the run stopped at this file: an outage, or the API refusing the token


def _unavailable(dependency: str) -> Stop:
    return Stop(f"the {dependency} is unavailable", "once it is back")


def _outage(exc: BaseException) -> Stop | None:
    """What stops an in-process run at a file, as a worker waits it out (`ingestion.service.outage`): a dependency
    that went away, named, or the master key refused under the running command (its key file deleted, unreadable or
    replaced), said in its line without the key file's path. None for any other failure: what is one is
    `ingestion.service.outage`'s to tell, here only said."""
    from core.errors import MasterKeyRefused
    from ingestion.service import outage

    if (what := outage(exc)) is None:
        return None
    return Stop(exc.client_message, "once that is fixed") if isinstance(exc, MasterKeyRefused) else _unavailable(what)


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `ingest`."""
    ingest = commands.add_parser("ingest", help="upload every file under PATH into a department")
    ingest.add_argument("path", type=Path)
    ingest.add_argument("--department", required=True)
    ingest.add_argument("--acl-group", action="append", default=[], dest="acl_groups",
                        help="a group that may read the files (repeatable or comma-separated, as the API takes them)")
    ingest.add_argument("--classification", default="internal",
                        choices=("public", "internal", "confidential", "restricted"))
    ingest.add_argument("--api-url", type=api_url, help="upload through a running API (default: in this process)")
    ingest.add_argument("--token", default=os.environ.get("GOVRAG_INGEST_TOKEN"),
                        help="bearer token for --api-url (default: $GOVRAG_INGEST_TOKEN; on the command line other "
                             "users can read it in `ps`)")
    ingest.add_argument("--as-user", default="cli", help="uploader recorded for in-process ingestion")
    ingest.set_defaults(run=ingest_command)


def files_under(path: Path) -> tuple[list[Path], int]:
    """The regular files to ingest, sorted, and how many hidden ones were skipped (a name below PATH starting with
    `.`; PATH itself may be `../inbox` or lie in a hidden folder)."""
    if path.is_file():
        return [path], 0
    found = [p for p in path.rglob("*") if p.is_file()]
    visible = sorted(p for p in found if not any(part.startswith(".") for part in p.relative_to(path).parts))
    return visible, len(found) - len(visible)


def ingest_command(args: argparse.Namespace) -> int:
    """Upload a folder with a progress bar, then print a ready / quarantined / failed table."""
    from api.cli_failures import EXIT_INTERRUPTED
    from core.errors import GovragError
    from ingestion import scratch
    from ingestion.schemas import parse_acl_groups

    try:
        args.acl_groups = parse_acl_groups(args.acl_groups)  # as the API reads its form field
    except GovragError as exc:
        Console(stderr=True).print(exc.message)
        return 2
    if not args.path.exists():  # a mistyped path is not an empty folder
        Console(stderr=True).print(f"no such file or folder: {args.path}", markup=False)
        return 2
    files, hidden = files_under(args.path)
    if not files:  # an empty folder, or one of hidden files only, is a mistake too
        Console(stderr=True).print(_nothing_found(args.path, hidden), markup=False)
        return 2
    if not args.api_url and (refused := _refused_at_start(args)):  # an API answers for itself
        message, code = refused
        Console(stderr=True).print(message, markup=False)
        return code
    console = Console(stderr=True)
    if hidden:
        console.print(_hidden_skipped(hidden))
    handed_back: list[Path] = []  # in process, the files a Ctrl-C or a SIGTERM handed back (`_ingest_file`)
    uploader = _api_uploader(args) if args.api_url else _inprocess_uploader(args, handed_back)
    outcomes: list[Outcome] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:  # a SIGTERM stops the run as a Ctrl-C does (`scratch.stopped_on_sigterm`)
        with scratch.stopped_on_sigterm(), Progress(*columns, console=console) as progress:
            task = progress.add_task("ingesting", total=len(files))
            for outcome in uploader(files):
                outcomes.append(outcome)
                progress.advance(task)
    except KeyboardInterrupt as interrupt:  # the file's jobs were handed back (`_ingest_file`); no traceback to read
        handed = None if args.api_url else len(handed_back)  # through an API, what it accepted is the API's to ingest
        console.print(_interrupted_line(interrupt, files[len(outcomes):], handed), markup=False)
        if isinstance(interrupt, scratch.Terminated):  # its private directory removed, no plaintext copy left
            scratch.end_by_sigterm()
        return EXIT_INTERRUPTED
    return _report(outcomes, console)


def _report(outcomes: list[Outcome], console: Console) -> int:
    """Print the summary table, and the line saying why the run stopped if it did; the exit code. A refusal that
    stopped it at the first file, nothing ingested, is said alone, as in process (`Stop.refusal`)."""
    stopped_by = next((o.stop for o in outcomes if o.stop), None)
    refusal = stopped_by.refusal if stopped_by else None
    if refusal is not None and outcomes[0].stop is stopped_by:
        console.print(_nothing_ingested(refusal), markup=False)
        return refusal.exit_code
    Console().print(summary_table(outcomes))
    if stopped_by:
        console.print(_stopped_line(stopped_by, sum(o.status == NOT_ATTEMPTED for o in outcomes)), markup=False)
    if refusal is not None:
        return refusal.exit_code
    return 0 if all(o.status in ("ready", "quarantined", "duplicate") for o in outcomes) else 1


def _refused_at_start(args: argparse.Namespace) -> tuple[str, int] | None:
    """Why in-process ingestion cannot start, before any document row is written, and the exit code; None if it can.
    A dependency unavailable already is said as one mid-run is (exit 1), never with its address; so is a Ctrl-C (130)
    and a department key that does not open (exit 2), each as `cli_failures.failure` says it. The schema is what
    `govrag serve` finds: migrated in development (a fresh embedded default too), and in production at another revision
    than the code's SchemaMismatch, said by `cli.main` as `govrag serve` and `govrag worker` say it."""
    from api.cli_failures import failure
    from core import keystore, migrate

    settings = get_settings()
    try:
        migrate.require_head_for_command(settings)
        keystore.require_master_opens(settings)
        if _unknown_departments(settings, [args.department]):
            return f"no such department: {args.department}; nothing ingested", 2
        _open_department_key(settings, args.department)  # altered: DepartmentKeyUnreadable, every file would fail
        if held := _store_held(settings):
            return (f"{held}; or upload through the running API: govrag ingest {args.path} --department "
                    f"{args.department} --api-url http://HOST:PORT, the token in $GOVRAG_INGEST_TOKEN; nothing "
                    "ingested", 1)
        if not _blob_store_opened(settings):  # the error logged just before says why and what to do
            return f"the blob store at {settings.blob_dir} cannot be used (see the error above); nothing ingested", 1
    except (Exception, KeyboardInterrupt) as exc:
        if (stop := failure(exc)) is None:
            raise
        return _nothing_ingested(stop), stop.exit_code
    return None


def _nothing_ingested(failure: Failure) -> str:
    """A failure that stopped the command before it ingested anything (`cli_failures.failure`), said in one line."""
    return f"{failure.why}; nothing ingested: run the same command again {failure.when}"


def _interrupted_line(interrupt: KeyboardInterrupt, left: list[Path], handed_back: int | None) -> str:
    """What a Ctrl-C or a SIGTERM stopped: the file being ingested, if any, how many were left and, in process, how
    many of them were handed back to wait."""
    from ingestion import scratch

    why = "stopped by SIGTERM" if isinstance(interrupt, scratch.Terminated) else "interrupted"
    handed = "" if handed_back is None else f", {handed_back} handed back to wait"
    at = f" at {left[0]} ({len(left)} file{'s' * (len(left) != 1)} not done{handed})" if left else ""
    return f"{why}{at}; run the same command again to go on (files already ingested show as duplicates)"


def _stopped_line(stop: Stop, not_attempted: int) -> str:
    return (f"stopped: {stop.why} ({not_attempted} file{'s' * (not_attempted != 1)} not attempted); run the same "
            f"command again {stop.again} (files already ingested show as duplicates)")


def _nothing_found(path: Path, hidden: int) -> str:
    """Why a folder holds nothing to ingest."""
    skipped = f" ({_hidden_skipped(hidden)})" if hidden else ""
    return f"no files found under {path}{skipped}; nothing ingested"


def _hidden_skipped(hidden: int) -> str:
    return f"{hidden} hidden file{'s' * (hidden != 1)} skipped (a name starting with '.')"


def summary_table(outcomes: list[Outcome]) -> Table:
    """One row per file, then the totals per status."""
    table = Table(title="ingestion summary")
    for column in ("file", "status", "reason"):
        table.add_column(column)
    for outcome in outcomes:
        table.add_row(outcome.path, outcome.status, outcome.reason)
    totals: dict[str, int] = {}
    for outcome in outcomes:
        totals[outcome.status] = totals.get(outcome.status, 0) + 1
    table.caption = ", ".join(f"{status}: {count}" for status, count in sorted(totals.items()))
    return table


def _inprocess_uploader(args: argparse.Namespace,
                        handed_back: list[Path]) -> Callable[[list[Path]], Iterator[Outcome]]:
    """Accept and ingest each file here, synchronously (the embedded store allows one process). A dependency that
    goes away stops the run at that file: every file after it would meet the outage too. A file a Ctrl-C or a
    SIGTERM stopped is added to `handed_back` once its jobs are."""
    settings = get_settings()
    return lambda files: _until_stopped(files, lambda path: _ingest_file(settings, args, path, handed_back))


def _until_stopped(files: list[Path], ingest: Callable[[Path], Outcome]) -> Iterator[Outcome]:
    """Each file's outcome, until one stopped the run (an outage, a token refused); the files after it are
    `not attempted`."""
    for index, path in enumerate(files):
        outcome = ingest(path)
        yield outcome
        if outcome.stop:
            for rest in files[index + 1:]:
                yield Outcome(str(rest), NOT_ATTEMPTED, f"stopped: {outcome.stop.why}")
            return


@dataclass
class _FileRun:
    """How far the ingestion of one file got: its document, once accepted (or found accepted before), and the jobs
    this process took to run, as (document id, job id), held from the sweep of any API on the same database until
    the file's run ends (`held`, released by `_ingest_file` once what it took is given back; an e-mail's attachments
    are held from their acceptance on, before their turn comes: `spawn_attachments`), and the one of them whose run
    or attachment step is going on (`running`): the one that gave up when either raises."""

    held: JobsHeld
    document_id: str | None = None
    taken: list[tuple[str, str]] = field(default_factory=list)
    running: tuple[str, str] | None = None

    def take(self, document_id: str, job_id: str) -> None:
        """Record a job this process runs itself, and hold it (`dispatch.JobsHeld`)."""
        self.taken.append((document_id, job_id))
        self.running = (document_id, job_id)
        self.held.hold(job_id)

    def take_waiting(self, settings: Settings, document_id: str) -> str | None:
        """The document's job waiting with nobody to run it, if any, held and recorded as sent in one step
        (`dispatch.take_waiting_job`), and recorded as one this process runs itself."""
        from workers.dispatch import take_waiting_job

        job_id = take_waiting_job(settings, document_id, self.held)
        if job_id is not None:
            self.taken.append((document_id, job_id))
            self.running = (document_id, job_id)
        return job_id

    def spawn_attachments(self, settings: Settings, document_id: str,
                          raised: Sequence[UploadAccepted] = ()) -> list[UploadAccepted]:
        """The attachments of an e-mail whose run ended: those its run raised to its level and queued again
        (`raised`, as `run_ingestion` returned them), then those its step takes (`spawn_attachments`), each job held at
        once: those waiting their turn behind the first one's run are this process's to run, not the sweep's to send
        once their grace is over (a worker then ran one beside this process). Each is `take`n as its turn comes."""
        from ingestion import service as ingestion_service

        self.hold(raised)  # before the step, which may raise: queued with the run's end, this process's to run
        children = ingestion_service.spawn_attachments(settings=settings, document_id=document_id)
        self.running = None  # the document's run and step ended
        self.hold(children)
        return [*raised, *children]

    def hold(self, jobs: Sequence[UploadAccepted]) -> None:
        """Hold jobs queued for this process to run in their turn, as an e-mail's attachments are held."""
        for job in jobs:
            self.held.hold(job.job_id)

    def own_job(self) -> str | None:
        """The job of the file's own document, if this process took one."""
        return next((job for document, job in self.taken if document == self.document_id), None)

    def outcome(self, settings: Settings, path: Path, otherwise: Outcome) -> Outcome:
        """The file's outcome as its own document's job ended, if this process took one; else `otherwise`."""
        own_job = self.own_job()
        return _job_outcome(settings, path, own_job) if own_job else otherwise

    def give_back(self, settings: Settings) -> bool:
        """Hand the jobs taken back to wait, unsent (`dispatch.give_back`); whether the database recorded it."""
        from workers import dispatch

        return dispatch.give_back(settings, [job for _, job in self.taken])


def _ingest_file(settings: Settings, args: argparse.Namespace, path: Path, handed_back: list[Path]) -> Outcome:
    """Accept and ingest one file. A dependency that went away (the database, the vector store, the blob volume, as
    `unavailable_dependency` tells them for the Celery path) or the master key refused (`_outage`) is named, and what
    the file's run took is given back to wait, never failed (`_stopped`), as it is on a Ctrl-C or a SIGTERM (then
    the file is added to `handed_back`); any other failure is handled by `_ingest_or_fail`."""
    from workers.dispatch import JobsHeld

    run = _FileRun(JobsHeld(settings))
    try:
        return _ingest_or_fail(settings, args, path, run)
    except KeyboardInterrupt:  # the same command run again takes the jobs up (`_go_on`)
        if run.taken and run.give_back(settings):
            handed_back.append(path)
        raise
    except Exception as exc:
        if (stop := _outage(exc)) is None:
            raise
        return _stopped(settings, path, stop, run)
    finally:
        run.held.release()


def _ingest_or_fail(settings: Settings, args: argparse.Namespace, path: Path, run: _FileRun) -> Outcome:
    """Accept and ingest one file. A refusal says why; any failure but an outage is a generic `failed` (its message
    may quote the file) and fails each document it left unfinished; either way the run goes on."""
    try:
        return _accept_and_ingest(settings, args, path, run)
    except Exception as exc:
        if _outage(exc) is not None:
            raise  # stops the run (`_ingest_file`)
        failure = type(exc).__name__
    return _failed(settings, path, run, failure)


def _accept_and_ingest(settings: Settings, args: argparse.Namespace, path: Path, run: _FileRun) -> Outcome:
    from core.db import unit_of_work
    from core.errors import GovragError, unavailable_dependency
    from ingestion import service as ingestion_service
    from ingestion.schemas import Classification

    data = path.read_bytes()
    try:
        with unit_of_work(settings.resolved_database_url) as session:
            accepted = ingestion_service.accept_upload(
                session=session, settings=settings, uploaded_by=args.as_user, department=args.department,
                filename=path.name, data=data, title=path.name, acl_groups=args.acl_groups,
                classification=Classification(args.classification))
    except GovragError as exc:
        if unavailable_dependency(exc) is not None:
            raise  # raised from an outage: no refusal of the file; it stops the run (`_ingest_file`)
        if (status := _not_taken(exc.code)) == "duplicate":
            return _go_on(settings, args, path, data, exc.message, run)
        return Outcome(str(path), status, exc.message)
    run.document_id = accepted.document_id
    _ingest_with_attachments(settings, accepted.document_id, accepted.job_id, run)
    return _job_outcome(settings, path, accepted.job_id)


def _failed(settings: Settings, path: Path, run: _FileRun, failure: str) -> Outcome:
    """A file whose acceptance or ingestion raised anything but a refusal or an outage: each job its run took and
    left unfinished fails with a generic reason; the file shows its document's status (an e-mail whose attachment
    step failed keeps its own), else a generic `failed`."""
    from ingestion import service as ingestion_service

    if run.document_id is None:
        logger.warning("accepting a file failed: %s", failure)
    else:
        logger.warning("ingesting document %s failed: %s", run.document_id, failure)
    passed_on = [step for document_id, job_id in run.taken
                 for step in ingestion_service.mark_failed(settings=settings, document_id=document_id, job_id=job_id,
                                                           reason=INTERNAL_FAILURE,
                                                           pass_on=(document_id, job_id) == run.running)]
    _run_passed_on(settings, run, passed_on)
    return run.outcome(settings, path, otherwise=Outcome(str(path), "failed", INTERNAL_FAILURE))


def _run_passed_on(settings: Settings, run: _FileRun, steps: list[UploadAccepted]) -> None:
    """Run here, as the file's other jobs, the attachment steps of the e-mails that content the one that gave up was
    to take falls to (`mark_failed`): with no API running, nothing else would ever send them. One that raises (not an
    outage: that stops the run, `_ingest_file`) fails in turn, passing the content on to the next e-mail carrying it,
    and the others go on."""
    from ingestion import service as ingestion_service

    run.running = None
    run.hold(steps)
    for step in steps:
        try:
            _ingest_with_attachments(settings, step.document_id, step.job_id, run)
        except Exception as exc:
            if _outage(exc) is not None:
                raise
            document_id, job_id = run.running or (step.document_id, step.job_id)
            logger.warning("ingesting document %s failed: %s", document_id, type(exc).__name__)
            _run_passed_on(settings, run, ingestion_service.mark_failed(
                settings=settings, document_id=document_id, job_id=job_id, reason=INTERNAL_FAILURE))


def _stopped(settings: Settings, path: Path, stop: Stop, run: _FileRun) -> Outcome:
    """A file whose ingestion an outage stopped (`_outage`). Nothing failed: the jobs its run took wait again, given
    back unsent as a worker's retry hands its job back (`dispatch.give_back`), for the same command run again to
    take (`_go_on`); with the database away even that cannot be recorded, and an API runs them again."""
    if run.document_id is None:
        what = "nothing was stored"
    elif run.give_back(settings):
        what = f"accepted, not ingested yet: run the same command again {stop.again}"
    else:
        what = f"accepted, not ingested yet: {LEFT_TO_THE_API}"
    return Outcome(str(path), UNAVAILABLE, f"{stop.why}; {what}", stop=stop)


def _job_outcome(settings: Settings, path: Path, job_id: str) -> Outcome:
    from core.db import unit_of_work
    from ingestion import service as ingestion_service

    with unit_of_work(settings.resolved_database_url) as session:
        status = ingestion_service.job_status(session=session, can_see=lambda *_: True, job_id=job_id)
    return Outcome(str(path), status.status, status.error or "")


def _ingest_with_attachments(settings: Settings, document_id: str, job_id: str, run: _FileRun) -> None:
    """Ingest a document, then its attachments, theirs, and so on (spawn_attachments bounds the depth). Each job is
    held and recorded as sent first: this process runs it, and an API's sweep must not send it to a worker as well."""
    from ingestion import service as ingestion_service
    from workers.dispatch import record_sent

    run.take(document_id, job_id)
    record_sent(settings, [job_id])
    raised = ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=job_id)
    for child in run.spawn_attachments(settings, document_id, raised):
        _ingest_with_attachments(settings, child.document_id, child.job_id, run)


def _go_on(settings: Settings, args: argparse.Namespace, path: Path, data: bytes, refusal: str,
           run: _FileRun) -> Outcome:
    """A file the department holds already: a duplicate, unless an outage stopped its ingestion (this command's, run
    before); what waits of it is ingested now (`_carry_on`), and what another process has is `pending`."""
    from core.db import unit_of_work
    from ingestion import service as ingestion_service

    with unit_of_work(settings.resolved_database_url) as session:
        run.document_id = ingestion_service.live_copy(session=session, department=args.department, data=data)
    if run.document_id is None:  # retired since its upload was refused
        return Outcome(str(path), "duplicate", refusal)
    accepted_before = f"accepted before as document {run.document_id}"
    if not _carry_on(settings, run.document_id, run):
        return Outcome(str(path), PENDING, f"{accepted_before}, not ingested yet: another process has it, or "
                                           f"{LEFT_TO_THE_API}")
    # its job's outcome: that upload's groups and classification, not this command's; a duplicate keeps its refusal
    outcome = run.outcome(settings, path, otherwise=Outcome(str(path), "duplicate", refusal))
    return replace(outcome, reason=outcome.reason or f"{accepted_before}, ingested now")


def _carry_on(settings: Settings, document_id: str, run: _FileRun) -> bool:
    """Go on with a document accepted before, as an outage may have left it: run its job if it waits with nobody to
    run it (`_FileRun.take_waiting`), take its attachments if that step never ran, and the same for each attachment.
    Whether it and its attachments have all finished."""
    from core.models import UNFINISHED
    from ingestion import service as ingestion_service
    raised: list[UploadAccepted] = []
    if _status(settings, document_id).status in UNFINISHED:  # a finished one has no job waiting: no sweep lock
        if (job_id := run.take_waiting(settings, document_id)) is not None:
            raised = ingestion_service.run_ingestion(settings=settings, document_id=document_id, job_id=job_id)
    for child in run.spawn_attachments(settings, document_id, raised):
        _ingest_with_attachments(settings, child.document_id, child.job_id, run)
    document = _status(settings, document_id)
    attachments_finished = [_carry_on(settings, child_id, run) for child_id in document.attachment_ids]
    return document.status not in UNFINISHED and all(attachments_finished)


def _status(settings: Settings, document_id: str) -> DocumentStatusOut:
    from core.db import unit_of_work
    from ingestion import service as ingestion_service

    with unit_of_work(settings.resolved_database_url) as session:
        return ingestion_service.document_status(session=session, can_see=lambda *_: True, document_id=document_id)


def _api_uploader(args: argparse.Namespace) -> Callable[[list[Path]], Iterator[Outcome]]:
    """Upload through the HTTP API and poll each document to a final state."""
    import httpx

    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}

    def run(files: list[Path]) -> Iterator[Outcome]:
        with httpx.Client(base_url=args.api_url, headers=headers, timeout=60) as http:
            yield from _until_stopped(files, lambda path: _upload(http, args, path))

    return run


class _ApiUnavailable(Exception):
    """The API cannot be reached (no answer, or a gateway's 502 or 504 for it), or answered 503 (a dependency of its
    own unavailable, a key that does not open): every file after this one would meet it too. `message` is the file's
    reason, `stop` the run's."""

    def __init__(self, message: str, stop: Stop) -> None:
        super().__init__(message)
        self.message, self.stop = message, stop


def _upload(http: httpx.Client, args: argparse.Namespace, path: Path) -> Outcome:
    """Upload one file and poll its document to a final state; an outage stops the run there, as in process."""
    form = {"department": args.department, "classification": args.classification, "acl_groups": args.acl_groups,
            "title": path.name}
    document_id = None
    try:
        response = _request(http, "POST", "/v1/documents", data=form,
                            files={"file": (path.name, path.read_bytes())})
        if response.status_code != 202:
            return _error_outcome(str(path), response)
        document_id = response.json()["document_id"]
        return _poll(http, str(path), document_id)
    except _ApiUnavailable as stop:
        accepted = f"; accepted as document {document_id}, not ingested yet: the API ingests it" if document_id else ""
        return Outcome(str(path), UNAVAILABLE, stop.message + accepted, stop=stop.stop)


def _request(http: httpx.Client, method: str, url: str, **kwargs: object) -> httpx.Response:
    """The API's answer; `_ApiUnavailable` if it cannot be reached (named by its address, which holds no credentials:
    `api_url`; no answer, or a reverse proxy's 502 or 504 for it) or answers 503 (`_stop_503`)."""
    import httpx

    api = f"API at {http.base_url}"
    try:
        response = http.request(method, url, **kwargs)  # type: ignore[arg-type]
    except httpx.TransportError as error:
        raise _ApiUnavailable(f"the {api} cannot be reached ({type(error).__name__})", _unavailable(api)) from None
    if response.status_code in GATEWAY_ERRORS:  # the proxy in front answered for an API it could not reach
        raise _ApiUnavailable(f"the {api} cannot be reached ({response.status_code} {response.reason_phrase} "
                              "from a gateway)", _unavailable(api))
    if response.status_code == 503:
        error = _api_error(response)
        raise _ApiUnavailable(_error_message(response, error), _stop_503(api, error))
    return response


def _stop_503(api: str, error: _ApiError | None) -> Stop:
    """Why the API's 503 stops the run (its 503 bodies are client-safe, api/errors.py): the outage of the dependency
    its body's `dependency` names, as in process (`_outage`; never read from the message, which may be reworded), or
    its reason with its code (a master key that does not open; a department key that does not open is also the
    refusal the in-process command says, exit 2: `Stop.refusal`); for a 503 without the API's error body (`error`
    None: a proxy's page), the API unavailable."""
    from api.cli_failures import department_key_failure

    if error is None:
        return _unavailable(api)
    if error.dependency is not None:
        return _unavailable(error.dependency)
    said = f"the {api} answered 503 {error.code}: {error.message}"
    if error.code == ErrorCode.department_key_unreadable.name:  # missing or altered: as the in-process command says it
        refusal = department_key_failure(error.message)
        return Stop(said, refusal.when, refusal)
    return Stop(said, "once that is fixed")


class _ApiError(NamedTuple):
    """The API's error body (api/errors.py): its code, message, and the dependency an outage's 503 names."""

    code: str
    message: str
    dependency: str | None


def _api_error(response: httpx.Response) -> _ApiError | None:
    """The API's error body, or None for any other body: read once per answer, and handed to what reads it."""
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return None
    dependency = error.get("dependency")  # a name, or absent: anything else names nothing
    return _ApiError(code, message, dependency if isinstance(dependency, str) and dependency else None)


def _error_message(response: httpx.Response, error: _ApiError | None) -> str:
    """The message of the API's error body (`error`), else the start of whatever answered (a proxy's page, say)."""
    return response.text[:200] if error is None else error.message


def _poll(http: httpx.Client, path: str, document_id: str, timeout: float = 600.0) -> Outcome:
    """The document's final state. An error answer (a token refused, a document gone, a 429, a 500) ends the poll at
    once, with the API's message (`refused` or `failed` by what it means: `_not_taken`), rather than asking again
    until the timeout, for every file (an outage stops the run: `_request`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = _request(http, "GET", f"/v1/documents/{document_id}")
        if not response.is_success:
            return _error_outcome(path, response, f"; accepted as document {document_id}, its outcome not known here")
        body = response.json()
        if body.get("status") in FINAL_STATES:
            return Outcome(path, body["status"], body.get("error") or body.get("review_reason") or "")
        time.sleep(0.5)
    return Outcome(path, PENDING, "still processing when the CLI stopped waiting")


def _error_outcome(path: str, response: httpx.Response, after: str = "") -> Outcome:
    """A file the API answered with an error (but a 503: `_request`): `refused`, `failed` or `duplicate` by its
    code (`_not_taken`), with its message and `after`; a 401 stops the run."""
    error = _api_error(response)
    message = _error_message(response, error)
    return Outcome(path, _not_taken(_answer_code(response, error)), message + after,
                   stop=_token_refused(response, message))


def _token_refused(response: httpx.Response, message: str) -> Stop | None:
    """A 401 stops the run: the token (never shown) is no longer accepted, and every request after it would be
    refused too."""
    return Stop(f"the API refused the token ({message})", "with a valid token") if response.status_code == 401 else None


def _not_taken(code: ErrorCode) -> str:
    """The table's status of a file the service answered with an error, in process or through the API, by its code
    alone (never its message's wording): `duplicate` for `duplicate_upload`, `refused` for any other code that refuses
    the user's input (the file, the command's arguments, the token), else `failed`, the deployment's own failure
    (`ErrorCode.refuses_input`, as `govrag`'s one-line failures say "refused:" or "failed:")."""
    if code is ErrorCode.duplicate_upload:
        return "duplicate"
    return "refused" if code.refuses_input else "failed"


def _answer_code(response: httpx.Response, error: _ApiError | None) -> ErrorCode:
    """The code of the API's error answer (`error`); for a code this CLI does not know or a body not the API's (a
    proxy's page), the one its HTTP status stands for: a 4xx refuses the request, anything else is a failure."""
    if error is not None and error.code in ErrorCode.__members__:
        return ErrorCode[error.code]
    return ErrorCode.invalid_request if response.is_client_error else ErrorCode.internal


def _store_held(settings: Settings) -> EmbeddedStoreHeld | None:
    """Why in-process ingestion cannot write vectors here (another process holds the embedded store), or None; a
    Qdrant server that does not answer raises `Unavailable` (it is only contacted once a file is accepted)."""
    from retrieval.store import open_vector_store

    try:
        open_vector_store(settings).ping()
    except EmbeddedStoreHeld as held:
        return held
    return None


def _blob_store_opened(settings: Settings) -> bool:
    """Open the blob store, as any process's start does (`blobs.open_at_start`): False when it refuses the directory
    (its volume not mounted, another store there, a directory it cannot write...), where every file would fail
    (nothing to ingest into, unlike a server, which still answers queries)."""
    from core import blobs

    return blobs.open_at_start(settings.blob_dir, settings.resolved_database_url)


def _open_department_key(settings: Settings, department: str) -> None:
    """Open the department's key, as each file's acceptance would: DepartmentKeyUnreadable when its key row no longer
    opens under the master key (altered in the database), said before any file rather than as every file failing."""
    from core.db import unit_of_work
    from core.keystore import keystore_for

    with unit_of_work(settings.resolved_database_url) as session:
        keystore_for(settings).department_key(session=session, department=department)


def _unknown_departments(settings: Settings, named: list[str]) -> list[str]:
    """The names given with --department that are not departments (a typo would otherwise be skipped silently)."""
    from authz import service as authz_service
    from core.db import unit_of_work

    with unit_of_work(settings.resolved_database_url) as session:
        return authz_service.departments_named(session=session, named=named)[1]
