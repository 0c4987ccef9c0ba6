"""The lesson's `/auth/crash`: kills the worker process on purpose, to watch recovery.

Registered only when CRASH_ROUTE_ENABLED=1. The process dies by `os._exit`, which skips every
handler, so whatever must be known about the crash is written before it.
"""

from __future__ import annotations

import logging
import os

from service.observability.sentry import flush

log = logging.getLogger("service.crash")

# How long the dying worker gives its Sentry event (the one that carries the request id) to
# leave. A reachable Sentry takes milliseconds; a slow or unreachable one costs at most this
# before the worker exits and the master forks its replacement. The death itself is reported
# by the master either way (worker_exits.py), so an event lost here loses only the request id,
# which the log line above still has.
FLUSH_SECONDS = 0.5


def crash():
    # The error line is also the Sentry event (logging integration), tagged with the request id.
    log.error("crash requested: worker %d exits now via os._exit(1)", os.getpid(), extra={"event": "crash_requested"})
    for handler in logging.getLogger().handlers:
        handler.flush()
    flush(FLUSH_SECONDS)
    os._exit(1)
