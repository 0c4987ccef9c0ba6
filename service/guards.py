"""Request guards, in two layers, both answering in the one error shape (errors.py).

`InputBounds` is WSGI middleware around the whole Flask app (the factory's register_wsgi_guards
step), for what must be settled before Flask sees a request: a method the API does not serve is
answered 405 at once. The metrics label requests with the method as sent, so a client inventing
methods would otherwise invent label values (20 requests `CARD00X /books/1` made 460 series;
1,000 random ones 14,881, and a 1.6 MB scrape).

The before_request hooks refuse bodies that are not JSON before any view runs.
"""

from __future__ import annotations

import json
import time

from flask import Response, request
from werkzeug.routing import Map

from service.errors import error_response
from service.observability import request_log

# The methods the API serves (Flask adds HEAD and OPTIONS to every route): the only values the
# `method` label of the HTTP metrics can take.
SERVED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class InputBounds:
    """WSGI middleware: a method the API does not serve is answered 405 before Flask (module
    doc); every other request passes untouched, at the cost of one set lookup."""

    def __init__(self, app, *, url_map: Map) -> None:
        self.app = app
        self.url_map = url_map
        self.methods = frozenset(SERVED_METHODS)

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") not in self.methods:
            return self._refuse_method(environ, start_response)
        return self.app(environ, start_response)

    def _refuse_method(self, environ, start_response):
        started = time.perf_counter()
        method = request_log.printable(environ.get("REQUEST_METHOD", ""))
        request_id = request_log.request_id_from(environ.get("HTTP_X_REQUEST_ID", ""))
        allow = ", ".join(self._allowed(environ))
        body = json.dumps(
            {
                "error": {
                    "status": 405,
                    "code": "method_not_allowed",
                    "message": f"Method {method} is not allowed here; the API serves {', '.join(SERVED_METHODS)}",
                    "details": {},
                    "request_id": request_id,
                }
            }
        ).encode()
        start_response(
            "405 METHOD NOT ALLOWED",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Allow", allow),
                (request_log.HEADER, request_id),
            ],
        )
        request_log.log_answered_early(
            environ, method=method, status=405, request_id=request_id, started=started, size=len(body)
        )
        return [body]

    def _allowed(self, environ) -> list[str]:
        """The methods the requested route allows; all the API serves when no route matches."""
        try:
            allowed = set(self.url_map.bind_to_environ(environ).allowed_methods())
        except Exception:  # an unusable Host or path: the answer is still the 405
            allowed = set()
        return [m for m in SERVED_METHODS if m in allowed] or list(SERVED_METHODS)


# --- before_request hooks ------------------------------------------------------------------------


def require_json_body() -> Response | None:
    """Refuse bodies that are not JSON before any view runs, so nothing half-parsed is written."""
    if request.method not in BODY_METHODS or request.url_rule is None:
        return None
    if request.mimetype != "application/json":
        return error_response(
            415, "Content-Type must be application/json", details={"content_type": request.mimetype or None}
        )
    try:
        request.get_json()
    except Exception as exc:  # werkzeug's BadRequest for undecodable JSON, or 413 for huge bodies
        if getattr(exc, "code", None) == 413:
            raise
        return error_response(400, "Request body is not valid JSON")
    return None
