"""The `govrag` command: serve, worker, migrate, token, demo, redteam (and more). Only light modules are imported
before `main` runs: a Ctrl-C as the command's own imports run is said in one line too."""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from api.cli_args import api_url
from api.cli_failures import INTERRUPTED, failure
from core import offline

if TYPE_CHECKING:
    from pydantic import ValidationError


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run one subcommand; a Ctrl-C at any step, from the first import on, is one line and exit
    130, never a traceback."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # one no command said itself: as the imports, the parser or the settings load
        print(f"govrag: {INTERRUPTED.line}", file=sys.stderr)
        return INTERRUPTED.exit_code


def _main(argv: list[str] | None) -> int:
    """`main` but for a Ctrl-C that none of this said: the libraries told to stay offline before any is imported."""
    _offline_defaults()
    from pydantic import ValidationError

    from core.errors import StartRefused
    from core.migrate import MigrationError, MigrationInterrupted

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        with _request_id_of_its_own(args):
            return int(args.run(args) or 0)
    except ValidationError as refused:
        if refused.title != "Settings":
            raise
        print(f"govrag: the settings were refused; nothing was started\n{_reasons(refused)}", file=sys.stderr)
        return 2
    except (MigrationError, StartRefused, MigrationInterrupted) as refused:  # a database unreachable or at another
        print(f"govrag: {refused}", file=sys.stderr)  # revision, a store held by another process, ...: said in one line
        return refused.exit_code
    except (Exception, KeyboardInterrupt) as exc:  # a known failure no command said itself (a Ctrl-C as one starts)
        if (stop := failure(exc)) is None:
            raise
        print(f"govrag: {stop.line}", file=sys.stderr)
        return stop.exit_code


@contextmanager
def _request_id_of_its_own(args: argparse.Namespace) -> Iterator[None]:
    """A command run under a request id of its own, `cli-` and 32 hex digits (an API request's are the 32 digits):
    every ledger event it records (an export and its `export_failed`, a key rotation, ...) and every log line it
    writes carries it, telling one run from another by the same actor. `serve` and `worker` take none: their requests
    (each given its own) and tasks (each under its sender's, `workers.tasks`) are what they run. A thread starts
    without it (`-`: no context variable is inherited): each event a command records is recorded in the command's
    thread; a parse's thread runs in `contextvars.copy_context()` (`ingestion.parse`), and the Edge store's flush and
    index build under `core.logs.under_callers_request_id`, the run's id alone."""
    if args.run in (_serve, _worker):
        yield
        return
    from core.logs import request_id_var

    token = request_id_var.set(f"cli-{uuid.uuid4().hex}")
    try:
        yield
    finally:
        request_id_var.reset(token)


def _reasons(refused: ValidationError) -> str:
    """One line per refused setting: its name and why (the settings never quote the values they refuse)."""
    return "\n".join(f"  GOVRAG_{'.'.join(map(str, error['loc'])).upper()}: {error['msg']}"
                     if error["loc"] else f"  {error['msg']}" for error in refused.errors())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="govrag", description="Governed RAG platform service.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the API (embedded default unless configured otherwise)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8000)
    serve.set_defaults(run=_serve)

    worker = commands.add_parser("worker", help="run a Celery ingestion worker process (needs a Qdrant server)")
    worker.add_argument("--concurrency", type=_at_least_one, default=None,
                        help="documents ingested at once, one process each (default: GOVRAG_INGEST_CONCURRENCY, "
                             "the number of cores, at most 4)")
    worker.set_defaults(run=_worker)

    commands.add_parser("migrate", help="upgrade the database schema to the latest revision").set_defaults(
        run=_migrate)

    token = commands.add_parser("token", help="print a token from the built-in DEV issuer (dev only)")
    token.add_argument("--sub", required=True)
    token.add_argument("--groups", action="append", default=[])
    token.add_argument("--ttl", type=int, default=None,
                       help="seconds the token lives (default: an hour; at most GOVRAG_TOKEN_MAX_LIFETIME_SECONDS)")
    token.set_defaults(run=_token)

    commands.add_parser("demo", help="run the end-to-end demo on the embedded default").set_defaults(run=_demo)

    redteam = commands.add_parser("redteam", help="send the attack corpus through the live API; exit 1 on a leak, 2 on "
                                  "bad arguments or a token refused at the first probe, 3 when a probe errored, "
                                  "none was answered or the API could not be reached, 130 on a Ctrl-C (1 if a leak "
                                  "was found before it)")
    redteam.add_argument("--department", required=True)
    redteam.add_argument("--url", type=api_url, default="http://127.0.0.1:8000")
    redteam.add_argument("--token", default=os.environ.get("GOVRAG_REDTEAM_TOKEN"),
                         help="the configured user's bearer token (default: $GOVRAG_REDTEAM_TOKEN; on the command "
                              "line other users can read it in `ps`)")
    redteam.add_argument("--user", help="dev only: mint a token for this subject from the built-in issuer")
    redteam.add_argument("--groups", action="append", default=[])
    redteam.add_argument("--corpus", type=Path, default=None,
                         help="the eval corpora (default: $GOVRAG_EVAL_DIR, else shared/eval beside the repository)")
    redteam.add_argument("--per-category", type=_at_least_one, default=20)
    redteam.set_defaults(run=_redteam)
    from api import cli_audit  # issue 6: `govrag audit verify|export|checkpoint|purge`, `govrag export ...`

    cli_audit.add_commands(commands)
    from api import cli_ingest, cli_keys  # issue 3: `govrag ingest PATH` and `govrag keys rotate`

    cli_ingest.add_commands(commands)
    cli_keys.add_commands(commands)
    from api import cli_reindex  # `govrag reindex`: the API's re-index, in bulk, for operators

    cli_reindex.add_commands(commands)
    return parser


