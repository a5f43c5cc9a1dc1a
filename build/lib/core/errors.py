"""One error type for the whole service, with codes that map to HTTP statuses."""

from __future__ import annotations

from enum import Enum


class ErrorCode(Enum):
    """Each code carries the HTTP status the API answers with."""

    invalid_request = 400
    unauthenticated = 401
    forbidden = 403
    not_found = 404
    conflict = 409
    payload_too_large = 413
    unsupported_type = 415
    unavailable = 503
    internal = 500

    @property
    def status(self) -> int:
        return self.value


class GovragError(Exception):
    """A failure safe to show a client: the message never carries user content."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
