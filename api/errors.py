"""The one error handler: every failure leaves as {"error": {"code", "message", "request_id"}}, an outage's 503 with
its `dependency`, a duplicate upload's 409 with the document it duplicates (`duplicate_of`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from python_multipart.exceptions import MultipartParseError
from starlette.exceptions import HTTPException as StarletteHTTPException

from audit.exceptions import MirrorUnreadable
from core.errors import Dependency, ErrorCode, GovragError, MasterKeyRefused, unavailable_dependency
from core.keystore import DepartmentKeyUnreadable
from core.logs import exception_frames, request_id_var

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5
# The kill switch's `disabled` has no known end (an admin sets it back): a client or load balancer that honours
# Retry-After backs off a minute at a time rather than asking again at once, and asks again within a minute of it.
KILL_SWITCH_RETRY_AFTER_SECONDS = 60
KEY_PLACEHOLDER = "<key>"  # a submitted dict key in a validation error's location: the client's text, never echoed
REQUEST_PARTS = ("body", "query", "path", "header", "cookie", "[key]")  # [key]: pydantic's mark of a bad dict key

_HTTP_CODES = {401: ErrorCode.unauthenticated, 403: ErrorCode.forbidden, 404: ErrorCode.not_found,
               413: ErrorCode.payload_too_large, 415: ErrorCode.unsupported_type}
NOT_JSON_MESSAGE = "invalid request: the body must be JSON (Content-Type: application/json)"
# FastAPI says "There was an error parsing the body" for both: what the JSON parser failed on, named.
NOT_UTF8_MESSAGE = "invalid request: the body is not UTF-8 text (JSON is sent in UTF-8, uncompressed)"
TOO_DEEP_MESSAGE = "invalid request: the body's JSON is nested too deeply"
MIRROR_UNREADABLE_MESSAGE = ("the audit checkpoint mirror file cannot be read (the service's log says why): the ledger "
                             "cannot be verified until an operator fixes it")


class ErrorDetail(BaseModel):
    code: str = Field(description=("what went wrong, e.g. invalid_request, unauthenticated, not_found, unavailable, "
                                   "kill_switch_disabled (a 503 with no outage: answering switched off by an admin)"))
    message: str = Field(description="for people; never carries the request's content")
    request_id: str = Field(description="also in the X-Request-ID header and the service's log lines")
    dependency: Dependency | None = Field(default=None, description=(
        "on a 503 for an outage only (absent otherwise): the dependency that did not answer, by its fixed name; what "
        "tells an outage, to retry once it is back, from a 503 whose cause is to fix (a master key refused), never "
        "the message, which may be reworded"))
    duplicate_of: str | None = Field(default=None, description=(
        "on a 409 duplicate_upload only (absent otherwise): the id of the department's document that already has "
        "this content, which the uploader may see as any of the department's; read it here, never from the message"))


class ErrorBody(BaseModel):
    """Every 4xx and 5xx the API sends."""

    error: ErrorDetail


# Documented on every /v1 operation. 422 by its number: FastAPI's own entry ({"detail": [...]}) is one the API never
# sends, and only gives way to an entry for 422 itself.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorBody, "description": "Invalid request (a field named, its value never echoed)"},
    "4XX": {"model": ErrorBody, "description": "Refused: bad input, no or bad token, not allowed, not found, ..."},
    "5XX": {"model": ErrorBody, "description": ("Internal error, a dependency unavailable (503, Retry-After), or "
                                                 "answering switched off (503 kill_switch_disabled, Retry-After)")},
}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None, *,
                   dependency: Dependency | None = None, duplicate_of: str | None = None) -> JSONResponse:
    """The JSON error body, with the request id, the `dependency` an outage names and the document a duplicate
    upload's 409 names (`duplicate_of`), each only when set."""
    named = {"dependency": dependency, "duplicate_of": duplicate_of}
    error = {"code": code, "message": message, "request_id": request_id_var.get()}
    body = {"error": {**error, **{field: value for field, value in named.items() if value is not None}}}
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(status_code=status, content=body, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Map service errors, a master key refused, a department key that does not open, an audit checkpoint mirror
    that cannot be read, validation errors and HTTP errors to the one JSON shape (crashes: `crash_response`)."""

    @app.exception_handler(GovragError)
    async def _govrag(_request: Request, exc: GovragError) -> JSONResponse:
        # One raised from an outage (the audit log's `unavailable` when the database goes as an event is written) is
        # that outage's 503, whatever its code, as the CLI and a worker tell it (`unavailable_dependency`).
        if (outage := _outage_response(exc)) is not None:
            return outage
        return error_response(exc.code.status, exc.code.name, exc.message, _retry_after(exc.code),
                              duplicate_of=exc.duplicate_of)

    @app.exception_handler(MasterKeyRefused)
    async def _master_key(_request: Request, exc: MasterKeyRefused) -> JSONResponse:
        # A replica whose master key lacks the version a rotation made current (or no longer opens the stored keys, or
        # its key file is gone): the operator's line, no key material in it, logged, and said to the client without
        # the key file's path; no retry helps until it is fixed.
        logger.error("%s", exc)
        return error_response(503, ErrorCode.unavailable.name, exc.client_message)

    @app.exception_handler(DepartmentKeyUnreadable)
    async def _department_key(_request: Request, exc: DepartmentKeyUnreadable) -> JSONResponse:
        # An upload into (or a reveal in) a department whose key row was altered (a query leaves the department out):
        # no retry helps until the row is restored. The operator's line, naming the department only, logged and said.
        logger.error("%s", exc)
        return error_response(ErrorCode.department_key_unreadable.status, ErrorCode.department_key_unreadable.name,
                              str(exc))

    @app.exception_handler(MirrorUnreadable)
    async def _mirror_unreadable(_request: Request, exc: MirrorUnreadable) -> JSONResponse:
        # Something else than a readable file at the checkpoint mirror's path (a named pipe, never waited on; a folder;
        # no permission): the deployment's to fix, no retry helps. The operator's line, naming the file, logged; the
        # client's names no path.
        logger.error("cannot read the audit checkpoint mirror file %s: %s", exc.filename, exc.strerror)
        code = ErrorCode.audit_mirror_unreadable
        return error_response(code.status, code.name, MIRROR_UNREADABLE_MESSAGE)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        if _body_not_sent_as_json(exc):
            return error_response(422, ErrorCode.invalid_request.name, NOT_JSON_MESSAGE)
        # Name the fields and the problem, never echo the submitted values (a dict's keys included).
        names = _schema_names(request.app)
        problems = "; ".join(f"{_location(err['loc'], names)}: {_problem(err)}" for err in exc.errors())
        return error_response(422, ErrorCode.invalid_request.name, f"invalid request: {problems}"[:500])

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, ErrorCode.invalid_request)
        message = _parse_problem(exc) or (exc.detail if isinstance(exc.detail, str) else "request failed")
        return error_response(exc.status_code, code.name, message, headers=exc.headers)  # a 405's Allow, say


def _retry_after(code: ErrorCode) -> dict[str, str] | None:
    """The Retry-After of the kill switch's 503, whose end no one knows (an outage's is `_outage_response`'s); None
    for any other code."""
    if code is not ErrorCode.kill_switch_disabled:
        return None
    return {"Retry-After": str(KILL_SWITCH_RETRY_AFTER_SECONDS)}


def _parse_problem(exc: StarletteHTTPException) -> str | None:
    """What a parser's generic 400 stands for: a JSON body that is not UTF-8 (a gzip-compressed one, say: a body is
    read as sent) or nested deeper than the parser goes; Starlette's "Invalid multipart data." when the form parser
    found a header line too long (a part's file name of more than ~4,000 bytes). None for anything else (the detail
    is then said as it is)."""
    if isinstance(exc.__cause__, UnicodeDecodeError):
        return NOT_UTF8_MESSAGE
    if isinstance(exc.__cause__, RecursionError):
        return TOO_DEEP_MESSAGE
    cause = exc.__context__.__cause__ if exc.__context__ is not None else None
    if isinstance(cause, MultipartParseError) and "header size" in str(cause):
        return "invalid multipart data: a part's header is too long (a file name is at most about 4,000 bytes)"
    return None


def _problem(error: Mapping[str, Any]) -> str:
    """What is wrong, in words the caller can act on (pydantic's own message for most errors)."""
    if error["type"] == "extra_forbidden":
        return "unknown field (not in this request's schema; check its spelling)"
    return str(error["msg"])


def _location(loc: tuple[int | str, ...], names: frozenset[str]) -> str:
    """Where a validation error is, as the schema names it: a list index, or a field or parameter name; anything
    else is a key of a submitted dict (a department's confidential keyword, say), shown as `<key>`."""
    return ".".join(str(part) if isinstance(part, int) or part in names else KEY_PLACEHOLDER for part in loc)


def _schema_names(app: FastAPI) -> frozenset[str]:
    """Every name the API's OpenAPI document gives a field or a parameter, and the parts of a request they sit in;
    worked out once per app."""
    names: frozenset[str] | None = getattr(app.state, "schema_names", None)
    if names is None:
        found, pending = set(REQUEST_PARTS), [app.openapi()]
        while pending:
            item = pending.pop()
            if isinstance(item, dict):
                found.update(item.get("properties", {}) if isinstance(item.get("properties"), dict) else ())
                found.update(p["name"] for p in item.get("parameters", []) if isinstance(p, dict) and "name" in p)
                pending.extend(item.values())
            elif isinstance(item, list):
                pending.extend(item)
        names = app.state.schema_names = frozenset(found)
    return names


def _body_not_sent_as_json(exc: RequestValidationError) -> bool:
    """A JSON endpoint sent another content type (curl's `-d` sends a form type, or none): FastAPI does not parse
    the body and validates its raw bytes, which pydantic calls "not a valid dictionary"."""
    return any(error["loc"] == ("body",) and isinstance(error.get("input"), bytes) for error in exc.errors())


def crash_response(exc: Exception) -> JSONResponse:
    """An unexpected failure: logged (its frames, with the request id), answered as a 500 carrying the request id.

    The API's request middleware calls this, inside the request's context; an exception handler for `Exception`
    would run outside it (no request id) and re-raise, which drops the client's keep-alive connection.
    A database or vector store that cannot be reached is no bug: a 503 the client may retry, naming it in `dependency`
    (the one field a client tells an outage by), logged as a warning."""
    if (outage := _outage_response(exc)) is not None:
        return outage
    logger.error("unhandled %s\n%s", type(exc).__name__, exception_frames(exc))
    return error_response(500, ErrorCode.internal.name, "internal error")


def _outage_response(exc: Exception) -> JSONResponse | None:
    """The 503 of every outage the API answers: `exc` (or what it was raised from) says a dependency is unreachable
    (`unavailable_dependency`), named in `dependency`, with Retry-After, logged as a warning; None for any other
    failure."""
    dependency = unavailable_dependency(exc)
    if dependency is None:
        return None
    logger.warning("%s unavailable (%s)\n%s", dependency, type(exc).__name__, exception_frames(exc))
    return error_response(503, ErrorCode.unavailable.name, f"the {dependency} is unavailable; try again shortly",
                          headers={"Retry-After": str(RETRY_AFTER_SECONDS)}, dependency=dependency)