def _at_least_one(value: str) -> int:
    """An argparse type: a whole number of at least 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def _port(value: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535; the resolver would take 70000 as 4464."""
    number = int(value)
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError("must be a port, 0 to 65535")
    return number


def _serve(args: argparse.Namespace) -> int:
    from api import serving
    from api.app import create_app, start
    from core import migrate
    from core.settings import get_settings

    settings = get_settings()
    with serving.listening(args.host, args.port) as sockets:  # an address it cannot use: refused before anything
        migrate.migrate_in_development(settings)  # production never migrates: start's schema check refuses a stale one
        app = create_app(settings)
        # Before uvicorn, whose start would say a refusal as a traceback; the database lost since the schema check, at
        # any step, said as that check says it.
        with migrate.reached(settings.resolved_database_url):
            start(app)
        serving.serve(app, sockets)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from core.logs import configure_logging
    from core.settings import get_settings
    from workers.celery_app import celery_for_command

    settings = get_settings()
    if not settings.qdrant_url:
        print("a separate worker process needs GOVRAG_QDRANT_URL: the embedded store allows one process, "
              "and `govrag serve` already runs an in-process worker", file=sys.stderr)
        return 2
    from core import blobs, keystore, migrate

    migrate.require_head(settings.resolved_database_url)
    configure_logging(settings.log_level)
    with migrate.reached(settings.resolved_database_url):  # the database lost since require_head: said as it says it
        keystore.require_master_opens(settings, first_start=True)
        blobs.open_at_start(settings.blob_dir, settings.resolved_database_url)  # only here (its volume away: runs wait)
    from core.tracing import configure_tracing
    from ingestion import service as ingestion_service

    ingestion_service.check_models(settings)  # a broken install: one line, exit 1, before Celery starts
    configure_tracing(settings)
    with celery_for_command(settings) as app:
        with migrate.reached(settings.resolved_database_url):
            keystore.record_master_verifiers(settings)  # last: a start refused by an earlier step pins no master key
        concurrency = args.concurrency if args.concurrency is not None else settings.ingest_concurrency
        app.worker_main(["worker", "--loglevel=INFO", f"--concurrency={concurrency}", "-Q", settings.task_queue])
    return 0


def _migrate(_args: argparse.Namespace) -> int:
    """One line per revision applied once it committed, then the revision the database is at, and which database; a
    database at head that lost its deployment id (DeploymentMissing, which no migration mends) is refused in one line,
    exit 2."""
    from core import migrate
    from core.settings import get_settings

    settings = get_settings()
    applied: list[str] = []

    def say(step: str) -> None:
        applied.append(step)
        print(f"govrag: {step}", flush=True)

    migrate.migrate_to_head(settings, report=say)
    migrate.require_head(settings.resolved_database_url)  # at head without its deployment id: never "at head", exit 2
    database = migrate.shown_url(settings.resolved_database_url)
    print(f"govrag: {'at' if applied else 'already at'} head {migrate.head_revision()} in {database}")
    return 0


