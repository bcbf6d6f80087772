"""Errors of the OpenAI-compatible endpoint, in OpenAI's own shape.

Every failure a client sees is ``{"error": {"message", "type", "param", "code"}}`` with
the HTTP status OpenAI would use, so SDKs raise their usual typed exceptions
(``BadRequestError``, ``AuthenticationError``, ``NotFoundError``...).
"""

from __future__ import annotations

import math
from typing import Any

# OpenAI's error types, by the status they go with.
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
SERVER = "server_error"
UNAVAILABLE = "service_unavailable_error"

_TYPE_BY_STATUS = {
    400: INVALID_REQUEST,
    401: AUTHENTICATION,
    403: "permission_error",
    404: NOT_FOUND,
    405: INVALID_REQUEST,
    408: INVALID_REQUEST,
    413: INVALID_REQUEST,
    415: INVALID_REQUEST,
    429: "rate_limit_error",
    503: UNAVAILABLE,
}


class ApiError(Exception):
    """A request the endpoint answers with an error; carries everything the body needs."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after  # seconds; sent as a Retry-After header
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPE_BY_STATUS.get(status, SERVER)

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Extra response headers: Retry-After (whole seconds, rounded up) when known."""
        if self.retry_after is None:
            return []
        return [(b"retry-after", str(max(1, math.ceil(self.retry_after))).encode())]

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    """400 for a request that is malformed or asks for something we do not support."""
    return ApiError(400, message, param=param, code=code or "invalid_request")
