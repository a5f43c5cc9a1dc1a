"""The bases that let a govrag exception cross a process boundary pickled (a Celery worker's crosses the pool's pipe
so) as it was raised: standard library only, so that the http client (core.http) takes one without loading the
settings' or the database's dependencies."""

from __future__ import annotations

import copyreg
from typing import Any


class UnpickledAsRaised(Exception):
    """The base of every govrag exception whose `__init__` takes other arguments than its line, or builds its line from
    them (core.errors', core.http's, core.keystore's, ingestion.keys'): it pickles whole (`copy.copy` too). Unpickled,
    it is the one raised, its `args` and attributes (message, code, dependency, path, status, ...) as they were, its
    `__init__` not called again. Python's default calls it again with `args`, the line it built: a line built twice
    ("the the database is unavailable is unavailable") or a TypeError, not the error raised."""

    def __reduce__(self) -> tuple[Any, ...]:
        return copyreg.__newobj__, (type(self), *self.args), self.__dict__


class InterruptUnpickledAsRaised(KeyboardInterrupt):
    """UnpickledAsRaised for a KeyboardInterrupt that says more (ingestion.keys'): pickled whole the same way, and still
    no Exception, so that `except Exception` does not swallow it."""

    __reduce__ = UnpickledAsRaised.__reduce__
