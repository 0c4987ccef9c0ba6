"""Request ids and the access log: one JSON line per request, written by the app.

The app (not gunicorn) writes the access line because only it knows the route template, the
user and the request id. `X-Request-ID` is taken from the client when it is sane, generated
otherwise, echoed in the response and attached to every log line of the request.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Flask, Response, g, request
from flask_jwt_extended import get_jwt_identity

HEADER = "X-Request-ID"
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
access_log = logging.getLogger("service.access")


def init_app(app: Flask) -> None:
    """Register first, so the id exists before any other hook can answer or fail."""
    app.before_request(_begin)
    app.after_request(_end)


def _begin() -> None:
    g.request_started = time.perf_counter()
    incoming = request.headers.get(HEADER, "")
    g.request_id = incoming if _SANE_ID.fullmatch(incoming) else uuid.uuid4().hex


def _user_id() -> str | None:
    if "user_id" in g:
        return g.user_id
    try:
        return get_jwt_identity()
    except RuntimeError:  # no token was verified for this request
        return None


def _end(response: Response) -> Response:
    request_id = g.get("request_id")
    if request_id is None:  # a hook failed before _begin ran: still give the request an id
        _begin()
        request_id = g.request_id
    response.headers[HEADER] = request_id
    duration_ms = round((time.perf_counter() - g.request_started) * 1000, 3)
    rule = request.url_rule
    status = response.status_code
    method, path = request.method, request.path
    access_log.log(
        logging.ERROR if status >= 500 else logging.INFO,
        "%s %s %d %.1fms",
        method,
        path,
        status,
        duration_ms,
        extra={
            "event": "access",
            # the request context, given here so the formatter need not look it up again
            "request_id": request_id,
            "method": method,
            "path": path,
            "remote_addr": request.remote_addr,
            "route": rule.rule if rule is not None else None,
            "status": status,
            "duration_ms": duration_ms,
            "user_id": _user_id(),
            "response_bytes": response.calculate_content_length(),
        },
    )
    return response
