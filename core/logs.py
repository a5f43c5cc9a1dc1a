"""Logging, configured once: JSON lines, a request id on each, sensitive values masked on every handler."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import ParamSpec, TypeVar

from core import forksafe

P = ParamSpec("P")
T = TypeVar("T")

NO_REQUEST_ID = "-"
request_id_var: ContextVar[str] = ContextVar("request_id", default=NO_REQUEST_ID)
# A request id as govrag makes one: an API request's, 32 lower-case hex digits (api.app's RequestContext, sent back as
# X-Request-ID), or a command's run, `cli-` and the same (api.cli). Read with `re.fullmatch`: a trailing line break is
# refused too.
REQUEST_ID_PATTERN = r"^(cli-)?[0-9a-f]{32}$"
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)


def under_callers_request_id(work: Callable[P, T]) -> Callable[P, T]:
    """`work`, run (on any thread) under the request id its caller has now and nothing else of the caller's context:
    its log lines carry the id of the request or command run that handed it over. A thread started plainly
    (`threading.Thread`, `threading.Timer`) inherits no context variable: its lines say `-`. The rest of the caller's
    context is the request's and would be wrong in work that runs on after the request, or later: its Server-Timing
    stages (`core.timing`, a dict the response has already read) and its current tracing span (ended by then). The
    target of a thread that works for one request or run is wrapped in this; a thread serving the whole process (the
    sweeper, the cache expirer) is not, or it would say the first caller's id for ever."""
    request_id = request_id_var.get()

    def under_request_id(*args: P.args, **kwargs: P.kwargs) -> T:
        context = contextvars.Context()  # empty: nothing of the caller's but the id set next
        context.run(request_id_var.set, request_id)
        return context.run(work, *args, **kwargs)

    return under_request_id


# Words that describe a secret rather than being one ("the password is wrong."), and words that start a phrase.
_SECRET_STATE_WORDS = "|".join((
    "not", "no", "the", "a", "an", "my", "your", "his", "her", "our", "their", "its", "this", "that", "it", "mine",
    "yours", "ours", "theirs", "here", "there", "what", "which", "required", "mandatory", "optional", "needed",
    "expired", "valid", "invalid", "wrong", "correct", "incorrect", "right", "weak", "strong", "secure", "insecure",
    "missing", "empty", "blank", "set", "unset", "reset", "changed", "new", "old", "same", "different", "long", "short",
    "compromised", "leaked", "stolen", "lost", "locked", "unknown", "ok", "okay", "fine", "enabled", "disabled",
    "active", "inactive", "revoked", "sensitive", "confidential", "private", "secret", "strict", "good", "bad",
    "stored", "encrypted", "hashed", "rotated", "shared", "used", "needed", "forgotten", "case"))
