"""The hashing bulkhead: password hashing gets its own few threads, so it cannot starve the rest.

Why. Every registration and login costs one argon2id hash (OWASP's baseline, ~25 ms of CPU on a
quiet core, ~110 ms of wall time on a busy 2-core box). In the lesson's load test (200 users
spawned at 20/s, each registering and logging in) the spawn asks ~40 hashes a second of a box
that does 10-15: under plain gthread up to 12 request threads hash at once, and a 5 ms book
request waits for the CPU behind them, and for a free thread too, since gthread hands
connections to its threads first come, first served (books p95 170 ms against a 6-7 ms median).
A lock or semaphore around the hash inside the request would not help: a request waiting for
it still holds one of the worker's request threads.

What. Under gunicorn with gthread workers (the shipped default, GUNICORN_THREADS > 1) the worker
class is service.hashing_worker.HashingBulkheadWorker. A request to a route marked here with
`hashes_passwords` (POST /auth/register and /auth/login) is handed off by the request thread as
soon as its request line and headers are parsed: the request thread is free again at once, and
the connection waits in a per-worker queue, costing a socket, not a thread. HASH_THREADS threads
per worker (1 by default) serve the queue, each at HASH_NICE (default 10) below the request
threads' CPU priority, so a book request runs first whenever both want the CPU. A request that
cannot wait is shed with 503 `auth_busy` and `Retry-After`, answered by the app (this module's
hook), so it has its request id, access line, `status="503"` metrics and security headers:

- `queue_full`: HASH_QUEUE_MAX requests (default 256) already wait in this worker;
- `waited_too_long`: it waited HASH_QUEUE_TIMEOUT seconds (default 30) without its turn;
- `worker_stopping`: the worker is stopping and its graceful timeout is nearly over.

It helps only because argon2-cffi releases the GIL while it hashes, so a hashing thread and
the request threads run in parallel. Measured on this 2-core box (OWASP cost, 10 hashes per
thread): one thread 0.25 s of wall time for 0.25 s of CPU, two threads 0.28 s for 0.52 s,
1.8-1.9 times the throughput; a GIL-bound pure-Python loop gets no gain from a second thread.

Outside gunicorn (flask run, the test client) and with sync workers (GUNICORN_THREADS=1) nothing
changes: no request is handed off or shed, the hook below finds nothing to answer, and each
request hashes on the thread that serves it. Metrics and settings: docs/metrics.md,
docs/settings.md; the 503: docs/api.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading

from flask import Flask, request
from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger("service.hashing")

_MARK = "hashes_passwords"

# Why a request was shed, and what its client is told.
REASONS = {
    "queue_full": "Too many logins and registrations are waiting on this server",
    "waited_too_long": "This request waited too long for its turn to hash a password",
    "worker_stopping": "This server process is stopping",
}

# registry=None: see service/observability/metrics.py. Gauges are per worker, summed (livesum).
QUEUE_DEPTH = Gauge(
    "flaskapi_hash_queue_depth",
    "Hashing requests (register, login) waiting for a hashing thread",
    registry=None,
    multiprocess_mode="livesum",
)
QUEUE_CAPACITY = Gauge(
    "flaskapi_hash_queue_capacity",
    "Hashing requests that may wait (HASH_QUEUE_MAX per worker)",
    registry=None,
    multiprocess_mode="livesum",
)
IN_PROGRESS = Gauge(
    "flaskapi_hash_requests_in_progress",
    "Hashing requests being served by a hashing thread (at most HASH_THREADS per worker)",
    registry=None,
    multiprocess_mode="livesum",
)
# Up to twice the default HASH_QUEUE_TIMEOUT: a wait that long is shed, whatever the setting.
QUEUE_WAIT = Histogram(
    "flaskapi_hash_queue_wait_seconds",
    "Time a hashing request waited in its worker's queue, whatever came of it",
    registry=None,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 45.0, 60.0),
)
SHED = Counter(
    "flaskapi_hash_shed_total",
    "Hashing requests answered 503 auth_busy without being served",
    ["route", "reason"],
    registry=None,
)
ABANDONED = Counter(
    "flaskapi_hash_abandoned_total",
    "Queued hashing requests whose client had closed the connection when their turn came (not served)",
    registry=None,
)


def hashes_passwords(view):
    """Mark a view that hashes or verifies a password: under the bulkhead worker its requests are
    served by the hashing threads. Put it right under the route decorator."""
    setattr(view, _MARK, True)
    return view


def routes(app: Flask) -> frozenset[tuple[str, str]]:
    """(method, path) of every marked route: what the bulkhead worker hands off. Paths must be
    fixed (no `<converter>`), so a parsed request is matched without routing it."""
    found = set()
    for rule in app.url_map.iter_rules():
        if not getattr(app.view_functions.get(rule.endpoint), _MARK, False):
            continue
        if rule.arguments:
            raise RuntimeError(f"{rule.rule}: a route that hashes passwords must have a fixed path")
        found.update((method, rule.rule) for method in rule.methods - {"HEAD", "OPTIONS"})
    return frozenset(found)


@dataclasses.dataclass(frozen=True)
class Shed:
    """The worker's verdict on a request it will not serve, for the app to answer."""

    reason: str  # a key of REASONS
    waited: float  # seconds in the queue (0 for queue_full: it never joined)
    depth: int  # requests still waiting in this worker's queue
    retry_after: int  # whole seconds, at least 1


_verdict = threading.local()


@contextlib.contextmanager
def shedding(shed: Shed | None):
    """While the worker runs the app for a request it sheds (on that same thread)."""
    _verdict.shed = shed
    try:
        yield
    finally:
        _verdict.shed = None


def init_app(app: Flask) -> None:
    """The hook that answers a shed request, before any view or database work; every series
    exists, at 0, from the start."""
    for _method, path in routes(app):
        for reason in REASONS:
            SHED.labels(route=path, reason=reason)
    app.before_request(_answer_if_shed)


def _answer_if_shed():
    shed = getattr(_verdict, "shed", None)
    if shed is None:
        return None
    from service.errors import error_response
    from service.observability.metrics import route as route_label

    route = route_label(request)
    SHED.labels(route=route, reason=shed.reason).inc()
    log.warning(
        "%s %s shed (%s): waited %.3fs, %d waiting in this worker",
        request.method,
        route,
        shed.reason,
        shed.waited,
        shed.depth,
        extra={
            "event": "hash_shed",
            "route": route,
            "reason": shed.reason,
            "waited_s": round(shed.waited, 3),
            "queue_depth": shed.depth,
            "retry_after": shed.retry_after,
        },
    )
    return error_response(
        503,
        f"{REASONS[shed.reason]}; retry in {shed.retry_after} s",
        code="auth_busy",
        details={"reason": shed.reason, "retry_after": shed.retry_after},
        headers={"Retry-After": str(shed.retry_after)},
    )
