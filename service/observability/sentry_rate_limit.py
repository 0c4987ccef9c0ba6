"""Repeated reports to Sentry, one per kind per minute and process, with the count held back.

Under a load test a pool timeout can happen thousands of times, and one event says it all; the
same holds for a bug: 20 requests that hit the same unhandled exception in 0.4 s were 20 events.
Two kinds of report are limited, each key at most once per RATE_LIMIT_SECONDS per process:

- a degraded-mode report (pool exhausted, database down, slow or not answering, throttle store failing), keyed
  by its `event` (one per kind, whatever raised it);
- any other event with an exception (an unhandled exception in a view, a logged exc_info), keyed
  by its fingerprint: the exception's type, where it was raised (file, function, line of the
  innermost frame) and the route (`transaction`). Two different bugs both go out; the same bug
  on two routes too.

The next event sent for a key carries `extra.sentry_suppressed`: how many were held back since
the one before (none is lost from the logs: every event is also a log line, and unhandled
exceptions are counted in flaskapi_http_unhandled_exceptions_total). Every other event, a worker death
or the crash route's report included, always goes out.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

RATE_LIMIT_SECONDS = 60.0
RATE_LIMITED_EVENTS = frozenset(
    {"db_pool_timeout", "db_unavailable", "db_statement_timeout", "db_timeout", "throttle_store_error"}
)
SUPPRESSED = "sentry_suppressed"  # the `extra` key of the count


class Limiter:
    """At most one pass per key per `interval` seconds of `clock` (tests pass their own: whether
    an event falls in the window never depends on how fast the machine is). At most `max_keys`
    keys are remembered: past that, the expired ones are forgotten, and if none had expired, all
    (a flood of distinct fingerprints then costs at worst one extra event per key, not memory)."""

    def __init__(
        self, interval: float = RATE_LIMIT_SECONDS, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 1000
    ) -> None:
        self.interval = interval
        self.clock = clock
        self.max_keys = max_keys
        self._windows: dict[object, list] = {}  # key -> [window start, held back since]
        self._lock = threading.Lock()

    def admit(self, key: object) -> int | None:
        """None when `key` already passed within the interval (counted as held back); otherwise
        how many were held back since it last passed."""
        now = self.clock()
        with self._lock:
            window = self._windows.get(key)
            if window is not None and now - window[0] < self.interval:
                window[1] += 1
                return None
            if window is None and len(self._windows) >= self.max_keys:
                self._forget_expired(now)
            held = window[1] if window is not None else 0
            self._windows[key] = [now, 0]
            return held

    def reset(self) -> None:
        with self._lock:
            self._windows.clear()

    def _forget_expired(self, now: float) -> None:
        expired = [key for key, (start, _) in self._windows.items() if now - start >= self.interval]
        for key in expired:
            del self._windows[key]
        if len(self._windows) >= self.max_keys:
            self._windows.clear()


limiter = Limiter()


def key_of(event: dict[str, Any]) -> tuple | None:
    """The key `event` is limited by (module doc), None when it is always sent."""
    kind = (event.get("extra") or {}).get("event")
    if kind in RATE_LIMITED_EVENTS:
        return ("degraded", kind)
    values = (event.get("exception") or {}).get("values") or []
    if not values:
        return None
    raised = values[-1]  # Sentry lists chained exceptions oldest first: the last one was raised
    frames = (raised.get("stacktrace") or {}).get("frames") or [{}]
    innermost = frames[-1]
    where = (innermost.get("abs_path") or innermost.get("filename"), innermost.get("function"), innermost.get("lineno"))
    return ("exception", raised.get("type"), *where, event.get("transaction"))


def admit(event: dict[str, Any]) -> dict[str, Any] | None:
    """`event` when it may be sent (with the count held back before it, if any), None when it
    repeats a report sent within the interval."""
    key = key_of(event)
    if key is None:
        return event
    held = limiter.admit(key)
    if held is None:
        return None
    if held:
        event.setdefault("extra", {})[SUPPRESSED] = held
    return event
