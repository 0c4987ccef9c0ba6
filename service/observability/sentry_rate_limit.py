"""Degraded-mode reports to Sentry, one per kind per minute and process.

Under a load test a pool timeout can happen thousands of times, and one event says it all: the
same degraded-mode message (pool exhausted, database down or slow, throttle store failing) from
one process is sent once a minute at most. Every other event, a worker death included, always
goes out.
"""

from __future__ import annotations

import threading
import time
from typing import Any

RATE_LIMIT_SECONDS = 60.0
RATE_LIMITED_EVENTS = frozenset({"db_pool_timeout", "db_unavailable", "db_statement_timeout", "throttle_store_error"})
_last_sent: dict[str, float] = {}
_rate_lock = threading.Lock()


def rate_limited(event: dict[str, Any]) -> bool:
    """True when `event` is a degraded-mode report of a kind already sent in the last minute."""
    kind = (event.get("extra") or {}).get("event")
    if kind not in RATE_LIMITED_EVENTS:
        return False
    now = time.monotonic()
    with _rate_lock:
        last = _last_sent.get(kind)
        if last is not None and now - last < RATE_LIMIT_SECONDS:
            return True
        _last_sent[kind] = now
    return False
