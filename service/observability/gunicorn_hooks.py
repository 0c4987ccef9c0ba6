"""The gunicorn server hooks: what the master adds, wired to gunicorn's events.

The merged metrics endpoint (master_metrics.py), the report of worker deaths (worker_exits.py),
in each new worker the start of its metrics (metrics.py), and in a worker aborted for timeout
the stacks of its threads (worker_timeouts.py).
"""

from __future__ import annotations

import logging

from service.observability import master_metrics, worker_exits
from service.observability.master_metrics import MasterMetrics

# What the master gives its queued reports (worker deaths) to leave when it stops; nothing
# else in the master waits on Sentry.
EXIT_FLUSH_SECONDS = 2.0


class MasterHooks:
    """The gunicorn server hooks, bound to one master process (see deploy/gunicorn.conf.py)."""

    def __init__(self, *, metrics_bind: str | None, version: str) -> None:
        self.metrics_bind = metrics_bind
        self.version = version
        self.exit_status = worker_exits.ExitStatusRecorder()
        self.master_metrics: MasterMetrics | None = None
        self._httpd = None

    def on_starting(self, server) -> None:
        from service.observability import master_watch

        logging.getLogger("gunicorn.error").addFilter(self.exit_status)
        master_watch.block_in_master()  # before the first fork: every worker thread has it blocked

    def when_ready(self, server) -> None:
        if not self.metrics_bind:
            return
        self.master_metrics, self._httpd = master_metrics.start(server, bind=self.metrics_bind, version=self.version)

    def post_fork(self, server, worker) -> None:
        """Runs in the new worker."""
        # A worker whose master died stops listening and exits (master_watch.py). The master's
        # metrics socket was open when it forked: closed here, or an orphaned worker would keep
        # the metrics port listening, unanswered.
        from service.observability import master_watch

        if self._httpd is not None:
            self._httpd.socket.close()
        master_watch.watch(worker)
        if self.metrics_bind:
            from service.observability.metrics import worker_started

            worker_started()

    def child_exit(self, server, worker) -> None:
        if self.metrics_bind:
            master_metrics.worker_gone(worker.pid)
        cause = self.exit_status.cause_of(worker.pid)
        if self.master_metrics is not None:
            self.master_metrics.worker_reaped(cause)
        worker_exits.report(worker.pid, cause)

    def worker_abort(self, worker) -> None:
        """Runs in a worker the master aborts for timeout (SIGABRT), just before it exits."""
        from service.observability import worker_timeouts

        worker_timeouts.report(worker)

    def on_exit(self, server) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
        from service.observability.sentry import flush

        flush(EXIT_FLUSH_SECONDS)
