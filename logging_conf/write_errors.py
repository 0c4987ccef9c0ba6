"""What a log handler does when it cannot write: count it, say it once a minute, go on.

The stdlib's `Handler.handleError` prints a multi-line "--- Logging error ---" traceback on
stderr for every record that fails. With the log disk full that was one traceback per log line
(11,683 of them in one measured run, a storm in journald) and still nothing a dashboard or an
alert could see. Our handlers (the file's, rotation.py, and the console's below) use
`ReportsWriteErrors.handleError` instead:

- every failed record counts in `flaskapi_log_write_errors_total{handler}` (`file` or `console`);
- at most once per REPORT_SECONDS per handler and process, one JSON line on stderr says what
  failed and how many records were lost since the last such line, and the same fact goes, as a
  WARNING record of the `flaskapi.log_write_errors` logger, to Sentry (the logging integration
  takes every WARNING; the logger has only a NullHandler, so the record never reaches the file
  that is failing, nor the stdlib's last-resort stderr handler);
- the record is dropped and the next one tried as usual, so logging resumes by itself when the
  cause goes away (space freed, the reader of stderr back).

Counting never raises: PROMETHEUS_MULTIPROC_DIR may be unset (then the count is this
process's own, as in the CLI and in-process tests), or name a directory that is gone or on the
same full disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime

from prometheus_client import Counter

REPORT_SECONDS = 60.0
HANDLERS = ("file", "console")  # the `handler` label's values, every series there from the start

# registry=None: as service/observability/*, samples go to the multiprocess files when enabled.
WRITE_ERRORS = Counter(
    "flaskapi_log_write_errors_total",
    "Log records a handler failed to write (disk full, I/O error, broken pipe): lost",
    ["handler"],
    registry=None,
)
with contextlib.suppress(Exception):  # a multiprocess dir that is gone: the count starts at the first error
    for _name in HANDLERS:
        WRITE_ERRORS.labels(_name)

# The report's way to Sentry: the logging integration sees every WARNING record, whatever its
# logger; this one writes nowhere itself (the JSON line on stderr is written directly).
reports = logging.getLogger("flaskapi.log_write_errors")
reports.addHandler(logging.NullHandler())
reports.propagate = False

# One counting at a time per process. Not prometheus_client's own lock, which is not re-entrant:
# a log line written by a signal handler (gunicorn's master logs from SIGCHLD) that fails while
# the interrupted code is counting would wait for itself. A failure that finds the counting
# taken is queued (a deque's append and popleft are atomic) and added by the one counting now,
# or else by the next.
_counting = threading.Lock()
_queued: deque[str] = deque()


def count(handler: str) -> None:
    """One record lost by `handler`; never raises, never waits."""
    _queued.append(handler)
    if not _counting.acquire(blocking=False):
        return
    try:
        while True:
            try:
                name = _queued.popleft()
            except IndexError:
                return
            with contextlib.suppress(Exception):  # the metrics dir is gone or full: this process loses its count
                WRITE_ERRORS.labels(name).inc()
    finally:
        _counting.release()


# A fork waits for a counting in progress (prometheus_client's lock is then free in the child).
# The hooks name the global at each call: the child gets a new lock.
def _before_fork() -> None:
    _counting.acquire()


def _after_fork_in_parent() -> None:
    _counting.release()


def _after_fork_in_child() -> None:
    global _counting
    _counting = threading.Lock()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


class ReportsWriteErrors:
    """A mixin for logging.Handler subclasses: `handleError` as the module doc says.
    `metric_label` names the handler in the counter, `describe()` the destination in the report,
    `clock` (epoch seconds) says when the last report is a minute old (tests pass their own)."""

    metric_label = "file"
    clock: Callable[[], float] = staticmethod(time.time)
    _report_after = float("-inf")
    _lost_since_report = 0
    _report_pid = 0  # a forked worker inherits the handler: its reports and counts are its own

    def describe(self) -> str:
        return getattr(self, "baseFilename", "") or repr(self)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        # reporting a lost line must never lose the caller its request
        with contextlib.suppress(Exception):
            error = sys.exc_info()[1]
            count(self.metric_label)
            if self._report_pid != os.getpid():
                self._report_pid, self._report_after, self._lost_since_report = os.getpid(), float("-inf"), 0
            self._lost_since_report += 1
            now = self.clock()
            if now < self._report_after:
                return
            self._report_after = now + REPORT_SECONDS
            lost, self._lost_since_report = self._lost_since_report, 0
            self._report(error, lost, now)

    def _report(self, error: BaseException | None, lost: int, now: float) -> None:
        reason = f"{type(error).__name__}: {error}" if error is not None else "unknown error"
        message = (
            f"log records lost: cannot write to {self.describe()} ({reason}); {lost} lost since the last report, "
            f"at most one report per {REPORT_SECONDS:g} s (flaskapi_log_write_errors_total counts them all)"
        )
        fields = {"event": "log_write_failed", "handler": self.metric_label, "error": reason, "lost": lost}
        line = {
            "level": "ERROR",
            "logger": reports.name,
            "message": message,
            "pid": os.getpid(),
            **fields,
            "timestamp": datetime.fromtimestamp(now, UTC).isoformat(),
        }
        stream = sys.stderr
        with contextlib.suppress(Exception):  # stderr is what failed, or is gone too
            stream.write(json.dumps(line) + "\n")
            stream.flush()
        with contextlib.suppress(Exception):
            reports.warning(message, extra=fields)  # to Sentry, when it is on


class ConsoleHandler(ReportsWriteErrors, logging.StreamHandler):
    """The stderr handler: the stdlib's StreamHandler with our `handleError`. When stderr fails
    (a broken pipe, a reader gone, a full disk under a redirect), each failed line is counted and
    the report is tried once a minute, where the stdlib tried a traceback per line."""

    metric_label = "console"

    def describe(self) -> str:
        return getattr(self.stream, "name", None) or "stderr"
