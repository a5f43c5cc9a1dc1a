"""Sending ingestion jobs to the broker. The database is the record of what must run; the broker only carries it.

A job row is committed (status `queued`, `sent_at` empty) with the work it describes; `send_job` then publishes its
task and stamps `sent_at` (`send_jobs` a batch of jobs at a time: their tasks, then one stamp, which a publish raising
midway does not skip; `govrag ingest` in
process stamps the jobs it runs itself, holds them while it runs them (`JobsHeld`), and gives back unstamped those an
outage stopped: `give_back`, `take_waiting_job`). A broker that
refuses leaves the job unsent, not lost: `sweep_jobs` (run by a thread in every API process, core/sweeper.py) sends
each job still unsent some seconds after it was created — the broker was down, or the API died between its commit and
the send.
An upload whose job is not sent says so once; a sweep raises `Unavailable("broker")` once it has done what it can,
and the Sweeper says so once per outage, not once per round or per job.
A job left `processing` with no run behind it goes again too (`resend_stalled`). On the embedded default the broker
lives in the API's memory, so at start-up it holds nothing: every unfinished job marked sent is sent again at once
(`resend_unfinished`); one never sent waits for the sweep's grace like any other (`govrag ingest` may have just
accepted it, and holds it only afterwards).

A job `queued` and sent has one rule (`resend_lost`): sent longer ago than the same grace, and its task held by the
broker nowhere — neither waiting in the queue nor taken by a worker and not yet acknowledged — it has no run left, and
is sent again. A restarted Redis lost its task; or a re-index handed the job back (ingestion/quarantine.py) while it
was `processing` with its run dead (the worker killed, or the run gave up during a database outage and could not
record it): `queued` again and still marked sent, no other step would ever send it. A run still going keeps its task
taken (late acks) while it notices the hand-back and goes round again itself, under the new rules
(ingestion/service.py); a task waiting behind a long queue is held too: neither is sent twice. Redis is read for its
queue and its unacknowledged tasks; the in-memory broker for its queue and for the tasks this process's worker holds
(its one worker runs in this process, workers/inprocess.py).

The sweep never waits for a job row: each step takes only the rows no other transaction holds (`_unheld`), so it
deadlocks with nothing, whatever order others take job rows in: a re-index handing back jobs (in its documents' row
order, ingestion/quarantine.py), a run's claim or end, an uploader marking its job sent, `govrag ingest` running it
in process for as long as its run lasts (`JobsHeld`: no broker holds its task). A job held by one of them is being
worked on right now, not stalled, lost nor forgotten: the next round looks at it again.

Every send of a job, its first and each one again (the sweep's, a start's, after a re-index handed it back), carries
the request id of the request or run that queued it, which the job keeps (`IngestionJob.request_id`): each of its
runs logs under it (workers/tasks.py).

Delivery is at least once: a job may run twice (a crash, or the database going, between the send and the stamp).
The stamp covers a batch of jobs (`send_jobs`, the sweep: `_SWEEP_BATCH`, 500), so the jobs a crash can leave on the
broker unstamped, each sent again by the sweep, are up to a whole batch (the process killed just before its stamp),
not the one job they were when each was stamped as it went; a second run of a
document that is already ready changes nothing, and a run that finds its document deleted ends the job and purges
again (ingestion/service.py), so no job of a deleted document is left unfinished to be sent for ever.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from celery.worker import state as worker_state
from kombu.exceptions import OperationalError
from kombu.transport import memory
from sqlalchemy import ColumnElement, Connection, Select, or_, select, update
from sqlalchemy.orm import Session

from core import broker
from core.db import get_engine, keep_idle_transaction_open, transaction_lock, unit_of_work
from core.errors import Unavailable, unavailable_dependency
from core.logs import NO_REQUEST_ID, stored_request_id
from core.models import UNFINISHED, Document, DocumentStatus, IngestionJob, utcnow
from core.settings import Settings
from core.sweeper import NOT_RUN
from ingestion import repository as ingestion_repository
from workers.celery_app import INGEST_TASK, REQUEST_ID_HEADER, GovragCelery

if TYPE_CHECKING:
    from kombu.transport.redis import Channel as RedisChannel
    from redis import Redis

logger = logging.getLogger(__name__)

_SWEEP_BATCH = 500
_SWEEP_LOCK = "ingestion-job-sweep"
# How many tasks a sweep reads from Redis, at most, to find lost jobs (read _BROKER_PAGE at a time); past it lost
# jobs wait until the broker holds fewer
_BROKER_READ_LIMIT = 10_000
_BROKER_PAGE = 500
_UNREADABLE = (ValueError, KeyError, IndexError, TypeError, AttributeError)  # a message not shaped like a task
# A sweep connects to Redis once, not in kombu's retry loop (seconds, under the sweep's lock): its next round retries
_CONNECT_ONCE = {"max_retries": 0}


def send_job(app: GovragCelery, *, document_id: str, job_id: str) -> bool:
    """Publish the job's task and record that it was sent; False, logged, if the broker refused: the job stays
    unsent, for the sweep."""
    return send_jobs(app, [(document_id, job_id)]) == 1


def send_jobs(app: GovragCelery, jobs: Sequence[tuple[str, str]]) -> int:
    """Send each (document id, job id) as `send_job` does; returns how many went out. A batch at a time
    (`_SWEEP_BATCH`): its jobs are published, then those that went out are stamped in one transaction (`record_sent`),
    not one each (a re-index of tens of thousands of documents held its request open for minutes). Stops at the first
    refusal: the jobs before it are stamped, that job and the rest stay unsent, for the sweep, said in one line (a
    re-index of a thousand documents while the broker is down is one line, and waits for one refusal, not a
    thousand). A database failure as a batch is stamped propagates: its published jobs stay unstamped and the sweep
    sends them again, a second delivery its worker's claim makes harmless (the module's docstring), and the rest,
    never published, the sweep sends once. Publishing that raises rather than refuses (a task that cannot be
    serialised, an interrupt: `_published_and_stamped`) propagates too, once the jobs of its batch published before
    it are stamped."""
    settings, sent = app.govrag_settings, 0
    for batch in _batches_with_stored_request_ids(settings, jobs):
        published = _published_and_stamped(app, batch, lambda job_ids: record_sent(settings, job_ids))
        sent += len(published)
        if len(published) < len(batch):
            left, them = _named([job for _, job in jobs[sent:]])
            logger.warning("%s not sent: the broker is unreachable; the sweep sends %s once it answers", left, them)
            break
    return sent


def _published_and_stamped(app: GovragCelery, batch: Sequence[tuple[str, str, str | None]],
                           stamp: Callable[[list[str]], None]) -> list[str]:
    """The ids of the batch's jobs published (`_published_until_refused`), stamped sent by `stamp` in one go. When
    publishing raises rather than refuses (a task that cannot be serialised, an interrupt), the jobs published before
    it are stamped all the same (else the sweep sent them again) and what publishing raised propagates; a failure of
    that stamp is only a warning, never raised in its place: those jobs stay unstamped, and the sweep sends them
    again (a second delivery their worker's claim makes harmless)."""
    published: list[str] = []
    try:
        for job_id in _published_until_refused(app, batch):
            published.append(job_id)
    except BaseException:
        if published:  # else nothing to stamp, nor to name (`_named` of no job would raise here, in its place)
            try:
                stamp(published)
            except Exception as failed:
                logger.warning("%s published but not stamped (%s): the sweep sends %s again", _named(published)[0],
                               unavailable_dependency(failed) or type(failed).__name__, _named(published)[1])
        raise
    stamp(published)
    return published


def _published_until_refused(app: GovragCelery, batch: Sequence[tuple[str, str, str | None]]) -> Iterator[str]:
    """The ids of the batch's jobs published (`_published`), up to the first the broker refuses."""
    for document_id, job_id, request_id in batch:
        if not _published(app, document_id, job_id, request_id):
            return
        yield job_id


def _batches_with_stored_request_ids(settings: Settings, jobs: Sequence[tuple[str, str]],
                                     ) -> Iterator[list[tuple[str, str, str | None]]]:
    """The jobs in batches of _SWEEP_BATCH, each (document id, job id) with the request id its job keeps (None for a
    job that keeps none, or is gone), read a batch at a time as they are sent: one IN list of every job a re-index
    queues would pass PostgreSQL's 65,535 bind parameters in one statement past some 65,000 jobs, and a refusal
    stops the reading too."""
    for start in range(0, len(jobs), _SWEEP_BATCH):
        batch = jobs[start:start + _SWEEP_BATCH]
        with unit_of_work(settings.resolved_database_url) as session:
            stored = dict(session.execute(select(IngestionJob.id, IngestionJob.request_id)
                                          .where(IngestionJob.id.in_([job_id for _, job_id in batch]))).all())
        yield [(document_id, job_id, stored.get(job_id)) for document_id, job_id in batch]


def _named(job_ids: Sequence[str]) -> tuple[str, str]:
    """How a log line names jobs, and the pronoun for them: "ingestion job X", "it" for one; "N ingestion jobs (the
    first: X)", "them" for several."""
    if len(job_ids) == 1:
        return f"ingestion job {job_ids[0]}", "it"
    return f"{len(job_ids)} ingestion jobs (the first: {job_ids[0]})", "them"


def record_sent(settings: Settings, job_ids: Sequence[str]) -> None:
    """Record in one transaction that the jobs are taken care of: their tasks reached the broker, or this process
    runs them itself (`govrag ingest` in process), so the sweep does not send them to a worker as well."""
    if not job_ids:
        return
    with unit_of_work(settings.resolved_database_url) as session:
        _mark_sent(session, job_ids)


def give_back(settings: Settings, job_ids: list[str]) -> bool:
    """Jobs this process took to run itself (`govrag ingest` in process) and cannot finish now, a dependency being
    unavailable: each one unfinished waits again, handed back as a worker's retry hands its job back (its next run
    is no crash), and unsent, for the next sweep of an API to send or `take_waiting_job` to take. False, logged, when
    the database cannot record it (it is the one away): the jobs stay as they are, `processing`, until an API runs
    them again (`resend_unfinished` at its start, `resend_stalled`)."""
    if not job_ids:
        return True
    try:
        with unit_of_work(settings.resolved_database_url) as session:
            for job_id in job_ids:
                ingestion_repository.hand_back(session, job_id)
            session.execute(update(IngestionJob).where(IngestionJob.id.in_(job_ids),
                                                       IngestionJob.status.in_(UNFINISHED))
                            .values(sent_at=None, updated_at=IngestionJob.updated_at))
    except Exception as exc:
        dependency = unavailable_dependency(exc)
        if dependency is None:
            raise
        logger.warning("%s not handed back: the %s is unavailable", _named(job_ids)[0], dependency)
        return False
    return True


class JobsHeld:
    """The jobs this process runs itself (`govrag ingest` in process), held from `hold` until `release`, so that no
    sweep of an API on the same database sends one to a worker while this process runs it. A worker's run keeps its
    task taken on the broker, which the sweep reads (`resend_lost`); this run has no task anywhere, and a job it runs
    is sent again as lost once a re-index hands it back (`queued`, sent long ago), as stalled once its run outlasts
    a worker's time limit (in process there is none), as unfinished by an embedded API starting: a worker then ran
    the document beside this process, each claim counting a crash of the other.

    Each job's row is read FOR KEY SHARE in one transaction kept open on a connection of its own (no server timeout
    on idle transactions ends it: `keep_idle_transaction_open`): it leaves every other write of the job alone (this
    run's claim and end, a re-index's hand-back, `give_back`: none changes its key), while each sweep step takes only
    the rows FOR UPDATE SKIP LOCKED (`_unheld`) and passes it by. A process killed mid-run drops its connection and
    the hold with it: the sweep finds the job as it finds any dead run's. SQLite has no row locks: nothing is held
    there."""

    def __init__(self, settings: Settings) -> None:
        self._engine = get_engine(settings.resolved_database_url)
        self._connection: Connection | None = None

    def hold(self, job_id: str) -> None:
        """Hold the job until `release` (waiting, at most a sweep's round, for a sweep step locking it now)."""
        if self._engine.dialect.name != "postgresql":
            return
        if self._connection is None:
            self._connection = self._engine.connect()
            keep_idle_transaction_open(self._connection)
        self._connection.execute(select(IngestionJob.id).where(IngestionJob.id == job_id)
                                 .with_for_update(read=True, key_share=True))

    def release(self) -> None:
        """Let the sweep look at the jobs again. A database gone meanwhile took the hold with the connection: there
        is nothing left to release, and the run's own outcome is not replaced by that error."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            connection.close()  # rolls the holding transaction back
        except Exception as exc:
            if unavailable_dependency(exc) is None:
                raise


def take_waiting_job(settings: Settings, document_id: str, held: JobsHeld) -> str | None:
    """The document's unfinished job that nobody sends or runs, held (`held`) and marked sent: this process runs it
    itself (`govrag ingest` run again after an outage stopped it). A job waits so when it is unsent and either a run
    of it began before it was given back (`give_back`), or it has been unsent for longer than the sweep's grace: a
    younger one that never ran may be its uploader's, whose task is being published right now, or one `govrag
    ingest` has just accepted. Taken under the sweep's lock: the sweep sends it or this process runs it, never both.
    Held before its stamp commits: stamped and not yet held, an API starting on the embedded broker
    (`resend_unfinished`) would mark it unsent and send it to a worker. A job queued for an e-mail's attachment step
    alone is not the document's run (a re-index of it may wait behind it): the caller's own step does its work, and
    a sweep sends it."""
    cutoff = utcnow() - timedelta(seconds=settings.job_resend_after_seconds)
    with unit_of_work(settings.resolved_database_url) as session:
        transaction_lock(session, _SWEEP_LOCK)
        job_id = session.scalars(
            select(IngestionJob.id)
            .where(IngestionJob.document_id == document_id, IngestionJob.sent_at.is_(None),
                   IngestionJob.status.in_(UNFINISHED), ingestion_repository.RUNS_ITS_DOCUMENT,
                   or_(IngestionJob.attempts > 0, IngestionJob.created_at <= cutoff))
            .order_by(IngestionJob.created_at).limit(1)).first()
        if job_id is not None:
            held.hold(job_id)
            _mark_sent(session, [job_id])
    return job_id


def send_unsent(app: GovragCelery, *, older_than_seconds: float) -> int:
    """Send the unfinished jobs left unsent for longer than `older_than_seconds`; returns how many went out.

    One API process sweeps at a time (a lock held for the sweep's transaction), so replicas do not send one job
    twice. Stops at the first refusal: the broker is down; once the jobs sent are recorded, `Unavailable("broker")`,
    and the next sweep sends the rest. Publishing that raises rather than refuses propagates once the jobs sent
    before it are recorded (`_published_and_stamped`), so a job whose publishing raises every round does not make each
    round send again the jobs before it."""
    cutoff = utcnow() - timedelta(seconds=older_than_seconds)
    return _send_unsent_where(app, IngestionJob.created_at <= cutoff)


def _send_unsent_where(app: GovragCelery, *criteria: ColumnElement[bool]) -> int:
    """`send_unsent` for the unsent unfinished jobs meeting `criteria` (at most a batch, oldest first)."""
    settings = app.govrag_settings
    with unit_of_work(settings.resolved_database_url) as session:
        transaction_lock(session, _SWEEP_LOCK)
        unsent = session.execute(  # locked now, so marking them sent below waits for no one (`_unheld`)
            select(IngestionJob.document_id, IngestionJob.id, IngestionJob.request_id)
            .where(IngestionJob.sent_at.is_(None), IngestionJob.status.in_(UNFINISHED), *criteria)
            .order_by(IngestionJob.created_at).limit(_SWEEP_BATCH).with_for_update(skip_locked=True)).all()

        def stamp(job_ids: list[str]) -> None:
            if job_ids:
                _mark_sent(session, job_ids)
                session.commit()  # now: should publishing have raised, the unit of work rolls back

        # the broker refused the one after those sent, if any: the rest wait for the next sweep
        sent = _published_and_stamped(app, unsent, stamp)
    if sent:
        logger.info("sent %s that had not reached the broker", _named(sent)[0])
    if len(sent) < len(unsent):
        raise Unavailable("broker")
    return len(sent)


def resend_unfinished(app: GovragCelery) -> int:
    """Embedded default only (an in-memory broker, empty at start-up): every unfinished job marked sent lost its task
    with the process before; each is marked unsent and sent again at once. A job that was `processing` when the
    process stopped runs again from the start; one held (`_unheld`: `govrag ingest` beside it, on a Qdrant server,
    running it now) is left to its run. A job never sent is left to the sweep's grace (`send_unsent`): one `govrag
    ingest` has just accepted and not yet held would otherwise run in a worker beside it; one whose API died between
    its commit and its send goes out a grace later."""
    with unit_of_work(app.govrag_settings.resolved_database_url) as session:
        unstamped = session.scalars(update(IngestionJob).where(IngestionJob.id.in_(_unheld(
            IngestionJob.status.in_(UNFINISHED), IngestionJob.sent_at.is_not(None),
        ))).values(sent_at=None, updated_at=IngestionJob.updated_at).returning(IngestionJob.id)).all()
    return sum(_send_unsent_where(app, IngestionJob.id.in_(unstamped[start:start + _SWEEP_BATCH]))
               for start in range(0, len(unstamped), _SWEEP_BATCH))


def resend_lost(app: GovragCelery, *, older_than_seconds: float) -> int:
    """A job still `queued` that was sent more than `older_than_seconds` ago and whose task the broker no longer
    holds — neither waiting in the queue nor taken by a worker and not yet acknowledged — has no run left: a Redis
    that restarted without persistence (or evicted its keys) lost it, or a re-index handed it back after its run
    died (the module's docstring). It is marked unsent (and the sweep sends it again), whatever other tasks wait.
    Returns how many were marked: none when the broker cannot be read (a warning says why); `Unavailable("broker")`
    when it cannot be reached, `broker.RedisSkipped` while its breaker is open after that. Either way the sweep's
    other steps go on (`sweep_jobs`)."""
    read_jobs = _broker_reader(app.govrag_settings.broker_url)
    if read_jobs is None:
        return 0
    cutoff = utcnow() - timedelta(seconds=older_than_seconds)
    with unit_of_work(app.govrag_settings.resolved_database_url) as session:
        transaction_lock(session, _SWEEP_LOCK)
        try:  # read before the update: a job whose task was acked meanwhile has left `queued` (acks_late)
            on_broker = read_jobs(app)
        except _TasksUnknown as unknown:
            logger.warning("lost ingestion jobs not looked for: %s", unknown)
            return 0
        lost = session.scalars(update(IngestionJob).where(IngestionJob.id.in_(_unheld(
            IngestionJob.status == DocumentStatus.queued.value, IngestionJob.sent_at <= cutoff,
            IngestionJob.id.not_in(on_broker),
        ))).values(sent_at=None, updated_at=IngestionJob.updated_at).returning(IngestionJob.id)).all()
    if lost:
        logger.warning("%s queued but no longer on the broker; sending %s again", *_named(lost))
    return len(lost)


def resend_stalled(app: GovragCelery, *, stalled_after_seconds: float) -> int:
    """A job still `processing` longer after its last update than any run of it can last (the worker's time limit
    plus the broker's redelivery timeout) has no run left: its last one gave up during a database outage and could
    not record why, or its task was lost with a broker. It is marked unsent (and the sweep sends it again); returns
    how many were marked."""
    cutoff = utcnow() - timedelta(seconds=stalled_after_seconds)
    with unit_of_work(app.govrag_settings.resolved_database_url) as session:
        transaction_lock(session, _SWEEP_LOCK)
        stalled = session.scalars(update(IngestionJob).where(IngestionJob.id.in_(_unheld(
            IngestionJob.status == DocumentStatus.processing.value, IngestionJob.sent_at.is_not(None),
            IngestionJob.updated_at <= cutoff,
        ))).values(sent_at=None, updated_at=utcnow())  # its stall clock restarts with the new send
            .returning(IngestionJob.id)).all()
    if stalled:
        logger.warning("%s stalled in processing; sending %s again", *_named(stalled))
    return len(stalled)


def _unheld(*criteria: ColumnElement[bool]) -> Select[str]:
    """The ids of the jobs meeting `criteria` that no other transaction holds, locked by the statement that reads
    them (PostgreSQL's FOR UPDATE SKIP LOCKED), so an UPDATE of these ids waits for no row. One UPDATE of every job
    meeting them locked their rows in the order they are stored, waiting for each held one while holding those before
    it: a re-index handing back two of them in the other order held one and waited for the other, and PostgreSQL
    aborted the sweep or the re-index (a 500). SQLite has no row locks (a writer holds the whole database; SQLAlchemy
    leaves the clause out there)."""
    # not correlated with an UPDATE of ingestion_jobs: the subquery reads the table itself
    return select(IngestionJob.id).where(*criteria).with_for_update(skip_locked=True).correlate(None)


class _TasksUnknown(Exception):
    """Which jobs' tasks the broker holds cannot be told: it holds more than a sweep reads, or a task it cannot
    read."""


def _broker_reader(broker_url: str) -> Callable[[GovragCelery], set[str]] | None:
    """How to read the ids of the jobs whose tasks the broker holds (`_jobs_on_redis`, `_jobs_in_memory`); None for a
    broker this cannot read."""
    if broker.is_redis(broker_url):
        return _jobs_on_redis
    if broker.is_in_memory(broker_url):
        return _jobs_in_memory
    return None


def _jobs_in_memory(app: GovragCelery) -> set[str]:
    """Ids of the jobs whose ingestion task the in-memory broker holds: waiting in the job queue, or taken by this
    process's worker (the broker's only one) and not yet finished: running, reserved, or held for a retry's countdown
    (Celery's record of its requests, as `InProcessWorker` reads it). Read as Redis is: taken, waiting, taken again,
    so a task the worker takes meanwhile is in one of the reads, unless read in the instant between its leaving the
    queue and Celery recording its request: that job is sent once more, and its one worker (solo) runs the second
    delivery after the first, never beside it (delivery is at least once)."""
    taken = _requested_jobs()
    waiting = memory.Channel.queues.get(app.govrag_settings.task_queue)  # kombu's queues, one per name, process-wide
    messages: list[Any] = []
    if waiting is not None:
        with waiting.mutex:  # the worker's thread takes from it meanwhile
            messages = list(waiting.queue)
    if len(messages) > _BROKER_READ_LIMIT:
        raise _TasksUnknown(f"more than {_BROKER_READ_LIMIT} tasks wait on the broker")
    taken |= _requested_jobs()
    try:
        return taken | {job_id for job_id in map(_job_id_of, messages) if job_id is not None}
    except _UNREADABLE as error:
        raise _TasksUnknown(f"a task on the broker could not be read ({type(error).__name__})") from None


def _requested_jobs() -> set[str]:
    """Ids of the ingestion jobs whose tasks a worker of this process has taken and not finished."""
    requests = list(worker_state.requests.values())  # one copy of the dict, which the worker's thread changes
    return {str(request.args[1]) for request in requests if request.task_name == INGEST_TASK}


def _jobs_on_redis(app: GovragCelery) -> set[str]:
    """Ids of the jobs whose ingestion task Redis holds: waiting in the job queue, or taken by a worker and not yet
    acknowledged. A task is matched by the job id it carries, not by its task id, which no job records.
    `Unavailable("broker")` when Redis cannot be reached, without Redis's error: its message may name the broker's
    address; `broker.RedisSkipped` without trying it while the broker's breaker is open after such a failure."""
    try:
        taken, waiting = broker.through_breaker(app.govrag_settings.broker_url, lambda: _tasks_on_redis(app))
    except broker.UNREACHABLE:
        raise Unavailable("broker") from None
    try:
        # kombu keeps an unacknowledged task as [message, exchange, routing key]
        messages = [json.loads(raw) for raw in waiting] + [json.loads(entry)[0] for entry in taken]
        return {job_id for job_id in map(_job_id_of, messages) if job_id is not None}
    except _UNREADABLE as error:
        raise _TasksUnknown(f"a task on the broker could not be read ({type(error).__name__})") from None


def _tasks_on_redis(app: GovragCelery) -> tuple[list[bytes], list[bytes]]:
    """The tasks Redis holds as stored: those taken by workers and not yet acknowledged, and those waiting."""
    with app.connection_for_read(transport_options=_CONNECT_ONCE) as connection:
        channel = connection.default_channel
        # unacknowledged, waiting, unacknowledged again: a task that moves while they are read (a worker takes it,
        # or a redelivery hands it back) is in one of the three reads
        taken = _unacked_entries(channel)
        waiting = _waiting_entries(channel, app.govrag_settings.task_queue)
        taken += _unacked_entries(channel)
    return taken, waiting


def _waiting_entries(channel: RedisChannel, queue: str) -> list[bytes]:
    """The queue's waiting messages: kombu keeps one Redis list per priority step, pushes at the head and takes from
    the tail. Each list is read from the head in pages, so a task pushed meanwhile makes a page re-read one, never
    skip one."""
    keys = dict.fromkeys(channel._q_for_pri(queue, step) for step in channel.priority_steps)  # kombu's key names
    entries: list[bytes] = []
    for key in keys:
        entries += _read_list(channel.client, key, room=_BROKER_READ_LIMIT - len(entries))
    return entries


def _read_list(client: Redis, key: str, *, room: int) -> list[bytes]:
    """The entries of one Redis list, read in pages; `_TasksUnknown` if it holds more than `room`."""
    entries: list[bytes] = []
    while page := client.lrange(key, len(entries), len(entries) + _BROKER_PAGE - 1):
        entries += page
        if len(entries) > room:
            raise _TasksUnknown(f"more than {_BROKER_READ_LIMIT} tasks wait on the broker")
        if len(page) < _BROKER_PAGE:
            break
    return entries


def _unacked_entries(channel: RedisChannel) -> list[bytes]:
    """The tasks taken by workers and not yet acknowledged (kombu's `unacked` hash: a few per worker, as each takes
    one task at a time)."""
    held = int(channel.client.hlen(channel.unacked_key))
    if held > _BROKER_READ_LIMIT:
        raise _TasksUnknown(f"{held} tasks are held unacknowledged, more than the {_BROKER_READ_LIMIT} a sweep reads")
    return list(channel.client.hvals(channel.unacked_key))


def _job_id_of(message: Any) -> str | None:
    """The job id an ingestion task carries (its second argument, see `_published`); None for any other task."""
    if message["headers"].get("task") != INGEST_TASK:
        return None
    if message["content-type"] != "application/json":  # govrag sends JSON only; nothing else is decoded here
        raise ValueError("not JSON")
    body = message["body"]
    if message["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args, _kwargs, _embed = json.loads(body)
    return str(args[1])


def _published(app: GovragCelery, document_id: str, job_id: str, request_id: str | None) -> bool:
    """Put the ingestion task on the broker, with the request id the job keeps (`REQUEST_ID_HEADER`: that of the
    request or run that queued it, whoever sends it, the sweep and a start's resending too; for a job that keeps none,
    queued outside any request or run, the sender's, else `-`); False if the broker refused, or was not tried: its
    caller says so, once. A send to Redis goes through its breaker (`broker.guarded`): a hung Redis holds one send (the
    socket timeout, kombu's one retry: `PUBLISH_RETRY_POLICY`) and no other for the cool-down, each skipped at once
    (`broker.RedisSkipped`), its job left unsent for the sweep, whose round after the cool-down tries Redis again."""
    carried = request_id or stored_request_id() or NO_REQUEST_ID

    def send() -> None:
        # No time limit in the message: the worker's own GOVRAG_INGEST_TIME_LIMIT_SECONDS applies, not the sender's.
        app.tasks[INGEST_TASK].apply_async(args=[document_id, job_id], time_limit=None,
                                           headers={REQUEST_ID_HEADER: carried})

    try:
        broker.guarded(app.govrag_settings.broker_url, send)
    except (OperationalError, OSError, broker.RedisSkipped):
        return False
    return True


def _mark_sent(session: Session, job_ids: Sequence[str]) -> None:
    """Stamp the jobs sent, in one statement (at most _SWEEP_BATCH ids: far below PostgreSQL's 65,535 bind
    parameters). Their rows are locked first in the order in which a transaction handing back several documents'
    runs locks them (a re-index, an e-mail's run raising its attachments: ingestion/quarantine.py `_hand_back`):
    their documents' row order (`ingestion_repository.in_row_order`), then a document's jobs oldest first
    (`ingestion_repository.unfinished_jobs`). A stamp holding one such row while waiting for another that
    transaction holds, as it waits for the first, would be a deadlock PostgreSQL aborts one of (a re-index's 500, or
    stamps lost: the sweep sends those jobs again). SQLite has no row locks (a writer holds the whole database;
    SQLAlchemy leaves the clause out there)."""
    # each document's created_at read by its primary key (a join made PostgreSQL scan every document for 500 jobs)
    created = select(Document.created_at).where(Document.id == IngestionJob.document_id).scalar_subquery()
    in_row_order = (select(IngestionJob.id).where(IngestionJob.id.in_(job_ids))
                    .order_by(created, IngestionJob.document_id, IngestionJob.created_at, IngestionJob.id)
                    .with_for_update(key_share=True).correlate(None))
    session.execute(update(IngestionJob).where(IngestionJob.id.in_(in_row_order))
                    .values(sent_at=utcnow(), updated_at=IngestionJob.updated_at))


def sweep_jobs(app: GovragCelery, *, older_than_seconds: float) -> object:
    """The API's periodic sweep (core/sweeper.py): queued jobs whose tasks the broker lost or never got back, jobs
    stalled in processing, then every job still unsent. Looking for lost jobs holds back neither other step: Redis
    unreachable (`Unavailable("broker")`, which sending raises too) or refusing a read (an ACL without LRANGE) is
    raised once they have run. While the broker's breaker is open (Redis failed a moment ago: `broker.RedisSkipped`)
    lost jobs are not looked for and the round is `NOT_RUN`, neither a success nor a failure, so it logs nothing."""
    settings = app.govrag_settings
    outcome: object = None
    try:
        resend_lost(app, older_than_seconds=older_than_seconds)
    except broker.RedisSkipped:
        outcome = NOT_RUN  # the breaker said so as it opened; the next round looks for them
    finally:
        resend_stalled(app,
                       stalled_after_seconds=settings.ingest_time_limit_seconds + settings.broker_visibility_timeout)
        send_unsent(app, older_than_seconds=older_than_seconds)
    return outcome
