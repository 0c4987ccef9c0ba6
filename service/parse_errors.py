"""gunicorn's own answer to a request it cannot parse, in the service's one JSON error shape.

gunicorn refuses some requests before any WSGI code runs: a request line or header with bytes
outside HTTP's grammar, a repeated Content-Type, more than `limit_request_fields` headers, a
line over `limit_request_line`, a bad chunk size. It writes those answers with
`gunicorn.util.write_error`, as a small HTML page. nginx forwards them as they are (it intercepts
nothing from upstream: the app's own JSON errors carry details a generic page would lose), so
without this they reach clients through the edge too, as the one answer that is not JSON.

`install()` replaces that one function, for the master and every worker it forks (gunicorn
calls it as `util.write_error(...)`, looked up at call time): the same status and reason, a JSON
body in the shape of service/errors.py with gunicorn's message, `Connection: close` as before,
and the headers every answer carries (security_headers.py). gunicorn still logs the refusal
(a WARNING line) and its access line as before; the answer gets a new request id, since the
request that would carry one could not be read.
"""

from __future__ import annotations

import json
import uuid

from gunicorn import util

from service.errors import error_body
from service.observability import trace_context
from service.security_headers import NO_STORE, NOSNIFF


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """What gunicorn.util.write_error writes, as JSON (same signature, same non-blocking write)."""
    if status_int == 501:  # a Transfer-Encoding gunicorn does not serve: the client's doing, as nginx says too
        status_int, reason = 400, "Bad Request"
    request_id = uuid.uuid4().hex
    trace_id = trace_context.new_id(128)  # a request gunicorn could not parse has no usable headers
    message = mesg or reason
    body = json.dumps(error_body(status_int, message, request_id=request_id, trace_id=trace_id)).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"X-Request-ID: {request_id}\r\n"
        f"{NOSNIFF[0]}: {NOSNIFF[1]}\r\n"
        f"{NO_STORE[0]}: {NO_STORE[1]}\r\n"
        "\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


def install() -> None:
    """From deploy/gunicorn.conf.py, before the workers are forked."""
    util.write_error = write_json_error
