"""Request ids and the access log: one JSON line per request, written by the app.

The app (not gunicorn) writes the access line because only it knows the route template, the
user and the request id. `X-Request-ID` is taken from the client when it is sane, generated
otherwise, echoed in the response and attached to every log line of the request. Beside it,
the request's W3C trace (trace_context.py): its trace id on the same lines, its
`traceresponse` on the response.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid

from flask import Flask, Response, g, request
from flask_jwt_extended import get_jwt_identity

from service.observability import exemplars, trace_context

HEADER = "X-Request-ID"
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
access_log = logging.getLogger("service.access")

# The request each thread of this process is serving, by thread ident: its id and its trace
# (trace_context.Trace), read from outside the request by the report of a worker aborted for
# timeout (worker_timeouts.py), and counted once a second as the requests in flight
# (metrics.py). A dict store per request and a pop at its teardown (atomic under the GIL: no lock).
serving: dict[int, tuple[str, trace_context.Trace]] = {}


def init_app(app: Flask) -> None:
    """Register first, so the id exists before any other hook can answer or fail."""
    app.before_request(_begin)
    app.after_request(_end)
    app.teardown_request(_done)


def request_id_from(incoming: str) -> str:
    """The client's X-Request-ID when it is sane, a new id otherwise."""
    return incoming if _SANE_ID.fullmatch(incoming) else uuid.uuid4().hex


def _begin() -> None:
    g.request_started = time.perf_counter()
    headers = request.headers
    g.request_id = request_id_from(headers.get(HEADER, ""))
    g.trace = trace_context.from_headers(headers.get(trace_context.TRACEPARENT), headers.get(trace_context.TRACESTATE))
    g.trace_id = g.trace.trace_id
    serving[threading.get_ident()] = (g.request_id, g.trace)


def _done(_exc: BaseException | None = None) -> None:
    serving.pop(threading.get_ident(), None)


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
    trace = g.trace
    response.headers[HEADER] = request_id
    response.headers[trace_context.TRACERESPONSE] = trace.traceresponse()
    duration_ms = round((time.perf_counter() - g.request_started) * 1000, 3)
    rule = request.url_rule
    route = rule.rule if rule is not None else None
    status = response.status_code
    _write_access_line(
        method=request.method,
        path=request.path,
        status=status,
        duration_ms=duration_ms,
        request_id=request_id,
        trace_id=trace.trace_id,
        remote_addr=request.remote_addr,
        route=route,
        user_id=_user_id(),
        size=response.calculate_content_length(),
    )
    exemplars.latency(request.method, route, status, duration_ms, trace.trace_id, request_id)
    return response


def printable(value: str, limit: int = 32) -> str:
    """A client-chosen token (a method) fit for a log line or an error message: at most `limit`
    characters, control and non-ASCII characters escaped (\\x07), "..." when cut."""
    shown = value[:limit].encode("unicode_escape").decode("ascii")
    return shown + "..." if len(value) > limit else shown


def log_answered_early(
    environ: dict, *, method: str, status: int, request_id: str, trace_id: str, started: float, size: int
) -> None:
    """The access line of a request answered by WSGI middleware before Flask saw it (no route,
    no user): the same fields as every other access line."""
    duration_ms = round((time.perf_counter() - started) * 1000, 3)
    # PATH_INFO is latin-1 decoded bytes (PEP 3333); the other access lines show it as UTF-8
    path = environ.get("PATH_INFO", "").encode("latin-1", "replace").decode("utf-8", "replace") or "/"
    _write_access_line(
        method=method,
        path=path,
        status=status,
        duration_ms=duration_ms,
        request_id=request_id,
        trace_id=trace_id,
        remote_addr=environ.get("REMOTE_ADDR"),
        route=None,
        user_id=None,
        size=size,
    )


def _write_access_line(
    *, method, path, status, duration_ms, request_id, trace_id, remote_addr, route, user_id, size
) -> None:
    """The one access line format: ERROR for a 5xx, INFO otherwise; the request context is
    given here so the formatter need not look it up again."""
    access_log.log(
        logging.ERROR if status >= 500 else logging.INFO,
        "%s %s %d %.1fms",
        method,
        path,
        status,
        duration_ms,
        extra={
            "event": "access",
            "request_id": request_id,
            "trace_id": trace_id,
            "method": method,
            "path": path,
            "remote_addr": remote_addr,
            "route": route,
            "status": status,
            "duration_ms": duration_ms,
            "user_id": user_id,
            "response_bytes": size,
        },
    )
