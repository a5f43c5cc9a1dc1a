"""`govrag reindex`: queue re-indexes of departments' documents as `POST /v1/admin/reindex` does (the same service,
each department's re-index audited under cli:<actor>), all of a department's documents or only those whose index this
release would write differently (`ingestion.reindex.outdated`); a JSON summary on stdout."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from api.cli_audit import actor, add_actor_argument, operator_session, reported
from core.errors import ErrorCode, GovragError
from core.settings import Settings, get_settings

if TYPE_CHECKING:  # imported as the command runs (the PII models load with the ledger): `govrag --help` stays light
    from ingestion.quarantine import Reindex


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `reindex`."""
    reindex = commands.add_parser(
        "reindex", help="queue re-indexes of departments' documents (as POST /v1/admin/reindex, audited); print a "
        "JSON summary")
    scope = reindex.add_mutually_exclusive_group(required=True)
    scope.add_argument("--department", action="append", dest="departments", metavar="NAME",
                       help="this department (repeatable)")
    scope.add_argument("--all", action="store_true", dest="every_department", help="every department")
    reindex.add_argument("--unbound", action="store_true",
                         help="only documents whose served chunks or placeholder map were sealed before their "
                              "run was bound in them (migrations 0020, 0021)")
    reindex.add_argument("--stale-scan", action="store_true",
                         help="only documents whose served chunks another injection scanner version passed (reads "
                              "the vector store); with --unbound, documents that are either")
    reindex.add_argument("--serve-previous", action="store_true",
                         help="keep serving each document's previous index until its run ends ready (default: not "
                              "served meanwhile, as the API's default)")
    reindex.add_argument("--dry-run", action="store_true", help="say what would be queued; queue nothing")
    add_actor_argument(reindex)
    reindex.set_defaults(run=reindex_command)


@dataclass
class Summary:
    """What the command did, or with --dry-run would do, over every department it re-indexed."""

    dry_run: bool
    departments: list[str]
    selection: list[str]  # empty: every document a department-wide re-index covers
    serve_previous: bool
    jobs: list[tuple[str, str]] = field(default_factory=list)  # (document id, job id): a new job each
    rerun: int = 0  # runs of documents being ingested sent round again under the current rules (no second job)
    # pending: outdated, left to the run they are in (nothing queued nor sent round again); not_reindexable: left the
    # states a re-index covers meanwhile
    skipped: Counter[str] = field(default_factory=lambda: Counter(pending=0, not_reindexable=0))
    sent: int = 0

    def add(self, reindex: Reindex, pending: frozenset[str]) -> None:
        """Count one department's re-index, and the outdated documents left to the run they are in (`pending`)."""
        self.jobs += reindex.queued
        self.rerun += len(reindex.rerun)
        self.skipped.update(pending=len(pending), not_reindexable=len(reindex.skipped))

    def said(self) -> str:
        """The summary as the one JSON line the command prints."""
        return json.dumps({"queued": len(self.jobs), "rerun": self.rerun, "skipped": dict(self.skipped),
                           "dry_run": self.dry_run,
                           "departments": self.departments, "selection": self.selection or ["all"],
                           "serve_previous": self.serve_previous,
                           "documents": [document_id for document_id, _ in self.jobs], "sent": self.sent})


@reported
def reindex_command(args: argparse.Namespace) -> int:
    """Queue (or with --dry-run only list) each department's re-index, in turn: one stopped midway (an outage, a
    Ctrl-C) leaves those before it queued and audited, and the same command run again queues no document twice."""
    settings = get_settings()
    with operator_session() as session:
        summary = Summary(dry_run=args.dry_run, departments=_departments(session, args.departments),
                          selection=_selection(args), serve_previous=args.serve_previous)
        for department in summary.departments:
            summary.add(*_reindex_department(session, settings, args, department))
    if summary.jobs and not args.dry_run:
        summary.sent = _send(settings, summary.jobs)
    print(summary.said())
    return 0


def _departments(session: Session, named: list[str] | None) -> list[str]:
    """The departments named (every one for --all); a name that is none refuses the command before anything."""
    from authz import service as authz_service

    chosen, unknown = authz_service.departments_named(session=session, named=named or [])
    if unknown:
        raise GovragError(ErrorCode.not_found, f"no such department: {', '.join(unknown)}; nothing queued")
    return chosen


def _selection(args: argparse.Namespace) -> list[str]:
    return [name for name, chosen in (("unbound", args.unbound), ("stale_scan", args.stale_scan)) if chosen]


def _reindex_department(session: Session, settings: Settings, args: argparse.Namespace,
                        department: str) -> tuple[Reindex, frozenset[str]]:
    """The department's re-index (what the API's department-wide one covers, or the outdated documents asked for), and
    the outdated documents left to the run they are in."""
    from ingestion import reindex as reindexing
    from ingestion.quarantine import Reindex

    if not _selection(args):
        return _queue(session, settings, args, department, None), frozenset()
    found = reindexing.outdated(session=session, settings=settings, department=department, unbound=args.unbound,
                                stale_scan=args.stale_scan)
    if not (document_ids := found.to_queue()):
        session.rollback()  # nothing to re-index: no event either
        return Reindex(queued=[], rerun=[], skipped=[]), found.pending
    return _queue(session, settings, args, department, document_ids), found.pending


def _begin_read_only(session: Session) -> None:
    """Begin a dry run's plan of a department: on PostgreSQL read only, so a write or a row lock the plan
    took by mistake fails the command instead of holding a row, and on one snapshot (REPEATABLE READ), so the
    documents listed and their runs are read as they stood together (a run ending between the two reads would
    otherwise have its document planned as skipped, which the real queueing never does with one)."""
    session.rollback()  # the transaction that read the departments (and the outdated documents), or the previous one
    if session.get_bind().dialect.name == "postgresql":  # applied as the transaction's connection is taken
        session.connection(execution_options={"isolation_level": "REPEATABLE READ", "postgresql_readonly": True})


def _queue(session: Session, settings: Settings, args: argparse.Namespace, department: str,
           document_ids: list[str] | None) -> Reindex:
    """Queue and audit the re-index (`reindexing.queue_audited`, as the API does); with --dry-run, what it would
    queue, read only (`quarantine.plan_reindex`: no row written nor locked), nothing queued nor audited."""
    from ingestion import quarantine
    from ingestion import reindex as reindexing

    if not args.dry_run:
        return reindexing.queue_audited(session=session, settings=settings, identity=actor(args),
                                        department=department, document_ids=document_ids,
                                        serve_previous=args.serve_previous, selection=_selection(args) or None)
    _begin_read_only(session)  # here, not before `outdated`: its scan of the vector store holds no snapshot open
    try:
        return quarantine.plan_reindex(session=session, settings=settings, department=department,
                                       document_ids=document_ids)
    finally:
        session.rollback()  # ends the read's transaction: a snapshot held open would hold back vacuum


def _send(settings: Settings, jobs: list[tuple[str, str]]) -> int:
    """Send the new jobs to a shared broker as the API does (`dispatch.send_jobs`): how many went out. The embedded
    default's broker lives in `govrag serve`'s memory: its sweep sends them (as any job left unsent)."""
    from core import broker

    if broker.is_in_memory(settings.broker_url):
        return 0
    from workers.celery_app import celery_for_command
    from workers.dispatch import send_jobs

    with celery_for_command(settings) as app:
        return send_jobs(app, jobs)