# libpq's connection options that hold a password or name the file keeping one: `core.migrate` leaves them out of a
# database URL it prints, and the masks below know them in any case, as libpq's variables too (PGPASSWORD, PGPASSFILE).
PASSWORD_PARAMETERS = frozenset({"password", "passfile", "sslpassword"})
_PASSWORD_NAMES = f"(?:pg)?(?:{'|'.join(sorted(PASSWORD_PARAMETERS))})"
# A value: quoted (a backslash escapes the next character, as in a libpq DSN, JSON or a Python repr), or up to a
# space, quote, comma or semicolon (where a backslash escapes one too: a DSN's `a\ b` is one value).
_MASKED_VALUE = r"(?:\"(?:[^\"\\]|\\.)*\"?|'(?:[^'\\]|\\.)*'?|(?:\\.|[^\s\"',;\\])+)"
_SECRET_MASKS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)", re.S),
     "<PRIVATE_KEY>"),
    (re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]*"), "<TOKEN>"),
    (re.compile(r"(?i)bearer\s+\S+"), "Bearer <TOKEN>"),
    # The name may end a longer one (`GOVRAG_MASTER_KEY`: `_` is a word character, so no `\b` before it); quoted
    # names and values as JSON or a Python repr write them.
    (re.compile(rf"(?i)(?<![a-z0-9])({_PASSWORD_NAMES}|passwd|pwd|secret|api[_-]?key|access[_-]?key|token|"
                r"master[_-]?key|checkpoint[_-]?key|authorization|client[_-]?secret)([\"']?\s*[=:]\s*)"
                rf"((?:basic|bearer|digest|negotiate|ntlm|token|apikey)\s+)?{_MASKED_VALUE}"),
     r"\1\2\3<SECRET>"),
    # "my password is hunter2", "the api key is 'x y'": after "is", one token that has a digit or a symbol, a
    # quoted value, or a lone word ending the clause that is no word describing a secret ("the password is
    # expired."); "the password policy is strict" names no secret.
    (re.compile(rf"(?i)(?<![a-z0-9])({_PASSWORD_NAMES}|passwd|passcode|passphrase|api[ _-]?key|access[ _-]?token|"
                r"token|secret)(\s+is\s+)(?:\"[^\"]*\"?|'[^']*'?|"
                rf"(?!(?:{_SECRET_STATE_WORDS})\b)(?:[^\s\"',;]*(?:[^\s\"',;a-z.!?:-]|[.!?:-](?=[^\s\"',;]))"
                r"[^\s\"',;]*|[a-z]+(?=\s*(?:[.!?,;)]|$))))"),
     r"\1\2<SECRET>"),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "<SECRET>"),
    (re.compile(r"\b(?:sk|pk|rk|ghp|gho|xox[abp])[-_][A-Za-z0-9_-]{16,}\b"), "<SECRET>"),
    # A URL's user name and password (the user may be empty), in a scheme of any case: up to the last `@` before the
    # first `/` after the scheme (RFC 3986 3.2 ends the user information at the authority's last `@`), so an `@` in a
    # password is masked with all of it. A `?` or `#` does not end it, as it does not for SQLAlchemy, which reads a
    # database URL's password up to its `@` (`govrag:pa#ss@db`, password `pa#ss`): the settings refuse either unencoded
    # in a URL's user name or password, and a URL logged from elsewhere holding one is masked whole. Each piece is read
    # once, for a line of any length: a scheme from the start of a run of scheme characters only (the lookbehind; what
    # precedes its first letter, `...` or `1`, kept), the user name up to its first `:`.
    (re.compile(r"(?i)(?<![a-z0-9+.-])([0-9+.-]*)[a-z][a-z0-9+.-]*://[^\s/:]*:[^\s/]*@"),
     r"\1<URL_WITH_CREDENTIALS>@"),
)
# An address's local part is at most 64 characters (RFC 5321): read from each character of a line, an unbounded one
# scanned the rest of every long word (minutes of CPU for a 200,000-character one), a longer one keeps its start.
_EMAIL_MASK = (re.compile(r"[\w.+-]{1,64}@[\w-]+\.[\w.-]+"), "<EMAIL>")
_NUMBER_MASKS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b\d{3}-\d{2}-\d{4}\b"), "<SSN>"),
    (re.compile(r"\b\d(?:[ -]?\d){12,18}\b"), "<NUMBER>"),
    (re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b"), "<IBAN>"),
    (re.compile(r"\+?\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}\b"), "<PHONE>"),
)
# A document's, job's or request's id: the digits in one are no card or phone number (`…-8694-810088041610` is), and
# an id is what an operator follows through the logs, so the number masks leave ids whole.
_ID = re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b")

# Loggers that libraries give their own handlers or stop from propagating; they are routed to ours.
_LIBRARY_LOGGERS = ("uvicorn", "uvicorn.error", "celery", "celery.task", "celery.worker",
                    "celery.app.trace", "celery.redirected", "kombu", "httpx", "sqlalchemy", "alembic")
# uvicorn's access line is the raw request line, query string and all (an export's `user=` filter, 10,000 characters
# of junk): off whoever started uvicorn (`govrag serve` says access_log=False too). The API's request middleware logs
# each request as its method, route template and status instead.
_SILENCED_LIBRARY_LOGGERS = ("uvicorn.access",)
# Libraries that log what they read at DEBUG (or their own DETAIL level): pdfminer each token of a PDF's text,
# unstructured (`unstructured.trace`) the text of the elements it sorts, Presidio the words around each PII match
# (of a document or a question), pypandoc, Python-Markdown, charset_normalizer, Pillow and matplotlib their steps
# through a file; httpx and httpcore each request's full URL, query string and all (an export's `user=` filter sent by
# the demo's client, a model server's address). They stay at WARNING whatever GOVRAG_LOG_LEVEL says: a document's
# text, or a caller's, never reaches the logs.
QUIET_LIBRARY_LOGGERS = ("pdfminer", "unstructured", "unstructured.trace", "presidio-analyzer", "pypandoc",
                         "MARKDOWN", "charset_normalizer", "PIL", "matplotlib", "httpx", "httpcore")


def request_id_or_none(value: object) -> str:
    """`value` if it is a request id as govrag makes one (`REQUEST_ID_PATTERN`), else `-`: an id read from outside the
    process (a task's message) puts nothing else in a log line."""
    if isinstance(value, str) and _REQUEST_ID.fullmatch(value):
        return value
    return NO_REQUEST_ID


def stored_request_id() -> str | None:
    """The request id this thread logs under, as a row keeps it: None outside any request or command run (`-`), and
    for anything that is not a request id as govrag makes one (`request_id_or_none`), so a row never keeps more than
    its 36 characters, nor text of a caller's. An ingestion job keeps the id of the request or run that queued it
    (core/models.py), which every send of it carries (workers/dispatch.py)."""
    request_id = request_id_or_none(request_id_var.get())
    return None if request_id == NO_REQUEST_ID else request_id


