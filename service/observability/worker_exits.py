"""Worker deaths, reported by the master.

A worker killed by `os._exit`, SIGKILL (the OOM killer) or a timeout abort cannot report itself,
so the master does: gunicorn logs each exit status just before calling `child_exit`; we keep
that status from its log record (ExitStatusRecorder), count the exit (master_metrics.py: and, if
it was not a clean exit, a restart), then write one JSON line with pid and cause and send a
Sentry event (`report`), queued for the SDK's sending thread: nothing here waits on Sentry.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("service.workers")

CLEAN_EXIT = "clean exit"
# What the master itself sends to stop workers (shutdown, reload, scale down): not a crash.
STOPPED = frozenset({CLEAN_EXIT, "SIGTERM", "SIGINT", "SIGQUIT"})


class ExitStatusRecorder(logging.Filter):
    """Keeps the exit status gunicorn's arbiter logs for each reaped worker (it does not pass
    the status to `child_exit`). Reads the record's arguments, not its text."""

    def __init__(self) -> None:
        super().__init__()
        self.status: dict[int, str] = {}
        self.timed_out: set[int] = set()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        template, args = record.msg, record.args
        if isinstance(template, str) and isinstance(args, tuple) and args:
            with self._lock:
                if template.startswith("Worker (pid:%s) was sent"):
                    self.status[int(args[0])] = str(args[1])
                elif template.startswith("Worker (pid:%s) exited with code"):
                    self.status[int(args[0])] = f"exit code {args[1]}"
                elif template.startswith("WORKER TIMEOUT (pid:%s)"):
                    self.timed_out.add(int(args[0]))
        return True

    def cause_of(self, pid: int) -> str:
        with self._lock:
            status = self.status.pop(pid, CLEAN_EXIT)
            if pid in self.timed_out:
                self.timed_out.discard(pid)
                return "timeout"
        return status


def report(pid: int, cause: str) -> None:
    """One log line for a worker the master stopped; for one that died, an error line that is
    also a Sentry event tagged with pid and cause.

    The event is queued, not flushed: the SDK's transport sends it from its own thread, and
    the replacement is forked next without waiting on Sentry (a flush here held every
    replacement up to its 2 s bound when Sentry was slow or unreachable, 4 s for two deaths).
    The worker forked meanwhile gets a transport of its own (sentry.py), so an event still
    queued in the master is never sent from there too; the master flushes at exit."""
    if cause in STOPPED:
        log.info(
            "worker %d stopped (%s)", pid, cause, extra={"event": "worker_exit", "worker_pid": pid, "cause": cause}
        )
        return
    import sentry_sdk

    with sentry_sdk.new_scope() as scope:
        scope.set_tag("worker_pid", pid)
        scope.set_tag("cause", cause)
        scope.fingerprint = ["gunicorn-worker-died", cause]
        log.error(
            "worker %d died (%s); the master starts a replacement",
            pid,
            cause,
            extra={"event": "worker_died", "worker_pid": pid, "cause": cause},
        )
