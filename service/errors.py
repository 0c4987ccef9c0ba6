"""One JSON error shape for everything the service can answer with.

    {"error": {"status": 404, "code": "not_found", "message": "...", "details": {...},
               "request_id": "...", "trace_id": "<32 hex: the W3C trace>"}}

HTTP exceptions, validation errors, JWT failures, pool timeouts, database outages and
unexpected exceptions all leave through `error_response`, so a client (and a log reader) only
ever has to understand one shape.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from apiflask import APIFlask, HTTPError
from flask import Response, current_app, g, jsonify, request
from psycopg2.errors import QueryCanceled
from sqlalchemy import exc as sa_exc

from service.database import DatabaseTimeout

log = logging.getLogger("service.errors")

CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    417: "expectation_failed",
    422: "validation_error",
    429: "too_many_requests",
    431: "header_too_large",
    500: "internal_error",
    503: "service_unavailable",
}

# The OpenAPI description of the shape, so generated clients and schema fuzzers know it.
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["status", "code", "message", "details"],
            "properties": {
                "status": {"type": "integer"},
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {"type": "object"},
                "request_id": {"type": "string"},
                "trace_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
            },
        }
    },
}


class APIError(HTTPError):
    """Raise anywhere in a request: becomes the JSON error shape with a machine-readable code."""

    def __init__(
        self, status: int, message: str, *, code: str | None = None, details: Any = None, headers: dict | None = None
    ) -> None:
        super().__init__(
            status,
            message,
            detail=details or {},
            headers=headers,
            extra_data={"code": code or CODES.get(status, "error")},
        )


def error_body(
    status: int,
    message: str,
    *,
    code: str | None = None,
    details: Any = None,
    request_id: str | None = None,
    trace_id: str | None = None,
) -> dict:
    """The one shape, as data: also for answers given outside Flask (the WSGI guards)."""
    body = {
        "status": status,
        "code": code or CODES.get(status, "error"),
        "message": message,
        "details": details or {},
    }
    if request_id:
        body["request_id"] = request_id
    if trace_id:
        body["trace_id"] = trace_id
    return {"error": body}


def error_response(
    status: int, message: str, *, code: str | None = None, details: Any = None, headers: dict | None = None
) -> Response:
    request_id, trace_id = (g.get("request_id"), g.get("trace_id")) if g else (None, None)
    response = jsonify(
        error_body(status, message, code=code, details=details, request_id=request_id, trace_id=trace_id)
    )
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _from_http_error(error: HTTPError) -> Response:
    """APIFlask routes Werkzeug's HTTPExceptions, `abort()` and validation errors through here."""
    status = error.status_code
    message = error.message
    if status == 422 and message == "Validation error":
        message = "The request did not pass validation; see details"
    elif status == 405:
        message = f"Method {request.method} is not allowed here"
    elif status == 404 and message == "Not Found":
        message = "No such resource"
    elif status == 413:
        limit = current_app.config.get("MAX_CONTENT_LENGTH")
        message = f"Request body is larger than the {limit} bytes allowed"
    headers = dict(error.headers or {})
    headers.pop("Content-Type", None)
    return error_response(status, message, code=error.extra_data.get("code"), details=error.detail, headers=headers)


def _pool_timeout(exc: sa_exc.TimeoutError) -> Response:
    timeout = current_app.config["SQLALCHEMY_ENGINE_OPTIONS"]["pool_timeout"]
    waited = time.perf_counter() - g.get("request_started", time.perf_counter())
    log.warning(
        "db pool exhausted: no connection within %.1fs (request waited %.2fs)",
        timeout,
        waited,
        extra={"event": "db_pool_timeout", "pool_timeout_s": timeout, "waited_s": round(waited, 3)},
    )
    return error_response(
        503,
        "The service is saturated: no database connection was free; retry shortly",
        code="db_pool_exhausted",
        headers={"Retry-After": str(max(1, math.ceil(timeout)))},
    )


def _database_unavailable(exc: sa_exc.SQLAlchemyError) -> Response:
    orig = getattr(exc, "orig", None)
    if isinstance(orig, DatabaseTimeout):  # a client-side deadline (service/database.py)
        return _database_not_answering(orig)
    if isinstance(orig, QueryCanceled):  # DB_STATEMENT_TIMEOUT_MS passed
        log.warning("database statement timed out", extra={"event": "db_statement_timeout"})
        return error_response(
            503,
            "The database did not answer in time; retry shortly",
            code="database_timeout",
            headers={"Retry-After": "2"},
        )
    log.error("database unavailable: %s", type(exc).__name__, exc_info=exc, extra={"event": "db_unavailable"})
    return error_response(
        503, "The database is unavailable; retry shortly", code="database_unavailable", headers={"Retry-After": "2"}
    )


def _database_not_answering(timeout: DatabaseTimeout) -> Response:
    """The database did not answer within a client deadline (frozen, unreachable), or is known
    not to and the statement was refused unsent: one WARNING per request, Sentry once a minute
    per process (sentry_rate_limit), the same 503 as a server-side statement timeout."""
    waited = time.perf_counter() - g.get("request_started", time.perf_counter())
    if timeout.sent:
        message = "database did not answer within %.3gs (%s): connection discarded"
        args: tuple = (timeout.timeout_s, timeout.phase)
    else:
        message = "database not answering: %s refused without sending"
        args = (timeout.phase,)
    log.warning(
        message,
        *args,
        extra={
            "event": "db_timeout",
            "phase": timeout.phase,
            "sent": timeout.sent,
            "timeout_s": timeout.timeout_s,
            "waited_s": round(waited, 3),
        },
    )
    return error_response(
        503,
        "The database did not answer in time; retry shortly",
        code="database_timeout",
        headers={"Retry-After": "2"},
    )


def _unexpected(exc: Exception) -> Response:
    from service.observability.metrics import UNHANDLED

    UNHANDLED.inc()
    log.error("unhandled exception", exc_info=exc, extra={"event": "unhandled_exception"})
    return error_response(500, "Internal server error; the request id identifies it in the logs")


def register_error_handlers(app: APIFlask) -> None:
    app.error_processor(_from_http_error)
    app.register_error_handler(sa_exc.TimeoutError, _pool_timeout)
    app.register_error_handler(sa_exc.OperationalError, _database_unavailable)
    app.register_error_handler(sa_exc.InterfaceError, _database_unavailable)
    app.register_error_handler(Exception, _unexpected)


# flask-jwt-extended's error callbacks that can fire here (no blocklist or fresh tokens are
# used), each answered in our shape: (callback, message, code). The last two are the token
# policy's refusals (service/auth/tokens.py): a token that breaks it is as invalid as a forged one.
JWT_ERRORS = (
    ("unauthorized_loader", "Missing or malformed Authorization header: send 'Bearer <token>'", "token_missing"),
    ("invalid_token_loader", "The token is invalid", "token_invalid"),
    ("expired_token_loader", "The token has expired; log in again", "token_expired"),
    ("token_verification_failed_loader", "The token is invalid", "token_invalid"),
    ("user_lookup_error_loader", "The token is invalid", "token_invalid"),
)


def token_error(code: str) -> Response:
    """The 401 of a JWT_ERRORS code."""
    message = next(message for _, message, known in JWT_ERRORS if known == code)
    return error_response(401, message, code=code)


def register_jwt_errors(jwt) -> None:
    """flask-jwt-extended answers with its own body by default; route every case to ours."""
    for callback, _message, code in JWT_ERRORS:

        def answer(*_args, _code=code):
            return token_error(_code)

        getattr(jwt, callback)(answer)