def _token(args: argparse.Namespace) -> int:
    from authz.dev_issuer import DevIssuer
    from core.settings import get_settings

    settings = get_settings()
    if not settings.dev_issuer:
        print("the dev issuer is disabled (GOVRAG_DEV_ISSUER=false)", file=sys.stderr)
        return 2
    issuer = DevIssuer.from_settings(settings)
    ttl = issuer.default_ttl_seconds if args.ttl is None else args.ttl
    try:
        token = issuer.issue(args.sub, args.groups, ttl_seconds=ttl)
    except ValueError as refused:  # our own message: --ttl out of range
        print(f"govrag: --ttl refused: {refused}", file=sys.stderr)
        return 2
    print(f"# DEV-ONLY token for sub={args.sub} groups={args.groups} ttl={ttl}s", file=sys.stderr)
    print(token)
    return 0


def _demo(_args: argparse.Namespace) -> int:
    from api import demo
    from ingestion import scratch

    with scratch.removed_on_sigterm():  # the in-process worker's parses leave no plaintext copy behind
        return demo.run()


def _redteam(args: argparse.Namespace) -> int:
    import httpx

    from core import http

    try:  # before the first probe: the imports (spaCy, Presidio: seconds), a dev token, the corpus read
        from guard import redteam

        token = _redteam_token(args)
        corpus = _attack_corpus(args) if token else None
    except KeyboardInterrupt:  # as a Ctrl-C during the probes: one line, no traceback
        print("govrag: interrupted before the first probe; nothing was tested; run the same command again",
              file=sys.stderr)
        return 130
    if not token or corpus is None:
        return redteam.EXIT_USAGE
    try:
        report = redteam.run(args.url, token, args.department, corpus)
    except (httpx.TransportError, http.TooSlow) as exc:  # the first probe got no answer; one later is in the report
        print(f"cannot reach the API at {args.url} ({redteam.no_answer(exc)}); nothing was tested; check --url",
              file=sys.stderr)
        return redteam.EXIT_UNTESTED
    except redteam.TokenRefused:
        print(f"the API at {args.url} refused the token (HTTP 401) at the first probe; nothing was tested; give a "
              "valid --token (or $GOVRAG_REDTEAM_TOKEN)", file=sys.stderr)
        return redteam.EXIT_USAGE
    print("\n".join(report.lines()))
    if stopped := report.interrupted_line():
        print(f"govrag: {stopped}", file=sys.stderr)
    return report.exit_code()


def _attack_corpus(args: argparse.Namespace) -> dict[str, list[str]] | None:
    """The eval-split attacks in --corpus (default: EVAL_DIR); None (explained) if they cannot be read or used."""
    from guard import redteam
    from guard.eval_corpora import EVAL_DIR

    corpus_dir = args.corpus or EVAL_DIR
    try:
        return redteam.attack_corpus(corpus_dir, args.per_category)
    except OSError as exc:
        print(f"cannot read the attack corpus in {corpus_dir} ({exc}); give --corpus or $GOVRAG_EVAL_DIR",
              file=sys.stderr)
    except redteam.CorpusError as exc:
        print(f"cannot use the attack corpus: {exc}; give --corpus or $GOVRAG_EVAL_DIR", file=sys.stderr)
    return None


def _redteam_token(args: argparse.Namespace) -> str | None:
    """--token (or $GOVRAG_REDTEAM_TOKEN), else one minted by the dev issuer for --user; None (explained) if neither."""
    if args.token is None and args.user:
        from authz.dev_issuer import DevIssuer
        from core.settings import get_settings

        settings = get_settings()
        if not settings.dev_issuer:
            print("--user needs the dev issuer; pass --token", file=sys.stderr)
            return None
        return DevIssuer.from_settings(settings).issue(args.user, args.groups)
    if not args.token:
        print("give --token (or $GOVRAG_REDTEAM_TOKEN), or --user in development", file=sys.stderr)
    return args.token


def _offline_defaults() -> None:
    """Nothing downloads or phones home at run time."""
    offline.configure_libraries()
    for name, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(name, value)


if __name__ == "__main__":
    sys.exit(main())
