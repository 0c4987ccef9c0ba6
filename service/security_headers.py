"""Headers every answer carries, set in one place: WSGI middleware around everything that answers.

- `X-Content-Type-Options: nosniff` on every response: a browser never guesses that a JSON body
  (which can quote what a client sent) is HTML or script.
- `Cache-Control: no-store` on every response under `/auth/` (a token, an account, or an error
  about credentials) and on every response to a request that sent `Authorization`: whatever it
  says was made for that user, and a browser's or a proxy's cache must not keep it for the next
  person on the machine. Anonymous reads (`GET /books/`) stay cacheable: they are the same for
  everyone.

Middleware rather than an `after_request` hook, because not every answer is Flask's: the WSGI
guard (guards.py) answers unknown methods itself, and an exception that escapes Flask's handlers
is still answered through here. The master's metrics port uses it too (master_metrics.py).
"""

from __future__ import annotations

NOSNIFF = ("X-Content-Type-Options", "nosniff")
NO_STORE = ("Cache-Control", "no-store")
# (headers added, lower-case names the app's own values of are dropped)
_PUBLIC = ((NOSNIFF,), frozenset({"x-content-type-options"}))
_PRIVATE = ((NOSNIFF, NO_STORE), frozenset({"x-content-type-options", "cache-control"}))


class SecurityHeaders:
    """WSGI middleware adding the headers above to every response, replacing the app's own
    values of the same names. About 1 us a request (timeit): a closure and a pass over the
    response's few headers."""

    def __init__(self, app) -> None:
        self.app = app

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        private = "HTTP_AUTHORIZATION" in environ or path.startswith("/auth/") or path == "/auth"
        added, names = _PRIVATE if private else _PUBLIC

        def start(status, headers, exc_info=None):
            headers = [(name, value) for name, value in headers if name.lower() not in names]
            headers.extend(added)
            return start_response(status, headers, exc_info)

        return self.app(environ, start)
