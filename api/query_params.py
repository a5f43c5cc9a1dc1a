"""Query strings read as strictly as request bodies (`core.text.RequestModel`, strict JSON types).

Every value in a query string is text, so a strict type cannot be asked of pydantic here; instead an integer is
written as JSON writes one (`JSON_INTEGER`), and `strict_query` refuses, before the handler runs, a parameter the route
does not take (a misspelt filter would otherwise be dropped and the request run without it, as an unknown body
field was) and a parameter given twice (only the last was read). Both are a 422 in the one error shape, the
parameter named as the schema names it, never the value (an unknown name shows as `<key>`).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BeforeValidator

_JSON_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]*)")


def _json_integer(value: object) -> object:
    """Text that is an integer as JSON writes it; pydantic alone also reads `5.0`, `+5`, `05`, `1_0` and ` 5`."""
    if isinstance(value, str) and not _JSON_INTEGER.fullmatch(value):
        raise ValueError("an integer is written as JSON writes one: digits, no point, plus sign, space or leading zero")
    return value


# `Annotated[int, Query(ge=1), JSON_INTEGER]`: after `Query`, whose bounds then still reach the OpenAPI document as
# `minimum`/`maximum` (placed before them, a validator leaves them there as unknown `ge`/`le` keys).
JSON_INTEGER = BeforeValidator(_json_integer)


async def strict_query(request: Request) -> None:
    """A 422 for each query parameter the route does not take, and for each it takes given more than once (no
    parameter of this API is a list)."""
    route = request.scope.get("route")
    if not request.scope.get("query_string") or not isinstance(route, APIRoute):
        return
    taken = _query_names(route.dependant)
    given = Counter(name for name, _ in request.query_params.multi_items())
    errors = [_error("extra_forbidden", name, "unknown field") for name in given if name not in taken]
    errors += [_error("repeated", name, "given more than once; it takes one value")
               for name, count in given.items() if name in taken and count > 1]
    if errors:
        raise RequestValidationError(errors)


def _query_names(dependant: Dependant) -> frozenset[str]:
    """The query parameters a route reads, its dependencies' included, by the names a client sends (aliases)."""
    names: set[str] = set()
    pending = [dependant]
    while pending:
        current = pending.pop()
        names.update(field.alias for field in current.query_params)
        pending.extend(current.dependencies)
    return frozenset(names)


def _error(kind: str, name: str, message: str) -> dict[str, Any]:
    return {"type": kind, "loc": ("query", name), "msg": message, "input": None}