@contextmanager
def logged_as(request_id: object) -> Iterator[None]:
    """Log under `request_id` (checked by `request_id_or_none`) until the block ends, then as before."""
    token = request_id_var.set(request_id_or_none(request_id))
    try:
        yield
    finally:
        request_id_var.reset(token)


def mask_secrets(text: str) -> str:
    """Replace private keys, tokens, secrets and credentials in URLs."""
    for pattern, replacement in _SECRET_MASKS:
        text = pattern.sub(replacement, text)
    return text


def mask(text: str) -> str:
    """Replace private keys, tokens, secrets, credentials in URLs, e-mails, account/card and phone numbers."""
    text = _EMAIL_MASK[0].sub(_EMAIL_MASK[1], mask_secrets(text))
    pieces: list[str] = []
    start = 0
    for found in _ID.finditer(text):
        pieces += [_mask_numbers(text[start:found.start()]), found.group()]
        start = found.end()
    return "".join(pieces) + _mask_numbers(text[start:])


def _mask_numbers(text: str) -> str:
    for pattern, replacement in _NUMBER_MASKS:
        text = pattern.sub(replacement, text)
    return text


def exception_frames(exc: BaseException) -> str:
    """An exception chain as its types and stack frames, without the messages: a library's message may quote what it
    was given (a database error the offending value, a parser the document's text), which no mask can recognise."""
    chain: list[str] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 10:
        chain.append(f"{type(current).__module__}.{type(current).__qualname__}, at:\n"
                     + "".join(traceback.format_tb(current.__traceback__)))
        current = current.__cause__ or current.__context__
    return "\ncaused by ".join(chain)


class MaskingFilter(logging.Filter):
    """Renders each record's message masked, an exception as its frames only (`exception_frames`), and stamps the
    request id."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = mask(record.getMessage())
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = mask(exception_frames(record.exc_info[1]))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = mask(record.exc_text)
        if record.stack_info:
            record.stack_info = mask(record.stack_info)
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line)


class SaidOnChange:
    """A recurring check's problems, each by what it is about (a readiness check's name), logged as each changes, not
    at each check: a WARNING as one appears or becomes another (`problem_line`, a %-format of what it is about and the
    problem), an INFO (`cleared_line`, a %-format of what it was about) once it is gone. Readiness probes come every
    few seconds, each with the same answer; one problem coming and going leaves what another says unrepeated."""

    def __init__(self, logger: logging.Logger, problem_line: str, cleared_line: str) -> None:
        self._logger, self._problem_line, self._cleared_line = logger, problem_line, cleared_line
        self._lock = forksafe.lock()
        self._last: dict[str, str] = {}

    def tell(self, problems: Mapping[str, str]) -> None:
        """Log what changed since the problems told last (none: an empty mapping). Threads tell at once (uvicorn runs
        sync endpoints in a pool): the lines are logged under the lock, so they come in the order the answers were
        kept and the last one says the answer kept (logged after it, a problem told first could follow the "cleared"
        told second)."""
        with self._lock:
            last, self._last = self._last, dict(problems)
            for about in [about for about in last if about not in problems]:
                self._logger.info(self._cleared_line, about)
            for about, problem in problems.items():
                if last.get(about) != problem:
                    self._logger.warning(self._problem_line, about, problem)


def configure_logging(level: str = "INFO") -> None:
    """Install the JSON handler on the root logger (idempotent), route library loggers to it, mask every handler."""
    root = logging.getLogger()
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
        root.setLevel(level)
    for name in _LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.handlers.clear()
        library.propagate = True
    for name in _SILENCED_LIBRARY_LOGGERS:
        silenced = logging.getLogger(name)
        silenced.handlers.clear()
        silenced.propagate = False  # no handler at all: uvicorn then does not even format the line
    for name in QUIET_LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
    mask_all_handlers()
    _take_over_celery_logging()


def mask_all_handlers() -> int:
    """Add the masking filter to every handler of every logger that lacks one; returns how many were added."""
    loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    added = 0
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, MaskingFilter) for f in handler.filters):
                handler.addFilter(MaskingFilter())
                added += 1
    return added


def _take_over_celery_logging() -> None:
    """A `setup_logging` receiver stops Celery from installing its own (unmasked) handlers."""
    from celery import signals

    signals.setup_logging.connect(_celery_setup_logging, weak=False, dispatch_uid="govrag-logging")
    for signal in (signals.after_setup_logger, signals.after_setup_task_logger):
        signal.connect(_celery_after_setup, weak=False, dispatch_uid=f"govrag-mask-{signal.name}")


def _celery_setup_logging(**_kwargs: object) -> None:
    configure_logging()


def _celery_after_setup(**_kwargs: object) -> None:
    mask_all_handlers()
