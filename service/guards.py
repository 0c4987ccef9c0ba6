"""Request guards, in two layers, both answering in the one error shape (errors.py).

`InputBounds` is WSGI middleware around the whole Flask app (the factory's register_wsgi_guards
step), for what must be settled before Flask reads anything:

- A method the API does not serve is answered 405 at once: the metrics label requests with the
  method as sent, so a client inventing methods would otherwise invent label values (20 requests
  `CARD00X /books/1` made 460 series; 1,000 random ones 14,881, and a 1.6 MB scrape).
- A request body is either whole and within MAX_CONTENT_LENGTH or refused. An oversized body is
  read and discarded, up to MAX_DRAIN_BYTES, so a client talking to gunicorn directly reads its
  413 instead of a connection reset (gunicorn itself discards at most 64 KiB of an unread body
  before it closes). A chunked body is read here up to the limit plus one byte: Werkzeug's
  LimitedStream, given the limit as a maximum, stops reading exactly at the limit and returns
  what it has, so a longer body was parsed truncated (and a valid prefix stored, 201).

The before_request hooks answer what the middleware marked, then refuse bodies that are not JSON
before any view runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import time

from flask import Response, request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.routing import Map

from service import strict_json
from service.errors import error_body, error_response
from service.observability import request_log, trace_context

# The methods the API serves (Flask adds HEAD and OPTIONS to every route): the only values the
# `method` label of the HTTP metrics can take.
SERVED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

# Set by InputBounds for refuse_unread_body: the status a body that cannot be served gets.
BODY_REFUSED = "flaskapi.body_refused"

# How long reading (or discarding) one body may take in all, as gunicorn's own drain
# (DEFAULT_WORKER_DATA_TIMEOUT): a client that sends slower than this gets its answer and a
# closed connection instead of holding a worker thread.
READ_SECONDS = 5.0
READ_SIZE = 64 * 1024


class InputBounds:
    """WSGI middleware: unknown methods answered 405, bodies whole and bounded (module doc).

    A request with a body within the limit and a Content-Length passes untouched, as does any
    request without a body: a set lookup and a few environ lookups, ~0.2 us per GET and ~0.3 us
    per small POST of a ~300 us request (timeit, docs/api.md)."""

    def __init__(self, app, *, url_map: Map, max_content_length: int, max_drain_bytes: int) -> None:
        self.app = app
        self.url_map = url_map
        self.limit = max_content_length
        self.drain_limit = max_drain_bytes
        self.methods = frozenset(SERVED_METHODS)

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") not in self.methods:
            return self._refuse_method(environ, start_response)
        encoding = environ.get("HTTP_TRANSFER_ENCODING")
        if encoding is not None and "chunked" in encoding.lower():
            self._buffer_chunked(environ)
        else:
            length = environ.get("CONTENT_LENGTH")
            if length:
                try:
                    declared = int(length)
                except ValueError:  # Werkzeug reads a malformed length as 0 (gunicorn refuses it)
                    declared = 0
                if declared > self.limit:
                    self._refuse_declared(environ, declared)
        return self.app(environ, start_response)

    # --- bodies ------------------------------------------------------------------------------

    def _refuse_declared(self, environ, declared: int) -> None:
        """Content-Length above the limit: discard the body if it is within the drain bound, so
        the connection is at a request boundary again and the client reads the answer. A larger
        one is not read at all: the 413 goes out at once and gunicorn closes the connection
        (a client still sending may then see a reset)."""
        if declared <= self.drain_limit:
            _discard(environ, declared, deadline=time.monotonic() + READ_SECONDS)
        # CONTENT_LENGTH stays: any read of the body raises Werkzeug's 413 as well
        environ["wsgi.input"] = io.BytesIO()
        environ[BODY_REFUSED] = 413

    def _buffer_chunked(self, environ) -> None:
        """A chunked body (no Content-Length), read here whole up to the limit plus one byte:
        within the limit the app gets it as a Content-Length body; beyond, it is discarded up to
        the drain bound and refused. Only when the server terminates the stream (gunicorn sets
        wsgi.input_terminated); otherwise Werkzeug reads it as empty and nothing is read here."""
        if not environ.get("wsgi.input_terminated"):
            return
        deadline = time.monotonic() + READ_SECONDS
        del environ["HTTP_TRANSFER_ENCODING"]  # from here on a plain Content-Length request
        try:
            data = _read(environ, self.limit + 1, deadline)
        except Exception as exc:  # malformed chunks, a timeout, a client gone: the body is unusable
            status = 408 if isinstance(exc, TimeoutError) else 400  # socket.timeout is TimeoutError
            environ.update({"wsgi.input": io.BytesIO(), "CONTENT_LENGTH": "0", BODY_REFUSED: status})
            return
        if len(data) <= self.limit:
            environ.update({"wsgi.input": io.BytesIO(data), "CONTENT_LENGTH": str(len(data))})
            return
        received = len(data) + _discard(environ, self.drain_limit - len(data), deadline=deadline)
        # at least this long: any read of the body raises Werkzeug's 413 as well
        environ.update({"wsgi.input": io.BytesIO(), "CONTENT_LENGTH": str(received), BODY_REFUSED: 413})

    # --- methods -----------------------------------------------------------------------------

    def _refuse_method(self, environ, start_response):
        started = time.perf_counter()
        method = request_log.printable(environ.get("REQUEST_METHOD", ""))
        request_id = request_log.request_id_from(environ.get("HTTP_X_REQUEST_ID", ""))
        trace = trace_context.from_environ(environ)
        allow = ", ".join(self._allowed(environ))
        message = f"Method {method} is not allowed here; the API serves {', '.join(SERVED_METHODS)}"
        body = json.dumps(error_body(405, message, request_id=request_id, trace_id=trace.trace_id)).encode()
        start_response(
            "405 METHOD NOT ALLOWED",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Allow", allow),
                (request_log.HEADER, request_id),
                (trace_context.TRACERESPONSE, trace.traceresponse()),
            ],
        )
        request_log.log_answered_early(
            environ,
            method=method,
            status=405,
            request_id=request_id,
            trace_id=trace.trace_id,
            started=started,
            size=len(body),
        )
        return [body]

    def _allowed(self, environ) -> list[str]:
        """The methods the requested route allows; all the API serves when no route matches."""
        try:
            allowed = set(self.url_map.bind_to_environ(environ).allowed_methods())
        except Exception:  # an unusable Host or path: the answer is still the 405
            allowed = set()
        return [m for m in SERVED_METHODS if m in allowed] or list(SERVED_METHODS)


def _read(environ, size: int, deadline: float) -> bytes:
    """Up to `size` bytes of the body (fewer at its end), within `deadline`."""
    stream = environ["wsgi.input"]
    parts = []
    with _reading_until(environ, deadline) as check:
        while size > 0:
            check()
            part = stream.read(min(size, READ_SIZE))
            if not part:
                break
            parts.append(part)
            size -= len(part)
    return b"".join(parts)


def _discard(environ, size: int, *, deadline: float) -> int:
    """Read and drop up to `size` bytes of the body; how many were read. Stops quietly at the
    body's end, the deadline or any read error (the answer is the same 413; gunicorn closes a
    connection whose body was not read to its end)."""
    stream = environ["wsgi.input"]
    done = 0
    with contextlib.suppress(Exception), _reading_until(environ, deadline) as check:
        while done < size:
            check()
            part = stream.read(min(size - done, READ_SIZE))
            if not part:
                break
            done += len(part)
    return done


@contextlib.contextmanager
def _reading_until(environ, deadline: float):
    """Yields a check to call before each read of the body: TimeoutError once `deadline` has
    passed, and gunicorn's socket set to time out at the deadline meanwhile (gunicorn bounds its
    own drain the same way); the socket's timeout is restored after. Without gunicorn's socket
    (the test client, other servers) only the deadline between reads counts."""
    sock = environ.get("gunicorn.socket")
    prior = sock.gettimeout() if sock is not None else None

    def check() -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request body took too long")
        if sock is not None:
            sock.settimeout(remaining)

    try:
        yield check
    finally:
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.settimeout(prior)


# --- before_request hooks ------------------------------------------------------------------------


def refuse_unread_body() -> Response | None:
    """Answer a body InputBounds refused (413 too large, 400 unreadable, 408 too slow), before anything reads
    it. A hook, not the middleware's own answer: it gets a request id, an access line and its
    place in the metrics (route template, status) like any answer."""
    refused = request.environ.get(BODY_REFUSED)
    if refused is None:
        return None
    if refused == 413:
        raise RequestEntityTooLarge()
    if refused == 408:
        return error_response(408, f"The request body did not arrive within {READ_SECONDS:g} s")
    return error_response(400, "The request body could not be read (malformed chunks, or the client stopped sending)")


def require_json_body() -> Response | None:
    """Refuse bodies that are not JSON before any view runs, so nothing half-parsed is written.
    Every body route passes here first, so webargs (which parses the same bytes again with the
    standard decoder for @input) only ever reads a body the strict decoder accepted."""
    if request.method not in BODY_METHODS or request.url_rule is None:
        return None
    if request.mimetype != "application/json":
        return error_response(
            415, "Content-Type must be application/json", details={"content_type": request.mimetype or None}
        )
    try:
        request.get_json()  # the app's strict decoder (service/strict_json.py); Flask caches the result
    except Exception as exc:  # werkzeug's BadRequest for undecodable JSON, or 413 for huge bodies
        if getattr(exc, "code", None) == 413:
            raise
        refused = strict_json.refusal(exc)  # a duplicate key, NaN or Infinity
        if refused is not None:
            return error_response(400, refused.message, details=refused.details)
        return error_response(400, "Request body is not valid JSON")
    return None
